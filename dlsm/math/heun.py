"""Heun's second-order sampler of the VE probability-flow ODE on the time steps of Karras et al. (2022).

"Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), Algorithms 1 and 2, for the VE SDE
(sigma(t) = t, s(t) = 1), whose probability-flow ODE written in sigma is

    dx/dsigma = -sigma s(x, sigma),    s(x, sigma) = grad_x log p_sigma(x)

(EDM's d = (x - D(x; sigma)) / sigma with the denoiser D = x + sigma^2 s). ``score_fn`` may be the prior score or
the guided posterior score s(x; phi) + alpha grad_x log p(y|x, sigma; theta) (:mod:`dlsm.math.scores`): every score
evaluation, the Euler step's and the trapezoidal correction's, goes through it, so guidance enters each of the
2N - 1 evaluations exactly as in :mod:`dlsm.math.samplers`.

Device discipline as in :mod:`dlsm.math.samplers`: the noise levels are formed on the host in float64, rounded
to x's dtype, copied to x's device once; the loop makes no host-device synchronisation of its own.
"""

from __future__ import annotations

import math
from typing import Any

import gin
import torch
from tqdm.auto import tqdm

from dlsm.config import constrain, finite_nonnegative, finite_positive
from dlsm.errors import ConfigError
from dlsm.math.samplers import Callback, _noise
from dlsm.math.scores import ScoreFn

__all__ = ["heun_sampler", "karras_sigmas"]


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """The N = ``n`` EDM noise levels, descending, float64 (EDM eq. 5):

        sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,   i = 0..N-1,

    so sigma_0 = sigma_max and sigma_{N-1} = sigma_min; rho = 1 is a linear grid, larger rho packs the levels
    near sigma_min. The sampler appends sigma_N = 0 itself.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"karras_sigmas: n must be an integer >= 2, got {n!r}")
    if not (sigma_max > sigma_min > 0):
        raise ConfigError(f"karras_sigmas: need sigma_max > sigma_min > 0, got sigma_max={sigma_max}, "
                          f"sigma_min={sigma_min}")
    if not (rho > 0 and math.isfinite(rho)):
        raise ConfigError(f"karras_sigmas: rho must be a finite number > 0, got {rho}")
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    levels = (hi + ramp * (lo - hi)) ** rho
    levels[0], levels[-1] = sigma_max, sigma_min  # exact endpoints (the power of a root rounds)
    return levels


def _check(n_steps: int, sigma_min: float, sigma_max: float, rho: float, s_churn: float, s_noise: float) -> None:
    """One-line ConfigErrors naming the heun_sampler binding that is wrong."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 2:
        raise ConfigError(f"heun_sampler.n_steps must be an integer >= 2, got {n_steps!r}")
    if not (sigma_max > sigma_min > 0):
        raise ConfigError(f"heun_sampler needs sigmas[0] > sigmas[-1] > 0 (sigma_max > sigma_min), "
                          f"got sigma_max={sigma_max:.6g}, sigma_min={sigma_min:.6g}")
    if not (rho > 0 and math.isfinite(rho)):
        raise ConfigError(f"heun_sampler.rho must be a finite number > 0, got {rho}")
    if not (s_churn >= 0 and math.isfinite(s_churn)):
        raise ConfigError(f"heun_sampler.s_churn must be a finite number >= 0, got {s_churn}")
    if not (s_noise >= 0 and math.isfinite(s_noise)):
        raise ConfigError(f"heun_sampler.s_noise must be a finite number >= 0, got {s_noise}")


def _churned(levels: list[float], s_churn: float, s_tmin: float, s_tmax: float) -> list[float]:
    """EDM Algorithm 2's raised levels sigma_hat_i = (1 + gamma_i) sigma_i, i = 0..N-1, with
    gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0 (sigma_hat_i = sigma_i)."""
    n = len(levels) - 1  # the levels end with sigma_N = 0
    gamma = min(s_churn / n, math.sqrt(2.0) - 1.0)
    return [t * (1.0 + gamma) if gamma > 0 and s_tmin <= t <= s_tmax else t for t in levels[:-1]]


@gin.configurable
@torch.no_grad()
def heun_sampler(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    n_steps: int = 18,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic, ``s_churn = 0``) or Algorithm 2 (stochastic) on the VE probability-flow ODE.

    Only sigma_max = sigmas[0] and sigma_min = sigmas[-1] are read from ``sigmas``; the N = ``n_steps`` levels are
    :func:`karras_sigmas` (rho = ``rho``) followed by sigma_N = 0. Step i (sigma_i -> sigma_{i+1}), with
    sigma_hat = (1 + gamma_i) sigma_i and eps ~ N(0, S_noise^2 I) (no noise drawn where gamma_i = 0):

        x_hat  = x_i + sqrt(sigma_hat^2 - sigma_i^2) eps
        d      = -sigma_hat s(x_hat, sigma_hat)                          (dx/dsigma at sigma_hat)
        x_e    = x_hat + (sigma_{i+1} - sigma_hat) d                     (Euler)
        x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2,  d' = -sigma_{i+1} s(x_e, sigma_{i+1})   (Heun)

    except the last step, to sigma_N = 0, which stays Euler: 2N - 1 score evaluations in all. That last Euler step
    is x + sigma_{N-1}^2 s(x, sigma_{N-1}), Tweedie's denoising at sigma_min, so no separate denoise follows: the
    returned x is x_N at sigma = 0. ``callback`` sees {"i": i, "sigma": sigma_{i+1}, "x": x_{i+1}} after each step.
    """
    host = sigmas.detach().cpu()
    sigma_max, sigma_min = float(host[0]), float(host[-1])
    _check(n_steps, sigma_min, sigma_max, rho, s_churn, s_noise)
    # levels rounded to x's dtype on the host, so that the step sizes use the sigmas the score sees
    levels = torch.cat([karras_sigmas(sigma_min, sigma_max, n_steps, rho), torch.zeros(1, dtype=torch.float64)])
    hats = torch.tensor(_churned(levels.tolist(), s_churn, s_tmin, s_tmax), dtype=torch.float64)
    levels, hats = levels.to(x.dtype), hats.to(x.dtype)
    on_device = torch.cat([levels, hats]).to(x.device)
    t, t_hat = levels.tolist(), hats.tolist()
    b = x.shape[0]
    for i in tqdm(range(n_steps), desc="heun", leave=False, disable=disable):
        if t_hat[i] > t[i]:
            x = x + math.sqrt(t_hat[i] ** 2 - t[i] ** 2) * s_noise * _noise(x, generator)
        h = t[i + 1] - t_hat[i]
        d = -t_hat[i] * score_fn(x, on_device[n_steps + 1 + i].expand(b))
        x_next = x + h * d
        if t[i + 1] > 0:
            d_next = -t[i + 1] * score_fn(x_next, on_device[i + 1].expand(b))
            x_next = x + h * 0.5 * (d + d_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "sigma": t[i + 1], "x": x})
    return x


def _at_least_two(value: Any) -> str | None:
    """A range check for :func:`constrain`: an integer >= 2."""
    return "must be >= 2" if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 2 else None


# the same ranges, checked when the gin config is parsed (before anything trains)
constrain(heun_sampler, "n_steps", _at_least_two)
constrain(heun_sampler, "rho", finite_positive)
constrain(heun_sampler, "s_churn", finite_nonnegative)
constrain(heun_sampler, "s_noise", finite_nonnegative)
