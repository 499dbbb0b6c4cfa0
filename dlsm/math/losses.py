"""Training losses as plain functions returning a per-example loss (the trainer takes the mean).

Notation (DLSM paper): x ~ p(x, y), noise z ~ N(0, I), x~ = x + sigma z, and
grad_x~ log p_sigma(x~|x) = (x - x~)/sigma^2 = -z/sigma. Each loss carries a sigma-weighting
lambda(sigma) = sigma**weight_power, bindable in gin.

Classifier losses share one signature ``(classifier, score_model, x, y, sigma, noise)``;
CE ignores ``score_model``.

DLSM' reduces the squared residual over the D data dimensions by a sum (``reduce='sum'``, the paper's
||.||^2, this project's default, with lambda(sigma) = sigma^2) or by a mean (``reduce='mean'``: the official
DLSM code's ``torch.mean(0.5 * square(...))`` over pixels, with ``weighting_dlsm = 0``, i.e. weight_power 0).
The two differ by the factor D / sigma^2, which changes the balance of DLSM' against lambda CE in L_Total.
"""

from __future__ import annotations

import gin
import torch
from torch import nn

from dlsm.config import constrain, finite_nonnegative
from dlsm.math.scores import likelihood_score_and_logits

__all__ = ["ce_loss", "dlsm_loss", "dsm_loss", "perturb", "sigma_weight", "total_loss"]


def perturb(x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x~ = x + sigma z, with per-example sigma of shape (B,)."""
    return x + _bcast(sigma, x) * noise


def sigma_weight(sigma: torch.Tensor, weight_power: float) -> torch.Tensor:
    """lambda(sigma) = sigma**weight_power (0: no weighting; 2: NCSNv2's sigma^2)."""
    return sigma**weight_power


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def _sq_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-example ||v||^2, accumulated in float32 at least (bf16 network outputs under autocast included)."""
    v = v.reshape(v.shape[0], -1)
    return v.to(torch.promote_types(v.dtype, torch.float32)).pow(2).sum(dim=1)


_REDUCE = ("sum", "mean")


def _reduce(sq: torch.Tensor, dim: int, reduce: str) -> torch.Tensor:
    """The per-example squared norm ``sq`` as a sum over the ``dim`` data dimensions, or their mean."""
    if reduce == "sum":
        return sq
    if reduce == "mean":
        return sq / dim
    raise ValueError(f"reduce must be one of {list(_REDUCE)}, got {reduce!r}")


def _check_reduce(value: object) -> str | None:
    return None if value in _REDUCE else f"must be one of {list(_REDUCE)}"


@gin.configurable
def dsm_loss(
    score_model: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    *,
    weight_power: float = 2.0,
) -> torch.Tensor:
    """DSM (Vincent 2011): 1/2 lambda(sigma) ||s(x~, sigma; phi) - grad_x~ log p_sigma(x~|x)||^2.

    With lambda = sigma^2 this is NCSNv2's 1/2 ||sigma s(x~, sigma) + z||^2.
    """
    x_tilde = perturb(x, sigma, noise)
    target = -noise / _bcast(sigma, x)
    return 0.5 * sigma_weight(sigma, weight_power) * _sq_norm(score_model(x_tilde, sigma) - target)


@gin.configurable
def ce_loss(
    classifier: nn.Module,
    score_model: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    *,
    weight_power: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy L_CE(theta) = -lambda(sigma) log p(y|x~, sigma; theta)."""
    logits = classifier(perturb(x, sigma, noise), sigma)
    return sigma_weight(sigma, weight_power) * nn.functional.cross_entropy(logits, y, reduction="none")


def _dlsm_terms(
    classifier: nn.Module,
    score_model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(||grad log p(y|x~;theta) + s(x~;phi) - grad log p_sigma(x~|x)||^2, CE) from one forward pass."""
    x_tilde = perturb(x, sigma, noise)
    with torch.no_grad():  # stage 2: the score model is frozen
        prior = score_model(x_tilde, sigma)
    grad, logits = likelihood_score_and_logits(classifier, x_tilde, sigma, y, create_graph=True)
    residual = grad + prior + noise / _bcast(sigma, x)
    return _sq_norm(residual), nn.functional.cross_entropy(logits, y, reduction="none")


@gin.configurable
def dlsm_loss(
    classifier: nn.Module,
    score_model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    *,
    weight_power: float = 2.0,
    reduce: str = "sum",
) -> torch.Tensor:
    """DLSM' (DLSM paper, eq. L_DLSM'):
    1/2 lambda(sigma) ||grad_x~ log p(y|x~; theta) + s(x~; phi) - grad_x~ log p_sigma(x~|x)||^2,
    with s(.; phi) frozen and the classifier's input gradient taken with create_graph=True.
    ``reduce='mean'`` divides the squared norm by D (the official code's per-pixel mean; module docstring).
    """
    sq, _ = _dlsm_terms(classifier, score_model, x, y, sigma, noise)
    return 0.5 * sigma_weight(sigma, weight_power) * _reduce(sq, x[0].numel(), reduce)


@gin.configurable
def total_loss(
    classifier: nn.Module,
    score_model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    *,
    lam: float = 1.0,
    weight_power: float = 2.0,
    ce_weight_power: float = 0.0,
    reduce: str = "sum",
) -> torch.Tensor:
    """L_Total(theta) = L_DLSM'(theta) + lambda L_CE(theta) (DLSM paper), one classifier forward pass;
    ``weight_power`` and ``reduce`` are DLSM''s (see :func:`dlsm_loss`)."""
    sq, ce = _dlsm_terms(classifier, score_model, x, y, sigma, noise)
    dlsm = 0.5 * sigma_weight(sigma, weight_power) * _reduce(sq, x[0].numel(), reduce)
    return dlsm + lam * sigma_weight(sigma, ce_weight_power) * ce


constrain(total_loss, "lam", finite_nonnegative)  # lambda >= 0, checked when the gin config is parsed
constrain(total_loss, "reduce", _check_reduce)
constrain(dlsm_loss, "reduce", _check_reduce)
