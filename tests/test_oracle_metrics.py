"""Parzen oracle (dlsm.math.oracle) and point-set metrics (dlsm.eval.points) against brute-force float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlsm.eval.points import kth_nn_distance, mean_score_distance, precision_recall, sliced_wasserstein
from dlsm.math.oracle import (
    OracleScores,
    oracle_likelihood_score,
    oracle_posterior_score,
    oracle_posterior_score_fn,
    parzen_score,
)

SETTINGS = settings(max_examples=25, deadline=None)


def _brute_parzen_score(data: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """grad_x log sum_i N(x; x_i, sigma^2 I) by autograd through torch.logsumexp, in float64."""
    data = data.reshape(data.shape[0], -1).double()
    q = x.reshape(x.shape[0], -1).double().detach().requires_grad_(True)
    sig = torch.as_tensor(sigma, dtype=torch.float64).expand(q.shape[0])
    d2 = (q[:, None, :] - data[None, :, :]).pow(2).sum(-1)  # direct differences, no expansion
    log_p = torch.logsumexp(-d2 / (2.0 * sig[:, None] ** 2), dim=1)  # constants do not affect the gradient
    (grad,) = torch.autograd.grad(log_p.sum(), q)  # queries are independent: the sum separates
    return grad.reshape(x.shape)


def _naive_parzen_score(data: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    data, q = data.double(), x.double()
    w = torch.exp(-(q[:, None, :] - data[None]).pow(2).sum(-1) / (2.0 * sigma**2))
    return (w @ data / w.sum(1, keepdim=True) - q) / sigma**2


@SETTINGS
@given(
    m=st.integers(1, 40),
    dim=st.integers(1, 4),
    q=st.integers(1, 30),
    query_chunk=st.integers(1, 7),
    data_chunk=st.integers(1, 9),
    sigma=st.floats(0.05, 5.0),
    per_query=st.booleans(),
    far=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_parzen_score_matches_autograd_logsumexp(m, dim, q, query_chunk, data_chunk, sigma, per_query, far, seed):
    g = torch.Generator().manual_seed(seed)
    data = 2.0 * torch.randn(m, dim, generator=g, dtype=torch.float64)
    x = data[torch.randint(0, m, (q,), generator=g)] + sigma * torch.randn(q, dim, generator=g, dtype=torch.float64)
    if per_query:
        sig = sigma * torch.exp(torch.randn(q, generator=g, dtype=torch.float64))
    else:
        sig = sigma
    # send a fraction of the queries ~1e3 sigma away, where every Gaussian weight underflows to 0
    n_far = int(far * q)
    if n_far:
        direction = torch.randn(n_far, dim, generator=g, dtype=torch.float64)
        direction = direction / direction.norm(dim=1, keepdim=True)
        s_far = torch.as_tensor(sig, dtype=torch.float64).expand(q)[:n_far, None]
        x[:n_far] = x[:n_far] + 1e3 * s_far * direction
    got = parzen_score(data, x, sig, query_chunk=query_chunk, data_chunk=data_chunk)
    ref = _brute_parzen_score(data, x, sig)
    assert got.dtype == torch.float64 and got.shape == x.shape
    assert bool(torch.isfinite(got).all())
    scale = ref.norm(dim=1, keepdim=True) + 1.0 / torch.as_tensor(sig, dtype=torch.float64).expand(q)[:, None]
    assert bool(((got - ref).abs() <= 1e-8 * scale).all())


def test_parzen_score_far_queries_where_naive_formula_is_nan():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(50, 2, generator=g, dtype=torch.float64)
    sigma = 0.1
    x = torch.tensor([[1e3 * sigma, 0.0], [0.0, -1e3 * sigma], [70.0, 70.0]], dtype=torch.float64)
    assert bool(torch.isnan(_naive_parzen_score(data, x, sigma)).all())  # 0/0: the regime is really exercised
    got = parzen_score(data, x, sigma, query_chunk=2, data_chunk=7)
    ref = _brute_parzen_score(data, x, sigma)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=0.0)
    # far away the softmax picks the nearest data point: score = (nearest - x)/sigma^2
    nearest = data[torch.cdist(x, data).argmin(1)]
    torch.testing.assert_close(got, (nearest - x) / sigma**2, rtol=1e-9, atol=0.0)


def test_parzen_score_float32_and_image_shapes():
    g = torch.Generator().manual_seed(1)
    data = torch.randn(30, 2, 3, generator=g)
    x = torch.randn(10, 2, 3, generator=g)
    got = parzen_score(data, x, 0.7, query_chunk=3, data_chunk=4)
    assert got.dtype == torch.float32 and got.shape == (10, 2, 3)
    torch.testing.assert_close(got.double(), _brute_parzen_score(data, x, 0.7), rtol=1e-5, atol=1e-5)


def test_parzen_score_single_point_is_gaussian_score():
    mu = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig = torch.linspace(0.1, 3.0, 7, dtype=torch.float64)
    torch.testing.assert_close(parzen_score(mu, x, sig), (mu - x) / sig[:, None] ** 2, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(sigma=st.floats(0.1, 3.0), far=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_oracle_likelihood_is_posterior_minus_prior(sigma, far, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (60,), generator=g)
    labels[:3] = torch.tensor([0, 1, 2])  # every class present
    data = torch.randn(60, 2, generator=g, dtype=torch.float64) + 2.0 * labels[:, None]
    x = 3.0 * torch.randn(25, 2, generator=g, dtype=torch.float64) + (300.0 * sigma if far else 0.0)
    oracle = OracleScores(data, labels)
    for y in range(3):
        post_ref = _brute_parzen_score(data[labels == y], x, sigma)
        prior_ref = _brute_parzen_score(data, x, sigma)
        # grad log p(y|x) = grad [log sum_{i in y} exp(.) - log sum_i exp(.)], by autograd
        q = x.clone().requires_grad_(True)
        d2 = (q[:, None, :] - data[None]).pow(2).sum(-1) / (2.0 * sigma**2)
        log_lik = torch.logsumexp(-d2[:, labels == y], dim=1) - torch.logsumexp(-d2, dim=1)
        (lik_ref,) = torch.autograd.grad(log_lik.sum(), q)
        scale = 1e-8 * (post_ref.norm(dim=1, keepdim=True) + prior_ref.norm(dim=1, keepdim=True) + 1.0 / sigma)
        lik = oracle_likelihood_score(data, labels, x, sigma, y)
        assert bool(((lik - lik_ref).abs() <= scale).all())
        post = oracle_posterior_score(data, labels, x, sigma, y)
        assert bool(((post - post_ref).abs() <= scale).all())
        assert bool(((oracle.prior(x, sigma) - prior_ref).abs() <= scale).all())
        assert torch.equal(oracle.likelihood(x, sigma, y), lik)
        assert torch.equal(oracle.posterior(x, sigma, y), post)
        assert torch.equal(oracle.posterior_fn(y)(x, sigma), post)
        assert torch.equal(oracle_posterior_score_fn(data, labels, y)(x, sigma), post)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    a=st.lists(st.floats(-5.0, 5.0), min_size=2, max_size=2),
    b=st.lists(st.floats(-5.0, 5.0), min_size=2, max_size=2),
    sigma=st.floats(0.05, 10.0),
    far=st.floats(0.0, 300.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_oracle_scores_of_one_point_per_class_closed_form(a, b, sigma, far, seed):
    """Data {a (class 0), b (class 1)}: p_sigma(x|0) = N(x; a, sigma^2 I), so in closed form
        posterior(0) = (a - x)/sigma^2,  prior = (w_a a + w_b b - x)/sigma^2,
        likelihood(0) = grad log w_a = w_b (a - b)/sigma^2,  w_b = expit((||x-a||^2 - ||x-b||^2)/(2 sigma^2)),
    with the weights from scipy's expit in numpy float64 (stable also ``far`` sigmas away)."""
    from scipy.special import expit

    a_np, b_np = np.array(a), np.array(b)
    data = torch.tensor(np.stack([a_np, b_np]), dtype=torch.float64)
    labels = torch.tensor([0, 1])
    rng = np.random.default_rng(seed)
    x_np = rng.normal(size=(12, 2)) * 3.0 + far * sigma * rng.normal(size=(1, 2))
    x = torch.tensor(x_np)
    d = ((x_np - a_np) ** 2).sum(1) - ((x_np - b_np) ** 2).sum(1)
    w_b = expit(d / (2 * sigma**2))[:, None]
    w_a = expit(-d / (2 * sigma**2))[:, None]
    oracle = OracleScores(data, labels)
    refs = {
        "post0": (a_np - x_np) / sigma**2,
        "post1": (b_np - x_np) / sigma**2,
        "prior": (w_a * a_np + w_b * b_np - x_np) / sigma**2,
        "lik0": w_b * (a_np - b_np) / sigma**2,
        "lik1": w_a * (b_np - a_np) / sigma**2,
    }
    got = {
        "post0": oracle.posterior(x, sigma, 0), "post1": oracle_posterior_score(data, labels, x, sigma, 1),
        "prior": oracle.prior(x, sigma),
        "lik0": oracle.likelihood(x, sigma, 0), "lik1": oracle_likelihood_score(data, labels, x, sigma, 1),
    }
    scale = (np.abs(x_np).max() + np.abs(np.stack([a_np, b_np])).max() + 1.0) / sigma**2
    for key, ref in refs.items():
        np.testing.assert_allclose(got[key].numpy(), ref, rtol=0, atol=1e-9 * scale, err_msg=key)
    # the brute-force reference used above agrees with the closed form too
    np.testing.assert_allclose(_brute_parzen_score(data, x, sigma).numpy(), refs["prior"], rtol=0, atol=1e-9 * scale)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True)))


def _brute_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    r, f = real.double().tolist(), fake.double().tolist()

    def radii(pts):
        return [sorted(_dist(p, o) for j, o in enumerate(pts) if j != i)[k - 1] for i, p in enumerate(pts)]

    rr, rf = radii(r), radii(f)
    precision = sum(any(_dist(p, o) <= rad for o, rad in zip(r, rr, strict=True)) for p in f) / len(f)
    recall = sum(any(_dist(p, o) <= rad for o, rad in zip(f, rf, strict=True)) for p in r) / len(r)
    return precision, recall


@SETTINGS
@given(
    n_real=st.integers(6, 30),
    n_fake=st.integers(6, 30),
    k=st.integers(1, 5),
    shift=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_precision_recall_matches_brute_force(n_real, n_fake, k, shift, seed):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n_real, 2, generator=g)
    fake = 1.5 * torch.randn(n_fake, 2, generator=g) + shift
    assert precision_recall(real, fake, k=k) == pytest.approx(_brute_precision_recall(real, fake, k), abs=1e-12)
    # k-th neighbour distances
    rr = kth_nn_distance(real, k)
    pts = real.double().tolist()
    for i, p in enumerate(pts):
        assert math.isclose(
            float(rr[i]), sorted(_dist(p, o) for j, o in enumerate(pts) if j != i)[k - 1], rel_tol=1e-9, abs_tol=1e-12
        )


def test_precision_recall_known_answers():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 3, generator=g)
    assert precision_recall(real, real.clone(), k=5) == (1.0, 1.0)
    assert precision_recall(real, real + 1e6, k=5) == (0.0, 0.0)
    subset = real[torch.randperm(300, generator=g)[:40]]
    p, r = precision_recall(real, subset, k=5)
    assert p == 1.0
    assert r < 1.0  # 40 points cannot cover all 300 real points' neighbourhoods
    # the k-NN balls are closed: with k + 1 copies of each point every radius is 0 and still contains its centre
    pts = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    dup = pts.repeat_interleave(4, dim=0)
    assert precision_recall(dup, dup.flip(0), k=3) == (1.0, 1.0)
    assert precision_recall(dup, dup + 1e-3, k=3) == (0.0, 0.0)
    # image-shaped input is flattened
    assert precision_recall(real.reshape(300, 3, 1), real.reshape(300, 1, 3), k=3) == (1.0, 1.0)


def test_sliced_wasserstein_identical_sets_is_zero():
    a = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(a, a.clone(), generator=torch.Generator().manual_seed(1)) == 0.0
    # a permutation of the same points is the same empirical distribution
    perm = a[torch.randperm(500, generator=torch.Generator().manual_seed(2))]
    assert sliced_wasserstein(a, perm, generator=torch.Generator().manual_seed(1)) == 0.0


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    d=st.lists(st.floats(-5.0, 5.0), min_size=2, max_size=2).filter(lambda v: math.hypot(*v) > 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_sliced_wasserstein_of_a_pure_shift(d, seed):
    n, n_proj = 200, 256
    shift = torch.tensor(d, dtype=torch.float64)
    a = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = sliced_wasserstein(a, a + shift, n_projections=n_proj, generator=torch.Generator().manual_seed(seed + 1))
    # (1) exact: along unit u the projections are shifted by <u, d>, so each 1-D W1 is |<u, d>|; the same
    #     generator seed gives the same directions u ~ N(0, I)/||.||
    u = torch.randn(2, n_proj, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    u = u / u.norm(dim=0, keepdim=True)
    assert math.isclose(got, float((shift @ u).abs().mean()), rel_tol=1e-9)
    # (2) closed form over uniform directions in 2-D: E|<u, d>| = |d| E|cos theta| = 2|d|/pi, with
    #     Var|cos theta| = 1/2 - 4/pi^2 giving the Monte-Carlo standard error over n_proj directions
    norm = float(shift.norm())
    se = norm * math.sqrt(0.5 - 4.0 / math.pi**2) / math.sqrt(n_proj)
    assert abs(got - 2.0 * norm / math.pi) < 4.0 * se


def test_sliced_wasserstein_independent_shifted_gaussian_clouds():
    n, n_proj = 4000, 256
    shift = torch.tensor([2.0, -1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(n, 2, generator=g, dtype=torch.float64)
    b = torch.randn(n, 2, generator=g, dtype=torch.float64) + shift
    got = sliced_wasserstein(a, b, n_projections=n_proj, generator=torch.Generator().manual_seed(6))
    norm = float(shift.norm())
    # direction sampling error, plus the per-direction difference of the two sample means (sd sqrt(2/n))
    se = math.sqrt((norm**2 * (0.5 - 4.0 / math.pi**2)) / n_proj + 2.0 / n)
    assert abs(got - 2.0 * norm / math.pi) < 4.0 * se


def test_sliced_wasserstein_same_distribution_different_sizes_is_zero():
    # a and a repeated twice are the same empirical distribution, so every 1-D W1 is 0
    a = torch.tensor([[0.0], [1.0]])
    assert sliced_wasserstein(a, a.repeat(2, 1), n_projections=4, generator=torch.Generator().manual_seed(0)) == 0.0


@SETTINGS
@given(b=st.integers(1, 20), shape=st.sampled_from([(2,), (3, 2)]), seed=st.integers(0, 2**31 - 1))
def test_mean_score_distance_matches_manual(b, shape, seed):
    g = torch.Generator().manual_seed(seed)
    est, ref = torch.randn((b, *shape), generator=g), torch.randn((b, *shape), generator=g)
    manual = (
        sum(
            math.sqrt(sum((float(p) - float(q)) ** 2 for p, q in zip(e.flatten(), r.flatten(), strict=True)))
            for e, r in zip(est, ref, strict=True)
        )
        / b
    )
    assert math.isclose(mean_score_distance(est, ref), manual, rel_tol=1e-12)
    assert mean_score_distance(est, est) == 0.0


def test_oracle_posterior_of_two_separated_clusters_is_its_cluster():
    """Two classes of points 1000 sigma apart: near class y's cluster, p(y|x) = 1 to machine precision, so the
    likelihood score is 0 and the posterior equals the prior (both the cluster's own Parzen score), while the
    other class's posterior is the far-field score (nearest point - x)/sigma^2."""
    g = torch.Generator().manual_seed(0)
    c0 = torch.randn(6, 2, generator=g, dtype=torch.float64)
    c1 = torch.randn(5, 2, generator=g, dtype=torch.float64) + torch.tensor([1000.0, 0.0], dtype=torch.float64)
    data, labels = torch.cat([c0, c1]), torch.tensor([0] * 6 + [1] * 5)
    sigma = 1.0
    x = torch.randn(9, 2, generator=g, dtype=torch.float64)  # near class 0
    oracle = OracleScores(data, labels)
    own = _naive_parzen_score(c0, x, sigma)  # no underflow this close
    torch.testing.assert_close(oracle.prior(x, sigma), own, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(oracle.posterior(x, sigma, 0), own, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(oracle.likelihood(x, sigma, 0), torch.zeros_like(x), rtol=0, atol=1e-9)
    nearest = c1[torch.cdist(x, c1).argmin(1)]
    torch.testing.assert_close(oracle.posterior(x, sigma, 1), (nearest - x) / sigma**2, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(ma=st.integers(1, 40), mb=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_sliced_wasserstein_in_one_dimension_is_exact_w1(ma, mb, seed):
    # in 1-D every unit direction is +-1, so sliced W1 is the W1 of the two empirical distributions
    from scipy.stats import wasserstein_distance

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(ma, 1, generator=g, dtype=torch.float64)
    b = 2 + torch.randn(mb, 1, generator=g, dtype=torch.float64)
    got = sliced_wasserstein(a, b, n_projections=3, generator=g)
    assert math.isclose(got, wasserstein_distance(a[:, 0].numpy(), b[:, 0].numpy()), rel_tol=1e-9, abs_tol=1e-12)


class _ShiftedOracle:
    """The oracle with its prior score shifted by a constant vector: a method with known errors."""

    def __init__(self, oracle, shift: torch.Tensor, lik_scale: float = 1.0) -> None:
        self.oracle, self.shift, self.lik_scale = oracle, shift, lik_scale

    def prior(self, x, sigma):
        return self.oracle.prior(x, sigma) + self.shift

    def likelihood(self, x, sigma, y):
        return self.lik_scale * self.oracle.likelihood(x, sigma, y)


def test_score_error_metrics_known_answers_on_data_and_grid():
    from dlsm.data.points import two_moons
    from dlsm.eval.points import Evaluation, score_error_metrics
    from dlsm.math.oracle import OracleScores
    from dlsm.math.schedules import noise_schedule

    data = two_moons(400)
    oracle = OracleScores(data.x, data.y)
    shift = torch.tensor([0.3, -0.4])  # |shift| = 0.5
    methods = {
        "oracle": oracle,
        "shifted": _ShiftedOracle(oracle, shift),
        "doubled": _ShiftedOracle(oracle, torch.zeros(2), lik_scale=2.0),
    }
    ev = Evaluation(data, noise_schedule(data.x, num_scales=5), methods, oracle=oracle)
    out = score_error_metrics(ev, sigmas=(0.5, 7.5), n_points=50, grid_size=6)
    assert not any(k.startswith("oracle/") for k in out)
    for c in (0, 1):
        for s in ("0.5", "7.5"):
            for suffix in ("", "_grid"):
                assert out[f"shifted/c{c}/D_P{suffix}/s{s}"] == pytest.approx(0.5, abs=1e-5)
                assert out[f"shifted/c{c}/D_L{suffix}/s{s}"] == pytest.approx(0.0, abs=1e-9)
                # doubling the likelihood score: D_P = D_L = E||oracle likelihood||, nonzero
                assert out[f"doubled/c{c}/D_P{suffix}/s{s}"] == pytest.approx(out[f"doubled/c{c}/D_L{suffix}/s{s}"])
        # on the grid at sigma = 7.5 the true likelihood score is far from zero (the paper's point)
        assert out[f"doubled/c{c}/D_L_grid/s7.5"] > 0.01


def test_likelihood_tracker_known_answers():
    """A classifier whose logits do not depend on x has likelihood score 0, so its E[D_L] is the mean
    norm of the oracle's likelihood score on the same points; with zero logits its CE is log 2."""
    from torch import nn

    from dlsm.data.points import two_moons
    from dlsm.eval.points import LikelihoodScoreTracker

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(2))

        def forward(self, x, sigma):
            return self.b.expand(x.shape[0], 2) + 0.0 * x.sum(1, keepdim=True)

    data = two_moons(600, scale=20.0)
    tr = LikelihoodScoreTracker(data, sigmas=(2.0, 7.5), n_points=64, grid_size=5)
    out = tr(Flat())
    assert set(out) == {f"track/{k}/s{s}" for k in ("D_L", "D_L_grid", "ce") for s in ("2", "7.5")}
    for (key, _sigma, _c), (x, _) in tr.points.items():
        assert x.shape[0] == (64 if key == "D_L" else 25)
    for sigma in (2.0, 7.5):
        for key in ("D_L", "D_L_grid"):
            expect = sum(
                float(oracle_likelihood_score(data.x.double(), data.y, tr.points[key, sigma, c][0].double(), sigma, c)
                      .norm(dim=1).mean()) for c in (0, 1)) / 2
            assert out[f"track/{key}/s{sigma:g}"] == pytest.approx(expect, rel=1e-5)  # float32 points
        assert out[f"track/ce/s{sigma:g}"] == pytest.approx(math.log(2), abs=1e-6)


def test_mean_and_ci_matches_scipy_t_interval():
    import numpy as np
    from scipy import stats

    from dlsm.report.plots import mean_and_ci

    runs = np.random.default_rng(0).normal(size=(5, 7))
    mean, half = mean_and_ci(runs)
    lo, hi = stats.t.interval(0.95, 4, loc=runs.mean(0), scale=stats.sem(runs, axis=0))
    assert np.allclose(mean - half, lo) and np.allclose(mean + half, hi)
    assert np.all(mean_and_ci(runs[:1])[1] == 0)


def test_posterior_sm_scores_follow_bayes_rule():
    from dlsm.math.scores import PosteriorSMScores

    prior = lambda x, s: -x  # noqa: E731
    class_models = [lambda x, s: -(x - 1.0), lambda x, s: -(x + 2.0)]
    sc = PosteriorSMScores(prior, class_models)
    x = torch.randn(10, 2)
    assert torch.allclose(sc.posterior(x, 1.0, 1), -(x + 2.0))
    assert torch.allclose(sc.likelihood(x, 1.0, 0), torch.ones_like(x))  # posterior - prior
    assert torch.allclose(sc.posterior_fn(0)(x, 1.0), -(x - 1.0))  # class 0's model, not the prior
    assert torch.allclose(sc.likelihood(x, 1.0, 1), torch.full_like(x, -2.0))
