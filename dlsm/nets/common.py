"""Small pieces shared by the image networks: parameter counting, image-shape and norm checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlsm.errors import ConfigError

__all__ = ["check_groups", "check_image_shape", "check_input", "check_positive", "count_parameters"]


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters of ``module``; buffers such as Fourier frequencies are not counted."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def check_image_shape(name: str, shape: Sequence[int], num_downsamplings: int) -> tuple[int, int, int]:
    """``shape`` as (C, H, W); ConfigError unless H and W are divisible by 2**num_downsamplings."""
    if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
        raise ConfigError(f"{name}: shape must be (channels, height, width) of positive ints, got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    factor = 2**num_downsamplings
    if h % factor or w % factor:
        raise ConfigError(
            f"{name}: image {h}x{w} does not fit {num_downsamplings} halvings (needs H and W divisible by {factor}); "
            "use fewer levels or another image size"
        )
    return c, h, w


def check_positive(name: str, *, minimum: int = 1, **sizes: object) -> None:
    """ConfigError in one line naming the binding (``ScoreMLP.hidden = 0: must be a positive integer``) unless every
    size (a width, depth or channel count of configurable ``name``) is an integer >= ``minimum``."""
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"{name}.{key} = {value!r}: must be {what}")


def check_groups(name: str, widths: Sequence[int], groups: int) -> None:
    """ConfigError unless every width is divisible by the GroupNorm group count."""
    bad = sorted({w for w in widths if groups < 1 or w % groups})
    if bad:
        raise ConfigError(f"{name}: GroupNorm with {groups} groups needs widths divisible by {groups}, got {bad}")


def check_input(name: str, x: torch.Tensor, shape: tuple[int, int, int]) -> None:
    """ConfigError when a batch does not have the image shape the network was built for."""
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise ConfigError(f"{name} was built for images of shape {shape} (C, H, W), got a batch of {tuple(x.shape)}")
