"""Score composition by Bayes' rule (DLSM paper, Background):

    grad log p_sigma(x|y) = grad log p_sigma(y|x) + grad log p_sigma(x)
    posterior_score       = alpha * likelihood_score + prior_score

alpha = 1 is the base method; alpha > 1 is the scaling method.
A *score function* here is any callable ``score_fn(x, sigma) -> tensor shaped like x``;
samplers take one, so the same sampler runs unconditional, guided or oracle sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import gin
import torch
from torch import nn

from dlsm.config import constrain, finite_positive

ScoreFn = Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]

__all__ = [
    "ExactLikelihoodScores",
    "ModelScores",
    "PosteriorSMScores",
    "ScoreFn",
    "likelihood_score",
    "likelihood_score_and_logits",
    "posterior_score",
    "posterior_score_fn",
]


@gin.configurable(allowlist=["softmax_eps"])
def likelihood_score_and_logits(
    classifier: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    y: torch.Tensor,
    *,
    create_graph: bool = False,
    softmax_eps: float | None = None,
    temperature: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x log p(y|x, sigma; theta), logits) from one classifier forward pass.

    With ``create_graph=True`` the gradient stays differentiable in theta (needed by DLSM').
    ``softmax_eps``: None (default) differentiates log p = log_softmax(logits)[y]; a number differentiates
    log(softmax(logits)[y] + eps), as the official DLSM code does with 1e-8 in its sampler and its DLSM' loss
    (``sampling.py``, ``sde_lib.py``, ``losses.py``). Its gradient is p / (p + eps) times the exact one, so the
    two agree where p(y|x) >> eps and the official one vanishes where the classifier is confidently wrong
    (``gin/eval_official.gin`` binds it; a gin binding reaches sampling, DLSM' and the mechanism metrics alike).
    ``temperature`` tau (a number or one per sample; :class:`dlsm.math.guidance.TemperatureGuidance`) differentiates
    the tempered classifier's log softmax(logits / tau)[y]; the returned logits are the untempered ones.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = classifier(x, sigma)
        tempered = logits if temperature is None else logits / torch.as_tensor(temperature).to(logits).reshape(-1, 1)
        if softmax_eps is None:
            log_p = torch.log_softmax(tempered, dim=-1).gather(-1, y[:, None]).sum()
        else:
            log_p = torch.log(torch.softmax(tempered, dim=-1).gather(-1, y[:, None]) + softmax_eps).sum()
        (grad,) = torch.autograd.grad(log_p, x, create_graph=create_graph)
    return grad, logits


constrain(likelihood_score_and_logits, "softmax_eps", finite_positive)


def likelihood_score(
    classifier: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, y: torch.Tensor
) -> torch.Tensor:
    """Likelihood score grad_x log p(y|x, sigma; theta), detached."""
    return likelihood_score_and_logits(classifier, x, sigma, y)[0].detach()


def posterior_score(
    score_model: nn.Module,
    classifier: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    y: torch.Tensor,
    *,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Posterior score s(x|y; theta, phi) = s(x; phi) + alpha * grad_x log p(y|x; theta)."""
    with torch.no_grad():
        prior = score_model(x, sigma)
    return prior + alpha * likelihood_score(classifier, x, sigma, y)


def posterior_score_fn(
    score_model: nn.Module, classifier: nn.Module, y: torch.Tensor, *, alpha: float = 1.0
) -> ScoreFn:
    """The posterior score for fixed labels ``y`` as a sampler-ready ``score_fn(x, sigma)``."""

    def score_fn(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return posterior_score(score_model, classifier, x, sigma, y, alpha=alpha)

    return score_fn


def _eval(net):
    """``net`` in eval mode (a plain function, e.g. a closed-form score in a test, is returned as it is)."""
    return net.eval() if isinstance(net, nn.Module) else net


class ModelScores:
    """Prior, likelihood and posterior scores of a (score model, classifier) pair under a guidance.

    ``guidance`` (:mod:`dlsm.math.guidance`) gives the likelihood term w(x, sigma) grad log p(y|x, sigma; theta);
    without one, alpha grad log p(y|x, sigma; theta), which :class:`~dlsm.math.guidance.ConstantGuidance` computes
    too. ``likelihood`` returns that *effective* term (zeros where the guidance is off), so that posterior = prior +
    likelihood holds for every guidance; where the guidance is off the posterior is the prior score itself.

    Both networks are put in eval mode: a BatchNorm classifier then uses its running statistics, so the score
    of one sample does not depend on the other samples of its batch (training mode would make
    grad_x log p(y|x_i) a function of the whole batch, and the sampler's batch size part of the model).
    """

    def __init__(
        self, score_model: nn.Module, classifier: nn.Module, *, alpha: float = 1.0, guidance: object | None = None
    ) -> None:
        self.score_model, self.classifier, self.guidance = _eval(score_model), _eval(classifier), guidance
        self.alpha = alpha if guidance is None else guidance.alpha

    def prior(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        with torch.no_grad():
            return self.score_model(x, sigma)

    labels_per_sample = True  # y may be a tensor of one label per sample (sampling units that pack classes)

    def _term(self, x: torch.Tensor, sigma: torch.Tensor | float, y: int | torch.Tensor) -> torch.Tensor | None:
        if isinstance(y, torch.Tensor):
            labels = y.to(device=x.device, dtype=torch.long)
        else:
            labels = torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)
        if self.guidance is None:
            return self.alpha * likelihood_score(self.classifier, x, sigma, labels)
        return self.guidance(self.classifier, x, sigma, labels)

    def likelihood(self, x: torch.Tensor, sigma: torch.Tensor | float, y: int | torch.Tensor) -> torch.Tensor:
        term = self._term(x, sigma, y)
        return torch.zeros_like(x) if term is None else term

    def posterior(self, x: torch.Tensor, sigma: torch.Tensor | float, y: int | torch.Tensor) -> torch.Tensor:
        prior = self.prior(x, sigma)
        term = self._term(x, sigma, y)
        return prior if term is None else prior + term

    def posterior_fn(self, y: int | torch.Tensor) -> ScoreFn:
        return lambda x, sigma: self.posterior(x, sigma, y)


class ExactLikelihoodScores:
    """The prior model with a perfect classifier: s(x; phi) + alpha grad_x log p_sigma(y|x), the likelihood term of
    the Parzen oracle of the training data (``oracle``: :class:`dlsm.math.oracle.OracleScores`; its Bayes-rule
    likelihood, Eq. (2) of the DLSM paper with exact densities). The sanity row "what would a perfect classifier
    buy with this score model and sampler" of a Table 2 reproduction."""

    def __init__(self, score_model: nn.Module, oracle, *, alpha: float = 1.0) -> None:
        self.score_model, self.oracle, self.alpha = _eval(score_model), oracle, alpha

    def prior(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        with torch.no_grad():
            return self.score_model(x, sigma)

    def likelihood(self, x: torch.Tensor, sigma: torch.Tensor | float, y: int) -> torch.Tensor:
        return self.alpha * self.oracle.likelihood(x, sigma, y)

    def posterior(self, x: torch.Tensor, sigma: torch.Tensor | float, y: int) -> torch.Tensor:
        return self.prior(x, sigma) + self.likelihood(x, sigma, y)

    def posterior_fn(self, y: int) -> ScoreFn:
        return lambda x, sigma: self.posterior(x, sigma, y)


class PosteriorSMScores:
    """Method (c) of the DLSM paper, "posterior SM": one DSM score model per class,
    s(x; phi_c) ~ grad log p_sigma(x|y=c); the prior is the unconditional score model s(x; phi)
    and the likelihood term is what Bayes' rule leaves, posterior - prior.
    """

    def __init__(self, score_model: nn.Module, class_models: list[nn.Module]) -> None:
        self.score_model, self.class_models = score_model, class_models

    def prior(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        with torch.no_grad():
            return self.score_model(x, sigma)

    def posterior(self, x: torch.Tensor, sigma: torch.Tensor | float, y: int) -> torch.Tensor:
        with torch.no_grad():
            return self.class_models[y](x, sigma)

    def likelihood(self, x: torch.Tensor, sigma: torch.Tensor | float, y: int) -> torch.Tensor:
        return self.posterior(x, sigma, y) - self.prior(x, sigma)

    def posterior_fn(self, y: int) -> ScoreFn:
        return lambda x, sigma: self.posterior(x, sigma, y)
