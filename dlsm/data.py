"""Datasets, held in memory as (x, y) tensors. Each loader is a gin configurable returning LabelledData."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gin
import torch

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

    def of_class(self, c: int) -> torch.Tensor:
        return self.x[self.y == c]


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
