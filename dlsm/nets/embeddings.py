"""Noise-level embeddings for the image networks.

:class:`GaussianFourierEmbedding` is the embedding of NCSN++ (Song et al. 2021, ``layerspp.GaussianFourierProjection``)
and of the official DLSM sigma-conditioned ResNet (``models/resnet_cond.py``): fixed random Fourier features of the
noise input c = c_noise(sigma) = log(sigma), followed by a two-layer MLP,

    phi(c) = [sin(2 pi c w) ; cos(2 pi c w)],   w ~ N(0, scale^2 I_m) fixed (a buffer, not trained),
    e(c)   = W_2 SiLU(W_1 phi(c) + b_1) + b_2.

With scale 16 (the NCSN++ / DLSM choice for log sigma) the features resolve the noise level finely over the
range of a geometric schedule. The networks apply SiLU to e before projecting it to each block's channel bias.
"""

from __future__ import annotations

import math

import gin
import torch
from torch import nn

from dlsm.errors import ConfigError

__all__ = ["GaussianFourierEmbedding"]


@gin.configurable
class GaussianFourierEmbedding(nn.Module):
    """e(c) = MLP([sin 2 pi c w; cos 2 pi c w]) with fixed frequencies w ~ N(0, scale^2), w in R^m.

    Args:
        dim: output width of the MLP (the embedding width fed to the blocks).
        scale: standard deviation of the frequencies (16 in NCSN++ and the DLSM ResNet, for c = log sigma).
        num_frequencies: m; default ``dim // 4`` (NCSN++: nf frequencies for a 4 nf embedding).
        seed: draw w from ``torch.Generator().manual_seed(seed)`` instead of the global RNG, so the
            frequencies do not depend on what else was constructed first. With ``seed=None`` a construction
            after ``torch.manual_seed`` is reproducible too.
    """

    def __init__(
        self, dim: int, *, scale: float = 16.0, num_frequencies: int | None = None, seed: int | None = None
    ) -> None:
        super().__init__()
        m = max(dim // 4, 1) if num_frequencies is None else num_frequencies
        if dim < 1 or m < 1:
            raise ConfigError(f"GaussianFourierEmbedding needs dim >= 1 and num_frequencies >= 1, got {dim}, {m}")
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(m, generator=generator) * scale)
        self.linear1 = nn.Linear(2 * m, dim)
        self.linear2 = nn.Linear(dim, dim)

    def features(self, noise_cond: torch.Tensor) -> torch.Tensor:
        """phi(c) = [sin(2 pi c w); cos(2 pi c w)], shape (B, 2m), for c of shape (B,)."""
        angles = 2 * math.pi * noise_cond[:, None] * self.freqs[None, :].to(noise_cond.dtype)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, noise_cond: torch.Tensor) -> torch.Tensor:
        """e(c) = W_2 SiLU(W_1 phi(c) + b_1) + b_2, shape (B, dim)."""
        return self.linear2(nn.functional.silu(self.linear1(self.features(noise_cond))))
