"""Noise-conditional networks for low-dimensional data.

The score network's parameterisation lives in one place, :class:`ScoreMLP.forward`:

    s(x, sigma; phi) = F(c_in(sigma) x, c_noise(sigma)) * c_out(sigma)

with c_in = 1/sqrt(sigma^2 + sigma_data^2) (input scaling, optional), c_noise = log(sigma)/4, and
c_out = 1/sigma (NCSNv2 Technique 3, optional) or 1. The classifier sees the same c_in x and c_noise.
"""

from __future__ import annotations

import math

import gin
import torch
from torch import nn

from dlsm.errors import ConfigError
from dlsm.nets.common import check_positive

__all__ = ["BranchClassifier", "ClassifierMLP", "NoiseConditionalMLP", "ScoreMLP", "SigmaEmbedding"]


def _as_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B,) tensor on x's device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Noise conditioning input, log(sigma)/4 (EDM's choice for VE noise)."""
    return sigma.log() / 4.0


def c_in(sigma: torch.Tensor, sigma_data: float | None) -> torch.Tensor:
    """Input scaling 1/sqrt(sigma^2 + sigma_data^2), or 1 when sigma_data is None."""
    if sigma_data is None:
        return torch.ones_like(sigma)
    return torch.rsqrt(sigma**2 + sigma_data**2)


def _check_widths(name: str, **widths: object) -> None:
    """ConfigError unless each of ``widths`` is a non-empty tuple of positive integers (the layer widths)."""
    for key, value in widths.items():
        items = tuple(value) if isinstance(value, (tuple, list)) else None
        if not items or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in items):
            raise ConfigError(f"{name}.{key} = {value!r}: must be a non-empty tuple of positive integers, "
                              "e.g. (256, 128, 64)")


class SigmaEmbedding(nn.Module):
    """Fixed random Fourier features of c_noise followed by a learned linear map and SiLU."""

    def __init__(self, emb_dim: int, *, scale: float = 4.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(emb_dim // 2) * scale)
        self.proj = nn.Linear(2 * (emb_dim // 2), emb_dim)

    def forward(self, noise_cond: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * noise_cond[:, None] * self.freqs[None, :]
        return nn.functional.silu(self.proj(torch.cat([angles.sin(), angles.cos()], dim=1)))


class NoiseConditionalMLP(nn.Module):
    """MLP trunk h_{l+1} = SiLU(W_l h_l + U_l e(sigma)): the sigma embedding enters every layer."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden: int, depth: int, emb_dim: int) -> None:
        super().__init__()
        self.embed = SigmaEmbedding(emb_dim)
        dims = [in_dim] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.cond = nn.ModuleList(nn.Linear(emb_dim, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, h: torch.Tensor, noise_cond: torch.Tensor) -> torch.Tensor:
        e = self.embed(noise_cond)
        for layer, cond in zip(self.layers, self.cond, strict=True):
            h = nn.functional.silu(layer(h) + cond(e))
        return self.out(h)


@gin.configurable
class ScoreMLP(nn.Module):
    """Noise-conditional score network s(x, sigma; phi) for flat data of dimension ``dim``."""

    def __init__(
        self,
        dim: int,
        *,
        hidden: int = 128,
        depth: int = 3,
        emb_dim: int = 64,
        scale_by_sigma: bool = True,
        sigma_data: float | None = None,
    ) -> None:
        super().__init__()
        check_positive(type(self).__name__, hidden=hidden, depth=depth)
        check_positive(type(self).__name__, minimum=2, emb_dim=emb_dim)  # emb_dim // 2 Fourier frequencies
        self.scale_by_sigma = scale_by_sigma
        self.sigma_data = sigma_data
        self.net = NoiseConditionalMLP(dim, dim, hidden=hidden, depth=depth, emb_dim=emb_dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = _as_batch(sigma, x)
        f = self.net(c_in(sigma, self.sigma_data)[:, None] * x, c_noise(sigma))
        return f / sigma[:, None] if self.scale_by_sigma else f  # Technique 3: s = F / sigma


@gin.configurable
class ClassifierMLP(nn.Module):
    """Noise-conditional classifier logits(x, sigma; theta); log p(y|x, sigma) = log_softmax(logits)[y]."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        hidden: int = 128,
        depth: int = 3,
        emb_dim: int = 64,
        sigma_data: float | None = None,
    ) -> None:
        super().__init__()
        check_positive(type(self).__name__, hidden=hidden, depth=depth)
        check_positive(type(self).__name__, minimum=2, emb_dim=emb_dim)  # emb_dim // 2 Fourier frequencies
        self.sigma_data = sigma_data
        self.net = NoiseConditionalMLP(dim, num_classes, hidden=hidden, depth=depth, emb_dim=emb_dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = _as_batch(sigma, x)
        return self.net(c_in(sigma, self.sigma_data)[:, None] * x, c_noise(sigma))


_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "softplus": nn.Softplus}


def _mlp(widths: tuple[int, ...], activation: str) -> nn.Sequential:
    """Linear layers with ``activation`` between them (none after the last)."""
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


@gin.configurable
class BranchClassifier(nn.Module):
    """The DLSM toy code's classifier shape: logits = W [f(x); g(sigma)] + b.

    f (the x branch) and g (the sigma branch, fed raw sigma) are separate MLPs whose outputs are
    concatenated and mapped to logits by one linear layer. Since the logits are a sum of an x part and a
    sigma part, grad_x logits does not depend on sigma: only the softmax weights change with the noise level.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        x_widths: tuple[int, ...] = (256, 128, 64),
        sigma_widths: tuple[int, ...] = (64, 32, 16),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _check_widths(type(self).__name__, x_widths=x_widths, sigma_widths=sigma_widths)
        self.x_branch = _mlp((dim, *x_widths), activation)
        self.sigma_branch = _mlp((1, *sigma_widths), activation)
        self.head = nn.Linear(x_widths[-1] + sigma_widths[-1], num_classes)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = _as_batch(sigma, x)
        h = torch.cat([self.x_branch(x.reshape(x.shape[0], -1)), self.sigma_branch(sigma[:, None])], dim=1)
        return self.head(h)
