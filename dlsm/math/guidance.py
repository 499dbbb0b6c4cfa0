"""Guidance: where, and how strongly, the likelihood score steers sampling.

Every sampler follows a posterior score (:mod:`dlsm.math.scores`)

    s(x|y) = s(x; phi) + w(x, sigma) grad_x log p_tau(y|x, sigma; theta),
    log p_tau(y|x, sigma; theta) = log_softmax(f(x, sigma; theta) / tau(sigma))[y],

the DLSM paper's Bayes rule (eq. 4) with a guidance weight w (alpha in the paper: w = 1 is the base method,
w = alpha > 1 the scaling method) and a classifier temperature tau (1 in the paper). A guidance object
computes the whole likelihood term ``w * grad``; :class:`~dlsm.math.scores.ModelScores` adds it to the prior
score, and the samplers (Langevin, predictor-corrector, Heun) only ever call that posterior score with the sigma
of the evaluation at hand. So every sampler applies every guidance the same way, at each of its score
evaluations. ``None`` from a guidance means "no guidance at this sigma": the posterior score is then the prior
score itself, and the classifier is not run.

The schedules (gin: ``experiment.sampling_methods = {'name': ('ce', @interval/interval_guidance()), ...}``; a
plain number alpha there is :class:`ConstantGuidance`):

- :class:`ConstantGuidance`: w = alpha (the paper; bit for bit the samples of a constant alpha before);
- :class:`IntervalGuidance`: w = alpha for sigma_lo <= sigma <= sigma_hi, else 0 (Kynkaanniemi et al., 2024);
- :class:`PowerGuidance`: w = alpha (sigma / sigma_ref)^power, a smooth alpha(sigma);
- :class:`EntropyGuidance`: w = min(alpha log C / H(p(y|x, sigma)), cap) per sample (Zheng et al., 2022);
- :class:`TemperatureGuidance`: w = alpha with tau(sigma) fitted on held-out data by minimising the NLL
  (``calibrate_temperature`` in :mod:`dlsm.stages.calibrate`, :func:`dlsm.math.calibration.fit_temperature`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import gin
import torch
from torch import Tensor, nn

from dlsm.errors import ConfigError
from dlsm.math.scores import likelihood_score, likelihood_score_and_logits

__all__ = [
    "ConstantGuidance", "EntropyGuidance", "Guidance", "IntervalGuidance", "PowerGuidance", "TemperatureGuidance",
    "as_guidance",
]


def _sigmas(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as one value per sample, shape (B,), on x's device and in x's dtype."""
    s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    return s.expand(x.shape[0]) if s.dim() == 0 else s.reshape(x.shape[0])


def _per_sample(w: Tensor, grad: Tensor) -> Tensor:
    """w_i * grad_i for a weight per sample, w of shape (B,)."""
    return w.to(grad.dtype).reshape(-1, *([1] * (grad.dim() - 1))) * grad


def _finite(name: str, value: float, *, positive: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


class Guidance:
    """The likelihood term w * grad_x log p_tau(y|x, sigma; theta) of the posterior score (module docstring).

    ``guidance(classifier, x, sigma, y)``: ``x`` (B, ...), ``sigma`` a number or one per sample, ``y`` (B,) int64
    labels; returns a tensor shaped like ``x``, or None where no sample is guided (the posterior is the prior)."""

    alpha: float

    def __call__(self, classifier: nn.Module, x: Tensor, sigma: Tensor | float, y: Tensor) -> Tensor | None:
        raise NotImplementedError

    def check(self, sigma_min: float, sigma_max: float, num_classes: int) -> None:
        """Refuse, in one line, a guidance that cannot act on this experiment (the schedule's [sigma_min, sigma_max]
        and the class count); :func:`dlsm.preflight.check_guidance` calls it before anything trains."""

    def as_params(self) -> dict[str, object]:
        """What places this guidance among the others, for MLflow params: its kind and its settings."""
        return {"guidance": type(self).__name__.removesuffix("Guidance").lower(),
                **{f"guidance.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}}


@gin.configurable("constant_guidance")
@dataclass(frozen=True)
class ConstantGuidance(Guidance):
    """w = alpha at every sigma: the DLSM paper's posterior score s(x; phi) + alpha grad log p(y|x, sigma; theta)
    (eq. 4; alpha = 1 base, alpha > 1 the scaling method)."""

    alpha: float = 1.0

    def __post_init__(self) -> None:
        _finite("constant_guidance.alpha", self.alpha)

    def __call__(self, classifier: nn.Module, x: Tensor, sigma: Tensor | float, y: Tensor) -> Tensor:
        return self.alpha * likelihood_score(classifier, x, sigma, y)


@gin.configurable("interval_guidance")
@dataclass(frozen=True)
class IntervalGuidance(Guidance):
    """w = alpha where sigma_lo <= sigma <= sigma_hi, else 0: guidance in a limited interval of noise levels
    (Kynkaanniemi et al., "Applying guidance in a limited interval improves sample and distribution quality in
    diffusion models", NeurIPS 2024). Outside the interval the posterior score is exactly the prior score and the
    classifier is not evaluated. The edges are compared in x's dtype (as the sampler's sigmas are)."""

    alpha: float = 1.0
    sigma_lo: float = 0.0
    sigma_hi: float = math.inf

    def __post_init__(self) -> None:
        _finite("interval_guidance.alpha", self.alpha)
        if not (self.sigma_lo >= 0 and self.sigma_hi > self.sigma_lo) or math.isnan(self.sigma_hi):
            raise ConfigError(f"interval_guidance needs 0 <= sigma_lo < sigma_hi, got sigma_lo={self.sigma_lo}, "
                              f"sigma_hi={self.sigma_hi}")

    def check(self, sigma_min: float, sigma_max: float, num_classes: int) -> None:
        """An interval that misses [sigma_min, sigma_max] would sample the prior alone under a guided method's name:
        refused (an unconditional row is ``('ce', 0.0)``)."""
        if self.sigma_lo > sigma_max or self.sigma_hi < sigma_min:
            raise ConfigError(f"interval_guidance [{self.sigma_lo:g}, {self.sigma_hi:g}] lies outside the noise "
                              f"schedule's [{sigma_min:.4g}, {sigma_max:.4g}]: it would never guide")

    def __call__(self, classifier: nn.Module, x: Tensor, sigma: Tensor | float, y: Tensor) -> Tensor | None:
        s = _sigmas(sigma, x)
        inside = (s >= self.sigma_lo) & (s <= self.sigma_hi)
        if not bool(inside.any()):  # one host sync per score evaluation; samplers pass one sigma for the batch
            return None
        grad = likelihood_score(classifier, x, sigma, y)
        if bool(inside.all()):
            return self.alpha * grad
        return _per_sample(self.alpha * inside.to(grad.dtype), grad)


@gin.configurable("power_guidance")
@dataclass(frozen=True)
class PowerGuidance(Guidance):
    """w(sigma) = alpha (sigma / sigma_ref)^power, a smooth alpha(sigma): power > 0 guides most at large sigma
    (where the sample's class is decided), power < 0 at small sigma; power = 0 is :class:`ConstantGuidance`."""

    alpha: float = 1.0
    power: float = 1.0
    sigma_ref: float = 1.0

    def __post_init__(self) -> None:
        _finite("power_guidance.alpha", self.alpha)
        _finite("power_guidance.sigma_ref", self.sigma_ref, positive=True)
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or not math.isfinite(self.power):
            raise ConfigError(f"power_guidance.power must be a finite number, got {self.power!r}")

    def __call__(self, classifier: nn.Module, x: Tensor, sigma: Tensor | float, y: Tensor) -> Tensor:
        w = self.alpha * (_sigmas(sigma, x).double() / self.sigma_ref) ** self.power
        return _per_sample(w, likelihood_score(classifier, x, sigma, y))


@gin.configurable("entropy_guidance")
@dataclass(frozen=True)
class EntropyGuidance(Guidance):
    """w_i = min(alpha log C / H(p(.|x_i, sigma)), cap) per sample, H the entropy of the classifier's predictive
    distribution over the C classes: guidance grows as the classifier grows confident (H -> 0) and is alpha where it
    is uniform (H = log C). Entropy-driven sampling (Zheng et al., "Entropy-driven sampling and training scheme
    for conditional diffusion generation", ECCV 2022). The weight is a number per sample (not differentiated)."""

    alpha: float = 1.0
    cap: float = 10.0

    def __post_init__(self) -> None:
        _finite("entropy_guidance.alpha", self.alpha)
        _finite("entropy_guidance.cap", self.cap, positive=True)

    def check(self, sigma_min: float, sigma_max: float, num_classes: int) -> None:
        if num_classes < 2:
            raise ConfigError(f"entropy_guidance needs at least 2 classes (log C / H is 0 / 0 with one), got "
                              f"{num_classes}")

    def __call__(self, classifier: nn.Module, x: Tensor, sigma: Tensor | float, y: Tensor) -> Tensor:
        grad, logits = likelihood_score_and_logits(classifier, x, sigma, y)
        log_p = torch.log_softmax(logits.detach().double(), dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        w = (self.alpha * math.log(logits.shape[-1]) / entropy).clamp(max=self.cap)  # H = 0: inf, then the cap
        return _per_sample(w, grad.detach())


@gin.configurable("temperature_guidance")
@dataclass(frozen=True)
class TemperatureGuidance(Guidance):
    """w = alpha and the likelihood of a tempered classifier, grad_x log_softmax(f(x, sigma) / tau(sigma))[y]
    (temperature scaling, Guo et al., "On calibration of modern neural networks", ICML 2017, here per noise level).
    ``taus`` = ((sigma_1, tau_1), ...) are fitted on held-out data by ``calibrate_temperature``, which fills them
    in; between two fitted sigmas log tau is linear in log sigma, beyond the ends it is the end's tau."""

    alpha: float = 1.0
    taus: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        _finite("temperature_guidance.alpha", self.alpha)
        for sigma, tau in self.taus or ():
            _finite("temperature_guidance sigma", sigma, positive=True)
            _finite("temperature_guidance tau", tau, positive=True)

    def with_taus(self, taus: tuple[tuple[float, float], ...]) -> TemperatureGuidance:
        return dataclasses.replace(self, taus=tuple(sorted((float(s), float(t)) for s, t in taus)))

    def tau(self, sigma: Tensor) -> Tensor:
        """tau(sigma) per sample (float64), interpolated as the class docstring says."""
        if not self.taus:
            raise ConfigError("temperature_guidance has no fitted temperatures: list calibrate_temperature in "
                              "experiment.stages after train_classifiers and before sample")
        log_s = torch.tensor([math.log(s) for s, _ in self.taus], dtype=torch.float64, device=sigma.device)
        log_t = torch.tensor([math.log(t) for _, t in self.taus], dtype=torch.float64, device=sigma.device)
        q = sigma.double().log().clamp(log_s[0], log_s[-1])
        if len(self.taus) == 1:
            return log_t[0].exp().expand_as(q)
        i = torch.searchsorted(log_s, q, right=True).clamp(1, len(self.taus) - 1)
        frac = (q - log_s[i - 1]) / (log_s[i] - log_s[i - 1])
        return (log_t[i - 1] + frac * (log_t[i] - log_t[i - 1])).exp()

    def __call__(self, classifier: nn.Module, x: Tensor, sigma: Tensor | float, y: Tensor) -> Tensor:
        tau = self.tau(_sigmas(sigma, x)).to(x.dtype)
        return self.alpha * likelihood_score_and_logits(classifier, x, sigma, y, temperature=tau)[0].detach()

    def as_params(self) -> dict[str, object]:
        return {"guidance": "temperature", "guidance.alpha": self.alpha}  # the fitted taus are logged as metrics


def as_guidance(value: float | Guidance, where: str = "alpha") -> Guidance:
    """A guidance from a sampling method's setting: a number alpha is :class:`ConstantGuidance` (alpha)."""
    if isinstance(value, Guidance):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number alpha or a guidance (@interval_guidance() ...), got {value!r}")
    return ConstantGuidance(float(value))
