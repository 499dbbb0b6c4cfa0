"""Datasets, held in memory as (x, y) tensors. Each loader is a gin configurable returning LabelledData.

LabelledData speaks the dataset protocol of :class:`dlsm.data.images.ImageData` (``len``, ``shape``, ``device``,
``to``, ``subset``, ``batch``, ``decode``), so the trainer and the samplers treat points and images alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import gin
import torch

from dlsm.errors import ConfigError

__all__ = ["LabelledData", "two_moons"]


@dataclass(frozen=True)
class LabelledData:
    """Training data: ``x`` of shape (N, ...) float32, ``y`` of shape (N,) int64 in [0, num_classes)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return int(self.x[0].numel())

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's shape, e.g. (2,) for points in the plane."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def of_class(self, c: int) -> torch.Tensor:
        return self.x[self.y == c]

    def batch(
        self,
        idx: torch.Tensor | Sequence[int],
        *,
        flip: bool = False,
        generator: torch.Generator | None = None,  # the protocol's; nothing random is drawn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` as (x[idx], y[idx]), gathered on the data's device; no random numbers are drawn.

        ``flip=True`` (a horizontal mirror, for images) has no meaning for points: a one-line ConfigError.
        """
        if flip:
            raise ConfigError(f"train.flip = True but {self.name} holds {self.dim}-D points, not images, so there is "
                              "nothing to mirror; set train.flip = False")
        idx = torch.as_tensor(idx, device=self.device)
        return self.x[idx], self.y[idx]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> data space: the identity for points (the images' counterpart rounds to uint8)."""
        return x

    def subset(self, idx: torch.Tensor | Sequence[int]) -> LabelledData:
        """The rows ``idx`` (indices or a boolean mask) as a new LabelledData with the same classes."""
        idx = torch.as_tensor(idx, device=self.device)
        return replace(self, x=self.x[idx], y=self.y[idx])

    def to(self, device: torch.device | str) -> LabelledData:
        """A copy whose points and labels live on ``device``."""
        return replace(self, x=self.x.to(device), y=self.y.to(device))


@gin.configurable
def two_moons(n: int = 10_000, *, scale: float = 20.0, noise: float = 0.0, seed: int = 1) -> LabelledData:
    """The DLSM paper's inter-twining moons: ``n`` points, centred, scaled by ``scale``.

    Label 0 is the upper crescent (cos t, sin t), label 1 the lower one (1 - cos t, 1/2 - sin t),
    t evenly spaced on [0, pi]; optional Gaussian ``noise`` is added before centring and scaling.
    """
    g = torch.Generator().manual_seed(seed)
    n_upper = n // 2
    t_up = torch.linspace(0.0, math.pi, n_upper, dtype=torch.float64)
    t_lo = torch.linspace(0.0, math.pi, n - n_upper, dtype=torch.float64)
    upper = torch.stack([t_up.cos(), t_up.sin()], dim=1)
    lower = torch.stack([1.0 - t_lo.cos(), 0.5 - t_lo.sin()], dim=1)
    x = torch.cat([upper, lower])
    y = torch.cat([torch.zeros(n_upper, dtype=torch.long), torch.ones(n - n_upper, dtype=torch.long)])
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    x = (x - x.mean(0)) * scale
    perm = torch.randperm(n, generator=g)
    return LabelledData(x[perm].float(), y[perm], 2, "two_moons", ("upper", "lower"))
