"""Guided scores (dlsm.math.scores) against the closed-form scores of a noisy Gaussian mixture, in float64.

Data: p(x, y=k) = pi_k N(x; mu_k, s_k^2 I) in D dimensions. With VE noise of level sigma the noisy
marginals stay Gaussian, p_sigma(x|k) = N(x; mu_k, v_k I) with v_k = s_k^2 + sigma^2, so

    log p_sigma(y|x)        = log pi_y + log N(x; mu_y, v_y I) - log sum_k pi_k N(x; mu_k, v_k I)
    grad_x log p_sigma(y|x) = -(x - mu_y)/v_y + sum_k p(k|x) (x - mu_k)/v_k
    grad_x log p_sigma(x|y) = -(x - mu_y)/v_y
    grad_x log p_sigma(x)   = -sum_k p(k|x) (x - mu_k)/v_k.

The library differentiates a classifier by autograd; the exact noisy-mixture classifier below gives it
logits_k = log pi_k + log N(x; mu_k, v_k I). The references are the formulas above, written out in numpy
with an explicit loop over components, and are themselves checked against central finite differences of the
numpy log-densities (:func:`test_closed_forms_match_finite_differences`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dlsm.math.oracle import OracleScores, parzen_score
from dlsm.math.scores import (
    ExactLikelihoodScores,
    ModelScores,
    likelihood_score,
    likelihood_score_and_logits,
    posterior_score,
    posterior_score_fn,
)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _sigma_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])


class MixtureClassifier(nn.Module):
    """The exact noisy classifier of the mixture: logits_k = log pi_k + log N(x; mu_k, (s_k^2 + sigma^2) I)."""

    def __init__(self, pi: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("log_pi", pi.log())
        self.register_buffer("mu", mu)  # (K, D)
        self.register_buffer("s", s)  # (K,)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        v = self.s[None, :] ** 2 + _sigma_batch(sigma, x)[:, None] ** 2  # (B, K)
        d2 = (x[:, None, :] - self.mu[None]).pow(2).sum(-1)
        dim = x.shape[1]
        return self.log_pi[None] - 0.5 * dim * torch.log(2.0 * math.pi * v) - d2 / (2.0 * v)


class MixtureScore(nn.Module):
    """The exact prior score of the noisy mixture, grad log sum_k pi_k N(x; mu_k, v_k I)."""

    def __init__(self, clf: MixtureClassifier) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        v = self.clf.s[None, :] ** 2 + _sigma_batch(sigma, x)[:, None] ** 2
        resp = torch.softmax(self.clf(x, sigma), dim=1)  # p(k|x)
        return -(resp[:, :, None] * (x[:, None, :] - self.clf.mu[None]) / v[:, :, None]).sum(1)


# ---- numpy float64 references -------------------------------------------------------------------


def _log_joint(x: np.ndarray, pi, mu, s, sigma: np.ndarray) -> np.ndarray:
    """log pi_k + log N(x; mu_k, v_k I), shape (B, K), one component at a time."""
    dim = x.shape[1]
    cols = []
    for k in range(len(pi)):
        v = s[k] ** 2 + sigma**2
        cols.append(np.log(pi[k]) - 0.5 * dim * np.log(2 * np.pi * v) - ((x - mu[k]) ** 2).sum(1) / (2 * v))
    return np.stack(cols, axis=1)


def _responsibilities(x, pi, mu, s, sigma) -> np.ndarray:
    lj = _log_joint(x, pi, mu, s, sigma)
    lj = lj - lj.max(1, keepdims=True)
    w = np.exp(lj)
    return w / w.sum(1, keepdims=True)


def _class_score(x, mu, s, sigma, y: int) -> np.ndarray:
    """grad log p_sigma(x|y) = -(x - mu_y)/v_y."""
    return -(x - mu[y]) / (s[y] ** 2 + sigma[:, None] ** 2)


def _prior_score(x, pi, mu, s, sigma) -> np.ndarray:
    r = _responsibilities(x, pi, mu, s, sigma)
    out = np.zeros_like(x)
    for k in range(len(pi)):
        out -= r[:, k : k + 1] * (x - mu[k]) / (s[k] ** 2 + sigma[:, None] ** 2)
    return out


def _likelihood_score(x, pi, mu, s, sigma, y: int) -> np.ndarray:
    """grad log p_sigma(y|x) = -(x - mu_y)/v_y + sum_k p(k|x) (x - mu_k)/v_k."""
    return _class_score(x, mu, s, sigma, y) - _prior_score(x, pi, mu, s, sigma)


def _problem(seed: int, k: int, dim: int, batch: int, sigma: float, per_example: bool):
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(k)) * 0.9 + 0.1 / k  # no vanishing class
    mu = 3.0 * rng.standard_normal((k, dim))
    s = rng.uniform(0.2, 2.0, k)
    sig = sigma * np.exp(0.5 * rng.standard_normal(batch)) if per_example else np.full(batch, sigma)
    comp = rng.choice(k, batch, p=pi)
    x = mu[comp] + np.sqrt(s[comp, None] ** 2 + sig[:, None] ** 2) * rng.standard_normal((batch, dim))
    clf = MixtureClassifier(*(torch.from_numpy(a) for a in (pi, mu, s)))
    sigma_arg = torch.from_numpy(sig) if per_example else sigma
    return (pi, mu, s, sig, x), clf, MixtureScore(clf), torch.from_numpy(x), sigma_arg


def _close(got: torch.Tensor, ref: np.ndarray, tol: float = 1e-9) -> None:
    assert got.dtype == torch.float64 and got.shape == ref.shape
    ref_t = torch.from_numpy(ref)
    scale = ref_t.norm(dim=1, keepdim=True) + 1.0
    err = (got - ref_t).abs()
    assert bool((err <= tol * scale).all()), float((err / scale).max())


CASE = dict(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(2, 4),
    dim=st.integers(1, 3),
    sigma=st.floats(0.01, 20.0),
    per_example=st.booleans(),
)


@SETTINGS
@given(**CASE, alpha=st.floats(0.5, 10.0), y_frac=st.floats(0.0, 0.999))
def test_guided_scores_match_mixture_closed_form(seed, k, dim, sigma, per_example, alpha, y_frac):
    (pi, mu, s, sig, x_np), clf, score_model, x, sigma_arg = _problem(seed, k, dim, 16, sigma, per_example)
    y = int(y_frac * k)
    labels = torch.full((x.shape[0],), y, dtype=torch.long)
    lik_ref = _likelihood_score(x_np, pi, mu, s, sig, y)
    prior_ref = _prior_score(x_np, pi, mu, s, sig)

    _close(likelihood_score(clf, x, sigma_arg, labels), lik_ref)
    grad, logits = likelihood_score_and_logits(clf, x, sigma_arg, labels)
    _close(grad, lik_ref)
    np.testing.assert_allclose(logits.detach().numpy(), _log_joint(x_np, pi, mu, s, sig), rtol=1e-12, atol=1e-12)

    post_ref = prior_ref + alpha * lik_ref
    _close(posterior_score(score_model, clf, x, sigma_arg, labels, alpha=alpha), post_ref)
    _close(posterior_score_fn(score_model, clf, labels, alpha=alpha)(x, sigma_arg), post_ref)

    scores = ModelScores(score_model, clf, alpha=alpha)
    _close(scores.prior(x, sigma_arg), prior_ref)
    _close(scores.likelihood(x, sigma_arg, y), alpha * lik_ref)  # the effective, alpha-scaled term
    _close(scores.posterior(x, sigma_arg, y), post_ref)
    _close(scores.posterior_fn(y)(x, sigma_arg), post_ref)


@SETTINGS
@given(**CASE)
def test_posterior_at_alpha_one_is_the_class_conditional_score(seed, k, dim, sigma, per_example):
    """Bayes' rule with the exact classifier: prior + grad log p(y|x) = grad log p(x|y) = -(x - mu_y)/v_y."""
    (pi, mu, s, sig, x_np), clf, score_model, x, sigma_arg = _problem(seed, k, dim, 16, sigma, per_example)
    scores = ModelScores(score_model, clf)
    for y in range(k):
        ref = _class_score(x_np, mu, s, sig, y)
        labels = torch.full((x.shape[0],), y, dtype=torch.long)
        _close(posterior_score(score_model, clf, x, sigma_arg, labels), ref, tol=1e-8)
        _close(scores.posterior(x, sigma_arg, y), ref, tol=1e-8)


def test_guidance_points_towards_the_class():
    """A sign check with the same closed form: on the segment between two well-separated means the guided
    term of class 0 points towards mu_0, and alpha scales it (an alpha-negated term would point away)."""
    pi, mu, s = torch.tensor([0.5, 0.5]), torch.tensor([[-4.0, 0.0], [4.0, 0.0]]), torch.tensor([0.5, 0.5])
    clf = MixtureClassifier(pi.double(), mu.double(), s.double())
    x = torch.tensor([[t, 0.0] for t in np.linspace(-3.0, 3.0, 7)], dtype=torch.float64)
    for alpha in (1.0, 3.0):
        lik = ModelScores(MixtureScore(clf), clf, alpha=alpha).likelihood(x, 1.0, 0)
        # p(1|x) (x - mu_1)/v - p(1|x) (x - mu_0)/v = p(1|x) (mu_0 - mu_1)/v, v = 1.25
        r1 = torch.sigmoid(torch.tensor(2 * 4.0 * x[:, 0].numpy() / 1.25, dtype=torch.float64))
        expect = torch.stack([alpha * r1 * (-8.0) / 1.25, torch.zeros_like(r1)], dim=1)
        torch.testing.assert_close(lik, expect, rtol=1e-10, atol=1e-12)
        assert bool((lik[:, 0] < 0).all())


def test_labels_of_any_integer_dtype_pick_the_class():
    """A label tensor of int32 or uint8 (as datasets store them) gives the term of the same classes as int64 labels
    and as the class given as a number: the labels are cast to the index dtype that ``gather`` needs."""
    (pi, mu, s, sig, x_np), clf, score_model, x, sigma_arg = _problem(5, 3, 2, 6, 1.0, False)
    scores = ModelScores(score_model, clf, alpha=2.0)
    ref = scores.posterior(x, sigma_arg, 2)
    _close(ref, _prior_score(x_np, pi, mu, s, sig) + 2.0 * _likelihood_score(x_np, pi, mu, s, sig, 2))
    for dtype in (torch.int64, torch.int32, torch.uint8):
        torch.testing.assert_close(scores.posterior(x, sigma_arg, torch.full((6,), 2, dtype=dtype)), ref,
                                   rtol=0, atol=0)


def test_a_guided_method_records_its_guidance_alpha():
    """With a guidance object, ``ModelScores.alpha`` is the guidance's scale (not the unused ``alpha`` argument), so
    the fingerprint of the method's sampling units (:func:`dlsm.stages.units.networks_digest`) changes with it and
    units drawn at one scale are never reused at another."""
    from dlsm.math.guidance import ConstantGuidance
    from dlsm.stages.units import networks_digest

    (_, _, _, _, _), clf, score_model, _, _ = _problem(5, 3, 2, 6, 1.0, False)
    two, three = (ModelScores(score_model, clf, guidance=ConstantGuidance(a)) for a in (2.0, 3.0))
    assert (two.alpha, three.alpha) == (2.0, 3.0)
    assert networks_digest(two) != networks_digest(three)


@pytest.mark.parametrize("sigma", [0.05, 1.0, 7.5])
def test_closed_forms_match_finite_differences(sigma):
    """The references above, against central differences of the numpy log-densities (h = 1e-5)."""
    (pi, mu, s, sig, x_np), clf, score_model, _, _ = _problem(3, 3, 2, 8, sigma, False)
    h = 1e-5 * max(1.0, sigma)

    def log_marginal(z):
        lj = _log_joint(z, pi, mu, s, sig)
        m = lj.max(1, keepdims=True)
        return (m + np.log(np.exp(lj - m).sum(1, keepdims=True)))[:, 0]

    def log_lik(z, y):
        return _log_joint(z, pi, mu, s, sig)[:, y] - log_marginal(z)

    def fd(f):
        out = np.zeros_like(x_np)
        for j in range(x_np.shape[1]):
            e = np.zeros_like(x_np)
            e[:, j] = h
            out[:, j] = (f(x_np + e) - f(x_np - e)) / (2 * h)
        return out

    scale = 1.0 / (s.min() ** 2 + sigma**2)
    np.testing.assert_allclose(_prior_score(x_np, pi, mu, s, sig), fd(log_marginal), atol=1e-6 * scale * 10)
    for y in range(3):
        np.testing.assert_allclose(_likelihood_score(x_np, pi, mu, s, sig, y), fd(lambda z, y=y: log_lik(z, y)),
                                   atol=1e-6 * scale * 10)
    # and the exact prior module used above is that marginal score
    np.testing.assert_allclose(score_model(torch.from_numpy(x_np), sigma).numpy(), fd(log_marginal),
                               atol=1e-6 * scale * 10)


class _ParzenPrior(nn.Module):
    """A 'score model' that is exactly the Parzen prior score of ``data`` (to test Bayes' rule end to end)."""

    def __init__(self, data: torch.Tensor) -> None:
        super().__init__()
        self.data = data

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return parzen_score(self.data, x, sigma)


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_exact_likelihood_with_the_exact_prior_is_the_class_conditional_parzen_score(alpha):
    """s_prior + alpha (grad log p(x|y) - grad log p(x)) with the Parzen prior: at alpha = 1 the class-conditional
    Parzen score of class y's data alone (computed directly), and linear in alpha."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(60, 5, generator=g, dtype=torch.float64)
    labels = torch.arange(60) % 3
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    sigma = torch.full((7,), 0.8, dtype=torch.float64)
    scores = ExactLikelihoodScores(_ParzenPrior(data), OracleScores(data, labels), alpha=alpha)
    prior, cls = parzen_score(data, x, sigma), parzen_score(data[labels == 2], x, sigma)
    torch.testing.assert_close(scores.posterior(x, sigma, 2), prior + alpha * (cls - prior), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scores.posterior_fn(2)(x, sigma), prior + alpha * (cls - prior), rtol=1e-10,
                               atol=1e-10)


# ---- found by mutation testing (docs/mutation.md) ----------------------------------------------------------


class _ClassScore(nn.Module):
    """The exact class-conditional score of class y of the noisy mixture, -(x - mu_y) / (s_y^2 + sigma^2)."""

    def __init__(self, clf: MixtureClassifier, y: int) -> None:
        super().__init__()
        self.clf, self.y = clf, y

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        v = self.clf.s[self.y] ** 2 + _sigma_batch(sigma, x)[:, None] ** 2
        return -(x - self.clf.mu[self.y]) / v


@pytest.mark.parametrize("per_example", [False, True])
def test_posterior_sm_scores_match_the_mixture_closed_form(per_example):
    """Posterior SM (method (c)): per-class score models as the posterior, the likelihood by Bayes' rule."""
    from dlsm.math.scores import PosteriorSMScores

    (pi, mu, s, sig, x_np), clf, score_model, x, sigma_arg = _problem(3, 3, 2, 16, 0.7, per_example)
    scores = PosteriorSMScores(score_model, [_ClassScore(clf, y) for y in range(3)])
    _close(scores.prior(x, sigma_arg), _prior_score(x_np, pi, mu, s, sig))
    for y in range(3):
        _close(scores.posterior(x, sigma_arg, y), _class_score(x_np, mu, s, sig, y))
        _close(scores.posterior_fn(y)(x, sigma_arg), _class_score(x_np, mu, s, sig, y))
        _close(scores.likelihood(x, sigma_arg, y), _likelihood_score(x_np, pi, mu, s, sig, y), tol=1e-8)


def test_guidance_scale_defaults_to_one_the_base_method():
    """Without alpha, posterior_score_fn and ExactLikelihoodScores are Bayes' rule: the class-conditional score."""
    (pi, mu, s, sig, x_np), clf, score_model, x, sigma_arg = _problem(5, 2, 2, 16, 1.3, False)

    class Oracle:  # the exact likelihood score grad log p_sigma(y|x) of the mixture
        def likelihood(self, x, sigma, y):
            return likelihood_score(clf, x, sigma, torch.full((x.shape[0],), y, dtype=torch.long))

    for y in range(2):
        labels = torch.full((x.shape[0],), y, dtype=torch.long)
        _close(posterior_score_fn(score_model, clf, labels)(x, sigma_arg), _class_score(x_np, mu, s, sig, y), 1e-8)
        _close(ExactLikelihoodScores(score_model, Oracle()).posterior(x, sigma_arg, y),
               _class_score(x_np, mu, s, sig, y), tol=1e-8)


def test_model_scores_use_eval_mode_and_accept_plain_functions():
    """The networks are put in eval mode (a BatchNorm classifier then scores each sample on its own); a plain
    function, such as a closed-form score, is used as it is. The likelihood score carries no graph by default."""
    (pi, mu, s, sig, x_np), clf, score_model, x, sigma_arg = _problem(7, 2, 2, 16, 0.9, False)
    score_model.train(), clf.train()
    scores = ModelScores(score_model, clf, alpha=1.0)
    assert not score_model.training and not clf.training

    class Oracle:
        def likelihood(self, x, sigma, y):
            return likelihood_score(clf, x, sigma, torch.full((x.shape[0],), y, dtype=torch.long))

    exact = ExactLikelihoodScores(lambda x, sigma: score_model(x, sigma), Oracle())
    _close(exact.posterior(x, sigma_arg, 1), _class_score(x_np, mu, s, sig, 1), tol=1e-8)
    _close(scores.posterior(x, sigma_arg, 1), _class_score(x_np, mu, s, sig, 1), tol=1e-8)
    grad, _ = likelihood_score_and_logits(clf, x, sigma_arg, torch.ones(16, dtype=torch.long))
    assert not grad.requires_grad  # create_graph=False unless asked (DLSM' asks)


@pytest.mark.parametrize("eps", [1e-8, 0.05, 0.5])
def test_softmax_eps_gives_the_official_gradient_p_over_p_plus_eps_times_the_exact(eps):
    """likelihood_score_and_logits(softmax_eps=eps) differentiates log(softmax + eps) (the official DLSM sampler and
    loss): for logits W x + b, grad = p_y / (p_y + eps) (W_y - sum_k p_k W_k), written out in float64; eps = None is
    the exact log_softmax gradient (the factor 1). The gin binding reaches the samplers' ModelScores too."""
    import gin

    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    x = 2.0 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])

    def classifier(x, sigma):
        return x @ w.T + b

    p = torch.softmax(x @ w.T + b, dim=-1)
    exact = w[y] - p @ w  # (5, 6): W_y - sum_k p_k W_k
    factor = p.gather(-1, y[:, None]) / (p.gather(-1, y[:, None]) + eps)
    torch.testing.assert_close(likelihood_score_and_logits(classifier, x, 1.0, y, softmax_eps=eps)[0], factor * exact,
                               rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(likelihood_score(classifier, x, 1.0, y), exact, rtol=1e-12, atol=1e-15)
    if eps >= 0.05:
        assert (factor[:, 0] < 0.9).any()  # the two visibly differ here
    gin.clear_config()
    try:
        gin.bind_parameter("likelihood_score_and_logits.softmax_eps", eps)
        scores = ModelScores(lambda x, s: torch.zeros_like(x), classifier, alpha=2.0)
        torch.testing.assert_close(scores.likelihood(x, 1.0, y), 2.0 * factor * exact, rtol=1e-12, atol=1e-15)
    finally:
        gin.clear_config()
