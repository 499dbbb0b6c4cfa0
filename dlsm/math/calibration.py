"""Calibration of a noise-conditional classifier at one noise level: temperature scaling and its error.

Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017) replaces
p(y|x) = softmax(f(x))[y] by softmax(f(x) / tau)[y], with the one number tau > 0 that minimises the negative
log-likelihood on held-out data,

    NLL(tau) = -(1/N) sum_i log_softmax(f(x_i) / tau)[y_i].

It keeps the argmax (accuracy) and changes only how peaked the predictive distribution is. The guidance
:class:`dlsm.math.guidance.TemperatureGuidance` differentiates the tempered classifier, so tau scales the
likelihood score; this module fits tau and measures the calibration error before and after.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["calibration_error", "fit_temperature", "nll"]


def nll(logits: Tensor, y: Tensor, tau: float = 1.0) -> float:
    """NLL(tau) above, in float64."""
    return float(torch.nn.functional.cross_entropy(logits.double() / tau, y.long()))


def fit_temperature(logits: Tensor, y: Tensor, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """argmin_tau NLL(tau) over ``bounds``, searched in log tau by scipy's bounded Brent method (NLL is smooth
    and, in 1/tau, convex: the log-sum-exp of a linear function minus a linear function)."""
    from scipy.optimize import minimize_scalar

    lo, hi = bounds
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"fit_temperature: bounds must satisfy 0 < lo < hi < inf, got {bounds}")
    z, labels = logits.detach().double().cpu(), y.detach().long().cpu()
    res = minimize_scalar(lambda u: nll(z, labels, math.exp(u)), bounds=(math.log(lo), math.log(hi)),
                          method="bounded", options={"xatol": 1e-6})
    return float(math.exp(res.x))


def calibration_error(logits: Tensor, y: Tensor, *, tau: float = 1.0, n_bins: int = 15) -> float:
    """Expected calibration error of softmax(logits / tau): the confidence-binned |accuracy - confidence| weighted
    by the bins' shares (``n_bins`` equal-width bins; torchmetrics' ``multiclass_calibration_error``, L1 norm)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = torch.softmax(logits.detach().double().cpu() / tau, dim=-1)
    return float(multiclass_calibration_error(probs, y.detach().long().cpu(), num_classes=probs.shape[-1],
                                              n_bins=n_bins, norm="l1"))
