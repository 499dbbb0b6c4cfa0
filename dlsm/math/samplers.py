"""Samplers as pure functions of (score_fn, initial x, descending sigmas, generator).

``score_fn(x, sigma)`` may be a prior score model, a posterior (guided) score or an oracle;
guidance is therefore available to every sampler. Nothing here touches global RNG state:
all noise comes from ``generator``, a torch.Generator on x's device (see :func:`dlsm.train.device.make_generator`).

Device discipline: the noise is drawn on x's device (float32, then cast to x's dtype, so that CPU runs give
the numbers of a CPU float32 stream for every dtype); ``sigmas`` is copied to x's device once and the
per-level scalars (step sizes, sigma_i^2) are read to the host once, so the loops themselves make no
host-device synchronisation other than what ``score_fn`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import gin
import torch
from tqdm.auto import tqdm

from dlsm.math.schedules import langevin_step_sizes
from dlsm.math.scores import ScoreFn

__all__ = ["annealed_langevin", "predictor_corrector", "prior_sample"]

Callback = Callable[[dict], None]


def prior_sample(
    shape: tuple[int, ...],
    sigma_max: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """x_0 ~ N(0, sigma_max^2 I), the VE prior (data are centred), float32 on ``device``.

    ``device`` defaults to the generator's device, else the CPU; ``generator`` must live on ``device``.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return sigma_max * torch.randn(shape, generator=generator, device=device)


def _levels(sigmas: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigmas`` on x's device and dtype, and on the host: at most one copy each way, before the loop."""
    return sigmas.to(x), sigmas.detach().cpu()


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) of x's shape, drawn on x's device in float32 and cast to x's dtype."""
    return torch.randn(x.shape, generator=generator, device=x.device).to(x.dtype)


@gin.configurable
@torch.no_grad()
def annealed_langevin(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eps: float,
    n_steps_each: int = 5,
    burn_in: int = 0,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Annealed Langevin dynamics (NCSNv2, Algorithm 1).

    For each level sigma_i (descending) take T = ``n_steps_each`` steps
        x <- x + alpha_i s(x, sigma_i) + sqrt(2 alpha_i) z,   alpha_i = eps sigma_i^2 / sigma_L^2,
    then, if ``denoise``, return Tweedie's estimate x + sigma_L^2 s(x, sigma_L).
    ``burn_in`` extra steps at sigma_1 come first, so that x starts from the sigma_max marginal
    p_sigma_1(x) rather than from the Gaussian prior.
    """
    levels, on_host = _levels(sigmas, x)
    host, step_sizes = on_host.tolist(), langevin_step_sizes(on_host, eps).tolist()
    n = x.shape[0]
    for i in tqdm(range(len(host)), desc="langevin", leave=False, disable=disable):
        sigma = levels[i].expand(n)
        alpha = step_sizes[i]
        for _ in range(n_steps_each + (burn_in if i == 0 else 0)):
            z = _noise(x, generator)
            x = x + alpha * score_fn(x, sigma) + (2.0 * alpha) ** 0.5 * z
        if callback is not None:
            callback({"i": i, "sigma": host[i], "x": x})
    if denoise:
        x = x + host[-1] ** 2 * score_fn(x, levels[-1].expand(n))
    return x


@gin.configurable
@torch.no_grad()
def predictor_corrector(
    score_fn: ScoreFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    burn_in: int = 0,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Predictor-corrector sampling for the VE SDE (Song et al., 2021, Algorithms 2-3).

    At each sigma_i: ``n_corrector_steps`` Langevin corrector steps with step
    2 (snr ||z|| / ||s||)^2, then the reverse-diffusion predictor to sigma_{i+1} (0 after the last):
        x <- x + (sigma_i^2 - sigma_{i+1}^2) s(x, sigma_i) + sqrt(sigma_i^2 - sigma_{i+1}^2) z.
    With ``denoise`` the last predictor adds no noise, i.e. returns x + sigma_L^2 s(x, sigma_L).
    ``burn_in`` extra corrector steps at sigma_1 come first (start from the sigma_max marginal).
    """
    levels, on_host = _levels(sigmas, x)
    host = on_host.tolist()
    n = len(host)
    for i in tqdm(range(n), desc="pc", leave=False, disable=disable):
        sigma = levels[i].expand(x.shape[0])
        for _ in range(n_corrector_steps + (burn_in if i == 0 else 0)):
            score = score_fn(x, sigma)
            z = _noise(x, generator)
            score_norm = score.reshape(x.shape[0], -1).norm(dim=1).mean()
            noise_norm = z.reshape(x.shape[0], -1).norm(dim=1).mean()
            step = 2.0 * (snr * noise_norm / score_norm.clamp_min(1e-12)) ** 2  # a tensor on x's device: no sync
            x = x + step * score + (2.0 * step).sqrt() * z
        next_sigma2 = host[i + 1] ** 2 if i + 1 < n else 0.0
        var = host[i] ** 2 - next_sigma2
        x = x + var * score_fn(x, sigma)
        if i + 1 < n or not denoise:
            x = x + var**0.5 * _noise(x, generator)
        if callback is not None:
            callback({"i": i, "sigma": host[i], "x": x})
    return x
