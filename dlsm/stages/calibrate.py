"""Calibration (child run ``calibration``): each trained classifier's temperature per noise level, fitted on the
held-out split, for :class:`dlsm.math.guidance.TemperatureGuidance` (a candidate cause of weak guidance: a
classifier whose p(y|x, sigma) is too flat has a likelihood score too small by the same factor)."""

from __future__ import annotations

import time

import gin
import torch

from dlsm import config as cfg
from dlsm.errors import ConfigError
from dlsm.math.calibration import calibration_error, fit_temperature, nll
from dlsm.stages.base import Run, State, method_key
from dlsm.stages.evaluate import test_split

__all__ = ["calibrate_temperature"]


def _logits(clf: torch.nn.Module, x: torch.Tensor, sigma: float, device: torch.device, chunk: int = 500):
    """The classifier's logits at ``sigma`` in eval mode (running BatchNorm statistics), on the CPU."""
    was_training = clf.training
    clf.eval()
    out = []
    with torch.no_grad():
        for part in x.split(chunk):
            s = torch.full((part.shape[0],), float(sigma), device=device)
            out.append(clf(part.to(device), s).float().cpu())
    clf.train(was_training)
    return torch.cat(out)


@gin.configurable(denylist=["run", "state"])
def calibrate_temperature(
    run: Run, state: State, *, sigmas: tuple[float, ...] | None = None, n_points: int | None = None,
    n_bins: int = 15, bounds: tuple[float, float] = (0.05, 20.0),
) -> State:
    """Fit tau(sigma) per classifier by minimising the NLL (:func:`dlsm.math.calibration.fit_temperature`) on the
    even-numbered points of the held-out split (the first ``n_points``; all by default) noised to each sigma of
    ``sigmas`` (default: every level of the noise schedule), and measure the calibration error before and after on
    the odd-numbered ones. Metrics per classifier and sigma:
    ``{clf}/calibration/{tau,nll,nll_tau,ece,ece_tau}/s{sigma}`` (NLL and ECE on the check half, ``_tau`` after
    scaling). The same points and noise for every classifier. The
    fitted ((sigma, tau), ...) go to ``state.temperatures`` for the temperature guidance of ``sample``."""
    test = test_split(run, state)()
    if test is None or not hasattr(test, "batch"):
        raise ConfigError("calibrate_temperature needs a held-out split (the dataset's split='test')")
    levels = [float(s) for s in (sigmas if sigmas is not None else state.schedule.sigmas.tolist())]
    n = len(test) if n_points is None else min(int(n_points), len(test))
    if n < 4:
        raise ConfigError(f"calibrate_temperature needs at least 4 held-out points, got {n}")
    x0, y = (t.cpu() for t in test.batch(torch.arange(n)))
    fit, check = slice(0, None, 2), slice(1, None, 2)
    g = torch.Generator().manual_seed(run.seed(707))
    with run.tracker.stage(run.parent_id, "calibration"):
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        noise = {sigma: torch.randn(x0.shape, generator=g) for sigma in levels}  # the same for every classifier
        for shape, per_loss in state.classifiers.items():
            for loss, clf in per_loss.items():
                key, fitted = method_key(loss, shape), []
                for sigma in levels:
                    logits = _logits(clf, x0 + sigma * noise[sigma], sigma, run.device)
                    tau = fit_temperature(logits[fit], y[fit], bounds=bounds)
                    fitted.append((sigma, tau))
                    lc, yc = logits[check], y[check]
                    metrics |= {f"{key}/calibration/tau/s{sigma:g}": tau,
                                f"{key}/calibration/nll/s{sigma:g}": nll(lc, yc),
                                f"{key}/calibration/nll_tau/s{sigma:g}": nll(lc, yc, tau),
                                f"{key}/calibration/ece/s{sigma:g}": calibration_error(lc, yc, n_bins=n_bins),
                                f"{key}/calibration/ece_tau/s{sigma:g}": calibration_error(lc, yc, tau=tau,
                                                                                           n_bins=n_bins)}
                state.temperatures[key] = tuple(fitted)
        run.tracker.log_metrics(metrics)
        run.tracker.log_metrics({"wall_seconds": time.perf_counter() - t0})
    state.metrics.update(metrics)
    return state


def _bounds_error(value: object) -> str | None:
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and 0 < value[0] < value[1] < 1e300
    return None if ok else "must be (lo, hi) temperatures with 0 < lo < hi, e.g. (0.05, 20.0)"


cfg.constrain(calibrate_temperature, "bounds", _bounds_error)  # checked when the config is parsed
cfg.constrain(calibrate_temperature, "n_points", lambda v: None if v is None else cfg.positive_int(v))
cfg.constrain(calibrate_temperature, "n_bins", cfg.positive_int)
