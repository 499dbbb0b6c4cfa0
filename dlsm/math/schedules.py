"""Noise schedules and the NCSNv2 techniques that choose them (Song & Ermon, 2020).

Convention used everywhere in dlsm: ``sigmas`` is **descending**, ``sigmas[0]`` is the largest
noise level (sigma_max) and ``sigmas[-1]`` the smallest (sigma_min, the paper's sigma_L).

- Technique 1 (initial noise scale): sigma_max = max_{i,j} ||x_i - x_j||, see :func:`max_pairwise_distance`.
- Technique 2 (other noise scales): a geometric progression whose ratio gamma solves
  Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma) = overlap (~0.5),
  see :func:`technique2_ratio` and :func:`technique2_num_scales`.
- Technique 4 (Langevin step size): epsilon chosen so that, for a Gaussian, Proposition 3's
  s_T^2 / sigma_i^2 is as close to 1 as possible, with the step rule alpha_i = eps sigma_i^2 / sigma_L^2,
  see :func:`technique4_step_size` and :func:`langevin_step_sizes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gin
import torch
from scipy.optimize import brentq, minimize_scalar
from scipy.special import ndtr, ndtri

from dlsm.errors import ConfigError

__all__ = [
    "NoiseSchedule",
    "geometric_sigmas",
    "langevin_step_sizes",
    "log_uniform_sigmas",
    "max_pairwise_distance",
    "noise_schedule",
    "proposition3_ratio",
    "technique2_num_scales",
    "technique2_overlap",
    "technique2_ratio",
    "technique4_step_size",
]


def geometric_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> torch.Tensor:
    """Geometric sigmas, descending: sigma_i = sigma_max (sigma_min/sigma_max)^(i/(N-1)), i = 0..N-1."""
    if not (sigma_max > sigma_min > 0):
        raise ConfigError(f"need sigma_max > sigma_min > 0, got sigma_max={sigma_max}, sigma_min={sigma_min}")
    if num_scales < 2:
        raise ConfigError(f"num_scales must be at least 2, got {num_scales}")
    return torch.exp(
        torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales, dtype=torch.float64)
    ).float()


def log_uniform_sigmas(
    n: int, sigma_min: float, sigma_max: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Continuous training noise levels: log sigma ~ U(log sigma_min, log sigma_max), shape (n,)."""
    u = torch.rand(n, generator=generator)
    return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))


@torch.no_grad()
def max_pairwise_distance(x: torch.Tensor, *, chunk_size: int | None = None) -> float:
    """Technique 1: max_{i,j} ||x_i - x_j||_2 over the rows of ``x`` (flattened), chunked.

    Memory is O(chunk_size * N) rather than O(N^2), so 50,000 x 3072 runs in a few hundred MB.
    Squared distances use ||a||^2 + ||b||^2 - 2 a.b in float64 for the maximum's precision.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    x = x - x.mean(dim=0)  # distances are translation invariant; centring limits cancellation error
    chunk_size = chunk_size or max(64, 2**18 // x.shape[0])  # ~256K-element blocks stay in cache
    sq = (x * x).sum(dim=1)
    best = 0.0
    for start in range(0, x.shape[0], chunk_size):
        a = x[start : start + chunk_size]
        d2 = sq[start : start + chunk_size, None] + sq[None, :] - 2.0 * (a @ x.T)
        best = max(best, float(d2.max()))
    return math.sqrt(max(best, 0.0))


def technique2_overlap(gamma: float, dim: int) -> float:
    """Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma) (NCSNv2 Technique 2)."""
    a = math.sqrt(2.0 * dim) * (gamma - 1.0)
    return float(ndtr(a + 3.0 * gamma) - ndtr(a - 3.0 * gamma))


def technique2_ratio(dim: int, overlap: float = 0.5) -> float:
    """The common ratio gamma = sigma_{i-1}/sigma_i > 1 at which Technique 2's overlap equals ``overlap``.

    With s = sqrt(2D) and a = s (gamma - 1), the overlap Phi(a + 3 gamma) - Phi(a - 3 gamma) starts at
    Phi(3) - Phi(-3) ~ 0.9973 for gamma = 1 and tends to 0 as gamma grows only when s > 3, i.e. D >= 5; low-dimensional
    data (D <= 4, e.g. two moons) has no solution, nor has a target of 0.9973 or more: choose ``num_scales`` by hand.
    The bracket's upper end has overlap below the target in closed form: the overlap is below 1 - Phi(a - 3 gamma),
    which equals the target at gamma* = (s - Phi^-1(target)) / (s - 3); twice gamma* is past the root (gamma ~ 19.5
    at D = 5 for 0.5, where a fixed bracket missed it).
    """
    top = float(ndtr(3.0) - ndtr(-3.0))
    if not 0.0 < overlap < top:
        raise ConfigError(f"Technique 2's overlap must be in (0, {top:.4f}) (its value at gamma = 1), got {overlap!r}")
    if dim < 5:
        raise ConfigError(
            f"Technique 2 has no solution for data dimension D={dim} (it needs D >= 5); "
            "set noise_schedule.num_scales to a number"
        )
    f = lambda g: technique2_overlap(g, dim) - overlap  # noqa: E731
    s = math.sqrt(2.0 * dim)
    hi = max(1.0 + 20.0 / s, 2.0 * (s - float(ndtri(overlap))) / (s - 3.0))
    return brentq(f, 1.0 + 1e-12, hi, xtol=1e-14)


def technique2_num_scales(sigma_max: float, sigma_min: float, dim: int, overlap: float = 0.5) -> int:
    """Number of geometric scales from sigma_max to sigma_min for Technique 2: ceil(log(s_max/s_min)/log gamma) + 1.

    Rounding up guarantees an overlap of at least ``overlap``. With the poster's target 0.5,
    CIFAR-10 (D=3072, 50 -> 0.01) gets 220 scales. NCSNv2's released configs (CIFAR-10 232,
    CelebA 500, Church 788, Bedroom 1086, FFHQ 2311) all sit at overlap ~0.566-0.567 of this same
    formula: ``overlap=0.566`` gives the first four exactly and FFHQ 2310; no single value gives all five.
    """
    gamma = technique2_ratio(dim, overlap)
    return math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9) + 1


def proposition3_ratio(eps: float, gamma: float, sigma_min: float, n_steps_each: int) -> float:
    """NCSNv2 Proposition 3: s_T^2/sigma_i^2 after T Langevin steps at one level, for a Gaussian.

    s_T^2/sigma_i^2 = (1 - eps/sigma_L^2)^(2T) (gamma^2 - 2eps/(sigma_L^2 - sigma_L^2 (1 - eps/sigma_L^2)^2))
                      + 2eps/(sigma_L^2 - sigma_L^2 (1 - eps/sigma_L^2)^2),
    with gamma = sigma_{i-1}/sigma_i and sigma_L the smallest sigma.
    """
    s2 = sigma_min**2
    c = 2.0 * eps / (s2 - s2 * (1.0 - eps / s2) ** 2)
    return (1.0 - eps / s2) ** (2 * n_steps_each) * (gamma**2 - c) + c


def technique4_step_size(gamma: float, sigma_min: float, n_steps_each: int) -> float:
    """Technique 4: the eps in (0, sigma_L^2) that brings Proposition 3's ratio closest to 1."""
    lo, hi = math.log(sigma_min**2 * 1e-8), math.log(sigma_min**2 * (1.0 - 1e-9))
    res = minimize_scalar(
        lambda le: abs(proposition3_ratio(math.exp(le), gamma, sigma_min, n_steps_each) - 1.0),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return math.exp(res.x)


def langevin_step_sizes(sigmas: torch.Tensor, eps: float) -> torch.Tensor:
    """The NCSNv2 step rule alpha_i = eps * sigma_i^2 / sigma_L^2 (sigma_L = sigmas[-1], the smallest)."""
    return eps * (sigmas / sigmas[-1]) ** 2


@dataclass(frozen=True)
class NoiseSchedule:
    """A resolved schedule: descending ``sigmas`` plus annealed-Langevin settings."""

    sigmas: torch.Tensor
    eps: float
    n_steps_each: int

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[-1])

    def as_params(self) -> dict[str, float | int]:
        return {
            "schedule.sigma_max": self.sigma_max,
            "schedule.sigma_min": self.sigma_min,
            "schedule.num_scales": len(self.sigmas),
            "schedule.eps": self.eps,
            "schedule.n_steps_each": self.n_steps_each,
        }


def _auto_or_number(name: str, value: object) -> float | None:
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"noise_schedule.{name} must be a number or 'auto', got {value!r}")
    return float(value)


@gin.configurable
def noise_schedule(
    data: torch.Tensor | object,
    *,
    sigma_max: float | str = "auto",
    sigma_min: float = 0.01,
    num_scales: int | str = "auto",
    n_steps_each: int = 5,
    eps: float | str = "auto",
    overlap: float = 0.5,
) -> NoiseSchedule:
    """Resolve a schedule from the training ``data``; each of sigma_max, num_scales, eps is a number or 'auto'.

    'auto' applies Technique 1 (sigma_max), Technique 2 (num_scales) and Technique 4 (eps) in turn.
    ``data`` is a tensor of examples or a dataset with an ``x`` property (LabelledData, ImageData); a dataset's
    float ``x`` (600 MB for CIFAR-10) is only built when Technique 1 or 2 needs it.
    """
    points = (lambda: data) if isinstance(data, torch.Tensor) else (lambda: data.x)
    smax = _auto_or_number("sigma_max", sigma_max)
    smin = _auto_or_number("sigma_min", sigma_min)
    if smin is None:
        raise ConfigError("noise_schedule.sigma_min must be a number")
    if smax is None:
        smax = max_pairwise_distance(points())
    n = _auto_or_number("num_scales", num_scales)
    if n is None:
        n = technique2_num_scales(smax, smin, int(points()[0].numel()), overlap)
    if n != int(n):
        raise ConfigError(f"noise_schedule.num_scales must be an integer, got {num_scales!r}")
    if not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise ConfigError(f"noise_schedule.n_steps_each must be a positive integer, got {n_steps_each!r}")
    sigmas = geometric_sigmas(smax, smin, int(n))
    e = _auto_or_number("eps", eps)
    if e is None:
        gamma = (smax / smin) ** (1.0 / (int(n) - 1))
        e = technique4_step_size(gamma, smin, n_steps_each)
    return NoiseSchedule(sigmas=sigmas, eps=e, n_steps_each=n_steps_each)
