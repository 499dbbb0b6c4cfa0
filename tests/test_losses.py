"""DSM, DLSM', CE and total losses (dlsm.math.losses) on Gaussian problems whose optimal values are known in
closed form.

Monte-Carlo assertions use |mean - expected| < 4 standard errors, with paired samples wherever two models
are compared so that the standard error is that of the per-sample difference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dlsm.math.losses import ce_loss, dlsm_loss, dsm_loss, perturb, sigma_weight, total_loss

Z = 4.0  # number of standard errors allowed


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.detach().double()
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


# --------------------------------------------------------------------------------------------
# DSM on x ~ N(mu, s^2 I_D)
# --------------------------------------------------------------------------------------------


class GaussianScore(nn.Module):
    """The exact score of N(mu, (s^2 + sigma^2) I), optionally scaled by ``scale`` and shifted by ``shift``."""

    def __init__(self, mu: torch.Tensor, s: float, *, scale: float = 1.0, shift: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mu", mu)
        self.s, self.scale = s, scale
        self.register_buffer("shift", torch.zeros_like(mu) if shift is None else shift)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],)
        v = self.s**2 + sigma[:, None] ** 2
        return self.scale * (-(x - self.mu) / v) + self.shift


# Derivation of the minimum. With x~ = x + sigma z the DSM target is -z/sigma, and
#   E[loss] = 1/2 sigma^p E||s(x~) + z/sigma||^2.
# It is minimised by s*(x~) = E[-z/sigma | x~]. Jointly Gaussian: Cov(z, x~) = sigma I, Var(x~) = v I with
# v = s^2 + sigma^2, so E[z | x~] = sigma (x~ - mu)/v (hence s* = -(x~ - mu)/v, the exact score) and
# Var(z | x~) = (1 - sigma^2/v) I = (s^2/v) I. The minimum is therefore
#   1/2 sigma^p E||z - E[z|x~]||^2 / sigma^2 = 1/2 sigma^(p-2) D s^2 / v,
# which is 1/2 D s^2/(s^2 + sigma^2) for p = 2. For any other score s = s* + delta(x~) the cross term
# E[delta . (s* + z/sigma)] vanishes (condition on x~), so the excess is exactly 1/2 sigma^p E||delta||^2:
#   scale c:  delta = (c - 1) s*,  E||delta||^2 = (c-1)^2 E||x~ - mu||^2 / v^2 = (c-1)^2 D / v
#   shift b:  delta = b,           E||delta||^2 = ||b||^2


def _dsm_min(d: int, s: float, sigma: float, p: float) -> float:
    return 0.5 * sigma ** (p - 2.0) * d * s**2 / (s**2 + sigma**2)


@pytest.mark.parametrize("weight_power", [2.0, 0.0])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 4.0])
def test_dsm_exact_score_reaches_known_minimum_and_wrong_scores_do_not(sigma, weight_power):
    d, s, n = 3, 1.2, 40_000
    g = torch.Generator().manual_seed(int(sigma * 1000) + int(weight_power))
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x = mu + s * torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    sig = torch.full((n,), sigma, dtype=torch.float64)

    exact = dsm_loss(GaussianScore(mu, s), x, sig, noise, weight_power=weight_power)
    assert exact.shape == (n,)
    m, se = _mean_se(exact)
    assert abs(m - _dsm_min(d, s, sigma, weight_power)) < Z * se

    v = s**2 + sigma**2
    shift = torch.tensor([0.4, 0.0, -0.3], dtype=torch.float64)
    wrongs = {
        "scaled": (GaussianScore(mu, s, scale=1.3), 0.5 * sigma**weight_power * 0.09 * d / v),
        "shifted": (GaussianScore(mu, s, shift=shift), 0.5 * sigma**weight_power * float(shift.pow(2).sum())),
    }
    for name, (model, excess) in wrongs.items():
        wrong = dsm_loss(model, x, sig, noise, weight_power=weight_power)
        mw, sew = _mean_se(wrong)
        md, sed = _mean_se(wrong - exact)  # paired: same x and noise
        assert md > Z * sed, name
        assert abs(md - excess) < Z * sed, name
        assert abs(mw - (_dsm_min(d, s, sigma, weight_power) + excess)) < Z * sew, name


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 6),
    shape=st.sampled_from([(2,), (3,), (2, 2), (1, 3, 2)]),
    p=st.sampled_from([0.0, 1.0, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dsm_loss_per_example_formula(b, shape, p, seed):
    """dsm_loss equals 1/2 sigma^p ||s(x + sigma z) + z/sigma||^2 computed element by element in float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, *shape), generator=g, dtype=torch.float64)
    noise = torch.randn((b, *shape), generator=g, dtype=torch.float64)
    sigma = torch.rand(b, generator=g, dtype=torch.float64) * 3 + 0.1
    w = torch.randn(shape, generator=g, dtype=torch.float64)

    def score(xt: torch.Tensor, sg: torch.Tensor) -> torch.Tensor:
        return torch.tanh(xt) * w + sg.reshape(-1, *([1] * len(shape)))

    got = dsm_loss(score, x, sigma, noise, weight_power=p)
    for i in range(b):
        sg = float(sigma[i])
        xt = x[i] + sg * noise[i]
        si = torch.tanh(xt) * w + sg
        ref = (
            0.5
            * sg**p
            * sum((float(a) + float(c) / sg) ** 2 for a, c in zip(si.flatten(), noise[i].flatten(), strict=True))
        )
        assert math.isclose(float(got[i]), ref, rel_tol=1e-10, abs_tol=1e-12)
    assert torch.equal(perturb(x, sigma, noise)[0], x[0] + sigma[0] * noise[0])
    assert torch.equal(sigma_weight(sigma, p), sigma**p)


# --------------------------------------------------------------------------------------------
# DLSM' on a labelled mixture of two Gaussians: class c ~ N(mu_c, s^2 I_2), equal priors
# --------------------------------------------------------------------------------------------

S = 0.8
MUS = torch.tensor([[-1.5, 0.0], [1.5, 0.5]], dtype=torch.float64)


class GaussianClassifier(nn.Module):
    """logits_c = -||x - mu_c||^2 / (2 tau (s^2 + sigma^2)). With mu = MUS and tau = 1 this is the exact
    posterior p_sigma(y|x~) of the mixture; other values give wrong classifiers."""

    def __init__(self, mus: torch.Tensor = MUS, tau: float = 1.0) -> None:
        super().__init__()
        self.mus = nn.Parameter(mus.clone())
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau), dtype=torch.float64))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = self.log_tau.exp() * (S**2 + sigma**2)
        return -(x[:, None, :] - self.mus[None]).pow(2).sum(-1) / (2.0 * v[:, None])

    def input_grad(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """grad_x log softmax(logits)_y in closed form: (mu_y - sum_c p_c mu_c) / (tau v)."""
        with torch.no_grad():
            p = torch.softmax(self(x, sigma), dim=1)
            v = self.log_tau.exp() * (S**2 + sigma**2)
            return (self.mus[y] - p @ self.mus) / v[:, None]


class MixturePriorScore(nn.Module):
    """The exact score of p_sigma(x~) = 1/2 sum_c N(mu_c, (s^2 + sigma^2) I), times a parameter ``scale`` (= 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        v = (S**2 + sigma**2)[:, None]
        w = torch.softmax(-(x[:, None, :] - MUS[None]).pow(2).sum(-1) / (2.0 * v), dim=1)
        return self.scale * (w @ MUS - x) / v


def _mixture_batch(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = MUS[y] + S * torch.randn(n, 2, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.3), math.log(3.0), generator=g))
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, y, sigma, noise


def _true_likelihood_score(xt: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad log p_sigma(y|x~) = grad log p_sigma(x~|y) - grad log p_sigma(x~) = (mu_y - sum_c w_c mu_c)/v."""
    v = (S**2 + sigma**2)[:, None]
    w = torch.softmax(-(xt[:, None, :] - MUS[None]).pow(2).sum(-1) / (2.0 * v), dim=1)
    return (MUS[y] - w @ MUS) / v


def test_dlsm_exact_classifier_is_optimal_and_dlsm_minus_elsm_is_constant():
    n = 40_000
    x, y, sigma, noise = _mixture_batch(n, seed=11)
    xt = x + sigma[:, None] * noise
    score = MixturePriorScore()
    g_true = _true_likelihood_score(xt, sigma, y)
    classifiers = {
        "exact": GaussianClassifier(),
        "wrong_variance": GaussianClassifier(tau=2.0),
        "shifted_means": GaussianClassifier(mus=MUS + torch.tensor([[0.0, 0.0], [0.6, -0.4]], dtype=torch.float64)),
    }
    dl, el = {}, {}
    for name, clf in classifiers.items():
        dl[name] = dlsm_loss(clf, score, x, y, sigma, noise, weight_power=0.0).detach()
        el[name] = 0.5 * (clf.input_grad(xt, sigma, y) - g_true).pow(2).sum(1)  # 1/2 ELSM, per example
    assert float(el["exact"].abs().max()) < 1e-12

    # The constant: for the exact classifier the residual is grad log p_sigma(x~|y) + z/sigma
    # = -s e / v + z s^2/(sigma v) given y (x = mu_y + s e), so 1/2 E||.||^2 = 1/2 D s^2/(sigma^2 v) per example.
    const = 0.5 * 2 * S**2 / (sigma**2 * (S**2 + sigma**2))
    m, se = _mean_se(dl["exact"] - const)
    assert abs(m) < Z * se

    for name in ("wrong_variance", "shifted_means"):
        # exact classifier is better, by more than Z paired standard errors ...
        md, sed = _mean_se(dl[name] - dl["exact"])
        assert md > Z * sed, name
        assert float(el[name].mean()) > 0.01
        # ... and (1/2 DLSM) - (1/2 ELSM) is the same constant for every classifier (the paper's Proposition)
        mc, sec = _mean_se((dl[name] - el[name]) - (dl["exact"] - el["exact"]))
        assert abs(mc) < Z * sec, name
        mk, sek = _mean_se(dl[name] - el[name] - const)
        assert abs(mk) < Z * sek, name
    mc, sec = _mean_se((dl["wrong_variance"] - el["wrong_variance"]) - (dl["shifted_means"] - el["shifted_means"]))
    assert abs(mc) < Z * sec


@settings(max_examples=20, deadline=None)
@given(
    tau=st.floats(0.3, 3.0),
    dmu=st.lists(st.floats(-1.0, 1.0), min_size=4, max_size=4),
    p=st.sampled_from([0.0, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dlsm_loss_per_example_formula(tau, dmu, p, seed):
    """dlsm_loss = 1/2 sigma^p ||grad log p(y|x~;theta) + s(x~) + z/sigma||^2 with the closed-form input gradient."""
    x, y, sigma, noise = _mixture_batch(16, seed)
    clf = GaussianClassifier(mus=MUS + torch.tensor(dmu, dtype=torch.float64).reshape(2, 2), tau=tau)
    score = MixturePriorScore()
    xt = x + sigma[:, None] * noise
    with torch.no_grad():
        prior = score(xt, sigma)
    ref = 0.5 * sigma**p * (clf.input_grad(xt, sigma, y) + prior + noise / sigma[:, None]).pow(2).sum(1)
    got = dlsm_loss(clf, score, x, y, sigma, noise, weight_power=p)
    torch.testing.assert_close(got.detach(), ref, rtol=1e-10, atol=1e-12)


def test_ce_loss_matches_hand_computed_cross_entropy():
    x, y, sigma, noise = _mixture_batch(12, seed=5)
    clf = GaussianClassifier(tau=1.7)
    for p in (0.0, 2.0):
        got = ce_loss(clf, None, x, y, sigma, noise, weight_power=p).detach()
        for i in range(12):
            xt = [float(x[i, j] + sigma[i] * noise[i, j]) for j in range(2)]
            vv = 1.7 * (S**2 + float(sigma[i]) ** 2)
            logits = [-sum((xt[j] - float(MUS[c, j])) ** 2 for j in range(2)) / (2 * vv) for c in range(2)]
            top = max(logits)
            lse = top + math.log(sum(math.exp(lg - top) for lg in logits))
            ref = float(sigma[i]) ** p * (lse - logits[int(y[i])])
            assert math.isclose(float(got[i]), ref, rel_tol=1e-10, abs_tol=1e-12)


def test_total_loss_is_dlsm_plus_lambda_ce():
    x, y, sigma, noise = _mixture_batch(64, seed=6)
    clf, score = GaussianClassifier(tau=1.3), MixturePriorScore()
    for lam in (0.0, 0.125, 1.0, 3.0):
        tot = total_loss(clf, score, x, y, sigma, noise, lam=lam, weight_power=2.0)
        ref = dlsm_loss(clf, score, x, y, sigma, noise, weight_power=2.0) + lam * ce_loss(
            clf, score, x, y, sigma, noise
        )
        assert torch.equal(tot, ref)
    # a sigma-weighted CE term
    tot = total_loss(clf, score, x, y, sigma, noise, lam=0.5, weight_power=0.0, ce_weight_power=2.0)
    ref = dlsm_loss(clf, score, x, y, sigma, noise, weight_power=0.0) + 0.5 * ce_loss(
        clf, score, x, y, sigma, noise, weight_power=2.0
    )
    torch.testing.assert_close(tot, ref, rtol=1e-14, atol=0.0)


def _fd_grad(fn, param: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central finite differences of the scalar fn() with respect to every entry of ``param``."""
    out = torch.zeros_like(param)
    with torch.no_grad():
        flat = param.view(-1)
        for k in range(flat.numel()):
            old = float(flat[k])
            flat[k] = old + h
            up = float(fn())
            flat[k] = old - h
            down = float(fn())
            flat[k] = old
            out.view(-1)[k] = (up - down) / (2 * h)
    return out


@pytest.mark.parametrize("loss", ["dlsm", "total"])
def test_gradients_reach_classifier_through_input_gradient_but_not_score_model(loss):
    x, y, sigma, noise = _mixture_batch(32, seed=7)
    clf = GaussianClassifier(mus=MUS + 0.2, tau=1.5)
    score = MixturePriorScore()

    def value() -> torch.Tensor:
        if loss == "dlsm":
            return dlsm_loss(clf, score, x, y, sigma, noise, weight_power=2.0).mean()
        return total_loss(clf, score, x, y, sigma, noise, lam=0.7).mean()

    value().backward()
    assert score.scale.grad is None  # the score model is frozen
    auto = {"mus": clf.mus.grad.clone(), "log_tau": clf.log_tau.grad.clone()}
    # independent check: the full derivative, including the second-order path through grad_x log p(y|x~;theta)
    torch.testing.assert_close(auto["mus"], _fd_grad(value, clf.mus), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(auto["log_tau"], _fd_grad(value, clf.log_tau), rtol=1e-6, atol=1e-8)
    assert float(auto["mus"].abs().max()) > 1e-3
    assert score.scale.grad is None


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lam=st.floats(0.0, 4.0))
def test_official_per_pixel_dlsm_and_total(seed, lam):
    """reduce='mean', weight_power=0 is the official DLSM code's loss (its losses.py, weighting_dlsm = 0):
    mean over batch and pixels of 1/2 (grad log p(y|x~) + s(x~) + z/sigma)^2, plus coef * mean CE."""
    x, y, sigma, noise = _mixture_batch(16, seed)
    clf, score = GaussianClassifier(tau=1.3), MixturePriorScore()
    xt = x + sigma[:, None] * noise
    with torch.no_grad():
        prior = score(xt, sigma)
    official_dlsm = (0.5 * (clf.input_grad(xt, sigma, y) + prior + noise / sigma[:, None]).pow(2)).mean()
    got = dlsm_loss(clf, score, x, y, sigma, noise, weight_power=0.0, reduce="mean").mean()
    torch.testing.assert_close(got.detach(), official_dlsm, rtol=1e-10, atol=1e-12)
    official_total = official_dlsm + lam * ce_loss(clf, score, x, y, sigma, noise).mean()
    tot = total_loss(clf, score, x, y, sigma, noise, lam=lam, weight_power=0.0, reduce="mean").mean()
    torch.testing.assert_close(tot.detach(), official_total.detach(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="reduce must be one of"):
        dlsm_loss(clf, score, x, y, sigma, noise, reduce="max")


# --------------------------------------------------------------------------------------------
# Found by mutation testing (docs/mutation.md)
# --------------------------------------------------------------------------------------------


def test_squared_norm_of_bf16_residuals_is_accumulated_and_returned_in_float32():
    """The DSM / DLSM' squared norm of a bf16 residual (all-bf16 inputs) keeps float32 precision: compared with
    the float64 sum of squares of the same bf16 values (a bf16 result would be off by ~1e-3)."""
    from dlsm.math.losses import _sq_norm

    v = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = _sq_norm(v)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), v.double().pow(2).sum(dim=(1, 2)), rtol=1e-6, atol=0.0)
    x64 = torch.rand(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert _sq_norm(x64).dtype == torch.float64  # never lowered


@pytest.mark.parametrize("loss", ["dlsm_loss", "total_loss"])
def test_reduce_binding_is_checked_when_the_config_is_parsed(loss):
    import gin

    from dlsm.config import check_binding_types
    from dlsm.errors import ConfigError

    gin.clear_config()
    try:
        for ok in ("sum", "mean"):
            gin.parse_config(f"{loss}.reduce = '{ok}'")
            check_binding_types()
        gin.parse_config(f"{loss}.reduce = 'max'")
        with pytest.raises(ConfigError, match=rf"{loss}.reduce = 'max': must be one of \['sum', 'mean'\]"):
            check_binding_types()
    finally:
        gin.clear_config()


def test_defaults_are_ncsnv2_weighting_the_summed_norm_and_lambda_one():
    """Called without options, the losses are the paper's: lambda(sigma) = sigma^2 for DSM and DLSM' (so
    1/2 ||sigma s + z||^2), the squared norm summed over dimensions, L_Total = DLSM' + 1 * (unweighted) CE."""
    x, y, sigma, noise = _mixture_batch(8, seed=12)
    clf, score = GaussianClassifier(tau=1.3), MixturePriorScore()
    xt = x + sigma[:, None] * noise
    with torch.no_grad():
        prior = score(xt, sigma)
        logits = clf(xt, sigma)
    dsm_ref = 0.5 * (sigma[:, None] * prior + noise).pow(2).sum(dim=1)
    dlsm_ref = 0.5 * (sigma[:, None] * (clf.input_grad(xt, sigma, y) + prior) + noise).pow(2).sum(dim=1)
    ce_ref = torch.logsumexp(logits, dim=1) - logits[torch.arange(8), y]
    close = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(dsm_loss(score, x, sigma, noise).detach(), dsm_ref, **close)
    torch.testing.assert_close(dlsm_loss(clf, score, x, y, sigma, noise).detach(), dlsm_ref, **close)
    torch.testing.assert_close(ce_loss(clf, score, x, y, sigma, noise).detach(), ce_ref, **close)
    torch.testing.assert_close(total_loss(clf, score, x, y, sigma, noise).detach(), dlsm_ref + ce_ref, **close)


@pytest.mark.parametrize("loss", ["dlsm", "total"])
def test_per_pixel_mean_of_a_batch_of_one(loss):
    """reduce='mean' divides by the dimension of one example, also when the batch holds a single example."""
    x, y, sigma, noise = _mixture_batch(1, seed=13)
    clf, score = GaussianClassifier(tau=1.3), MixturePriorScore()
    xt = x + sigma[:, None] * noise
    with torch.no_grad():
        prior = score(xt, sigma)
    ref = 0.5 * (clf.input_grad(xt, sigma, y) + prior + noise / sigma[:, None]).pow(2).mean(dim=1)
    fn = dlsm_loss if loss == "dlsm" else lambda *a, **k: total_loss(*a, lam=0.0, **k)
    got = fn(clf, score, x, y, sigma, noise, weight_power=0.0, reduce="mean")
    torch.testing.assert_close(got.detach(), ref, rtol=1e-10, atol=1e-12)
