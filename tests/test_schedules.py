"""Noise schedules and the NCSNv2 techniques (dlsm.math.schedules), each checked against an independent computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlsm.errors import ConfigError
from dlsm.math.schedules import (
    geometric_sigmas,
    langevin_step_sizes,
    log_uniform_sigmas,
    max_pairwise_distance,
    noise_schedule,
    proposition3_ratio,
    technique2_num_scales,
    technique2_overlap,
    technique2_ratio,
    technique4_step_size,
)

SETTINGS = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True)
def _no_gin_bindings():
    """noise_schedule is a gin configurable: a test that parsed a gin file before this one on the same worker
    (pytest-xdist) must not change its defaults here."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


def _phi(x: float) -> float:
    """Standard normal CDF via erf (independent of scipy.special.ndtr used by the library)."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _overlap_ref(gamma: float, dim: int) -> float:
    a = math.sqrt(2.0 * dim) * (gamma - 1.0)
    return _phi(a + 3.0 * gamma) - _phi(a - 3.0 * gamma)


def _ratio_ref(eps: np.ndarray, gamma: float, sigma_min: float, n_steps: int) -> np.ndarray:
    """Proposition 3 written out again in numpy float64, vectorised over eps."""
    s2 = sigma_min**2
    k = 1.0 - eps / s2
    c = 2.0 * eps / (s2 - s2 * k**2)
    return k ** (2 * n_steps) * (gamma**2 - c) + c


def _brute_force_min_gap(gamma: float, sigma_min: float, n_steps: int) -> tuple[float, float]:
    """(min |ratio - 1|, argmin eps) over a dense grid of eps in (0, sigma_min^2)."""
    s2 = sigma_min**2
    grid = np.concatenate([np.geomspace(s2 * 1e-8, s2 * 0.999, 400_001), np.linspace(s2 * 1e-3, s2 * 0.999, 100_001)])
    gap = np.abs(_ratio_ref(grid, gamma, sigma_min, n_steps) - 1.0)
    i = int(np.argmin(gap))
    return float(gap[i]), float(grid[i])


# --------------------------------------------------------------------------------------------
# geometric sigmas and step sizes
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(
    sigma_min=st.floats(1e-3, 1.0),
    log_ratio=st.floats(math.log(2.0), math.log(1e5)),
    n=st.integers(2, 300),
)
def test_geometric_sigmas_descending_endpoints_constant_ratio(sigma_min, log_ratio, n):
    sigma_max = sigma_min * math.exp(log_ratio)
    sig = geometric_sigmas(sigma_max, sigma_min, n)
    assert sig.shape == (n,)
    assert sig.dtype == torch.float32
    s = sig.double()
    assert bool((s[1:] < s[:-1]).all())
    assert math.isclose(float(s[0]), sigma_max, rel_tol=1e-6)
    assert math.isclose(float(s[-1]), sigma_min, rel_tol=1e-6)
    expected_ratio = (sigma_max / sigma_min) ** (1.0 / (n - 1))
    ratios = (s[:-1] / s[1:]).numpy()
    np.testing.assert_allclose(ratios, expected_ratio, rtol=2e-7 * 4)
    # and each element is the closed form sigma_max * (sigma_min/sigma_max)^(i/(n-1))
    closed = [sigma_max * (sigma_min / sigma_max) ** (i / (n - 1)) for i in range(n)]
    np.testing.assert_allclose(s.numpy(), closed, rtol=1e-6)


@pytest.mark.parametrize("args", [(1.0, 1.0, 10), (1.0, 2.0, 10), (1.0, 0.0, 10), (1.0, 0.1, 1)])
def test_geometric_sigmas_rejects_bad_arguments(args):
    with pytest.raises(ConfigError):
        geometric_sigmas(*args)


def test_langevin_step_sizes_follow_ncsnv2_rule():
    sig = geometric_sigmas(30.0, 0.05, 17)
    eps = 3.3e-6
    alpha = langevin_step_sizes(sig, eps)
    sl = float(sig[-1])
    expected = [eps * float(s) ** 2 / sl**2 for s in sig]
    np.testing.assert_allclose(alpha.double().numpy(), expected, rtol=1e-6)
    assert math.isclose(float(alpha[-1]), eps, rel_tol=1e-6)


def test_log_uniform_sigmas_is_log_uniform():
    lo, hi, n = 0.01, 50.0, 20_000
    s = log_uniform_sigmas(n, lo, hi, generator=torch.Generator().manual_seed(0)).double()
    assert bool((s >= lo * (1 - 1e-6)).all()) and bool((s <= hi * (1 + 1e-6)).all())
    # log sigma ~ U(a, b): mean (a+b)/2, sd (b-a)/sqrt(12)
    a, b = math.log(lo), math.log(hi)
    se = (b - a) / math.sqrt(12.0) / math.sqrt(n)
    assert abs(float(s.log().mean()) - 0.5 * (a + b)) < 4 * se
    # fraction below the geometric midpoint is 1/2 (binomial standard error)
    frac = float((s < math.sqrt(lo * hi)).double().mean())
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / n)


# --------------------------------------------------------------------------------------------
# Technique 1
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(
    n=st.integers(2, 37),
    shape=st.sampled_from([(1,), (2,), (5,), (2, 3), (3, 1, 2)]),
    chunk=st.integers(1, 8),
    offset=st.floats(-50.0, 50.0),
    scale=st.floats(0.01, 20.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_max_pairwise_distance_matches_brute_force(n, shape, chunk, offset, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = offset + scale * torch.randn((n, *shape), generator=g, dtype=torch.float64)
    rows = x.reshape(n, -1).tolist()
    brute = 0.0
    for a, b in itertools.product(rows, rows):
        brute = max(brute, math.sqrt(sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True))))
    got = max_pairwise_distance(x, chunk_size=chunk)
    assert math.isclose(got, brute, rel_tol=1e-9, abs_tol=1e-9 * (abs(offset) + scale))
    flat = x.reshape(n, -1)
    assert math.isclose(got, float(torch.cdist(flat, flat).max()), rel_tol=1e-9, abs_tol=1e-9 * (abs(offset) + scale))
    # float32 input and the default chunk size give the same answer up to float32 rounding of the data
    got32 = max_pairwise_distance(x.float())
    assert math.isclose(got32, brute, rel_tol=1e-5, abs_tol=1e-5 * (abs(offset) + scale))


def test_max_pairwise_distance_known_answer():
    # a unit square's diagonal, with a duplicate and the chunk size not dividing N
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    assert math.isclose(max_pairwise_distance(x, chunk_size=2), math.sqrt(2.0), rel_tol=1e-12)
    assert max_pairwise_distance(x[:1], chunk_size=2) == 0.0


def test_max_pairwise_distance_of_identical_points_is_zero():
    x = 19.0 * torch.randn((1, 5), generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    assert max_pairwise_distance(x.repeat(3, 1), chunk_size=1) < 1e-12


# --------------------------------------------------------------------------------------------
# Technique 2
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(gamma=st.floats(1.0, 1.5), dim=st.integers(1, 100_000))
def test_technique2_overlap_matches_erf_formula(gamma, dim):
    assert math.isclose(technique2_overlap(gamma, dim), _overlap_ref(gamma, dim), rel_tol=1e-9, abs_tol=1e-12)


def test_technique2_cifar10_default_overlap_gives_220_scales():
    d, smax, smin = 3072, 50.0, 0.01
    gamma = technique2_ratio(d)
    assert gamma > 1.0
    assert math.isclose(_overlap_ref(gamma, d), 0.5, abs_tol=1e-9)
    assert technique2_num_scales(smax, smin, d) == 220
    # 220 is the smallest count whose geometric ratio does not exceed gamma:
    # with 220 scales the overlap is >= 0.5, with 219 it is < 0.5.
    assert _overlap_ref((smax / smin) ** (1 / 219), d) >= 0.5
    assert _overlap_ref((smax / smin) ** (1 / 218), d) < 0.5


# NCSNv2's released configs (github.com/ermongroup/ncsnv2, configs/*.yml: sigma_begin, sigma_end = 0.01,
# num_classes). With N = ceil(log(sigma_max/sigma_min)/log gamma) + 1 the overlaps reproducing each count are
# CIFAR-10 (0.5640, 0.5670], CelebA (0.5647, 0.5669], church (0.5648, 0.5662], bedroom (0.5654, 0.5665],
# FFHQ (0.5664, 0.5669]: church and FFHQ do not intersect, so no one overlap gives all five.
_NCSNV2 = [
    pytest.param(3072, 50.0, 232, id="cifar10"),
    pytest.param(12288, 90.0, 500, id="celeba"),
    pytest.param(3 * 96 * 96, 140.0, 788, id="church"),
    pytest.param(3 * 128 * 128, 190.0, 1086, id="bedroom"),
]


@pytest.mark.parametrize(("dim", "sigma_max", "published"), _NCSNV2)
def test_technique2_reproduces_ncsnv2_published_counts(dim, sigma_max, published):
    assert technique2_num_scales(sigma_max, 0.01, dim, overlap=0.566) == published
    # and the published count is the fewest scales reaching overlap 0.566 (checked with the erf formula)
    assert _overlap_ref((sigma_max / 0.01) ** (1 / (published - 1)), dim) >= 0.566
    assert _overlap_ref((sigma_max / 0.01) ** (1 / (published - 2)), dim) < 0.566


def test_technique2_ffhq_is_one_scale_below_ncsnv2():
    """FFHQ, 256 x 256 x 3, sigma_begin 348, sigma_end 0.01: NCSNv2's configs/ffhq.yml has num_classes 2311.

    At overlap 0.566, gamma = 1.0045408 and log(348/0.01)/log(gamma) = 2308.18, so the formula gives
    ceil(2308.18) + 1 = 2310. The geometric ratio of 2310 scales has overlap 0.56640 >= 0.566 already
    (2309 scales: 0.56591 < 0.566), so 2310 is the fewest scales at that target; NCSNv2's 2311 scales have
    overlap 0.56688, i.e. FFHQ was set with one scale more than its other four configs' common target requires.
    Any target in (0.56640, 0.56688] gives 2311 but then church (788 needs <= 0.56620) gets 789.
    """
    dim, smax, smin, published = 3 * 256 * 256, 348.0, 0.01, 2311
    assert technique2_num_scales(smax, smin, dim, overlap=0.566) == 2310 == published - 1

    def ov(n: int) -> float:
        return _overlap_ref((smax / smin) ** (1 / (n - 1)), dim)

    assert ov(2309) < 0.566 <= ov(2310)
    assert ov(2310) == pytest.approx(0.56640, abs=5e-5) and ov(published) == pytest.approx(0.56688, abs=5e-5)
    assert technique2_num_scales(smax, smin, dim, overlap=0.5665) == published
    assert technique2_num_scales(140.0, smin, 3 * 96 * 96, overlap=0.5665) == 789  # church one over its 788


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_technique2_low_dimension_raises(dim):
    with pytest.raises(ConfigError):
        technique2_ratio(dim)
    with pytest.raises(ConfigError):
        technique2_num_scales(10.0, 0.01, dim)


# --------------------------------------------------------------------------------------------
# Proposition 3 / Technique 4
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(
    eps_frac=st.floats(1e-4, 0.999),
    gamma=st.floats(1.001, 3.0),
    sigma_min=st.floats(1e-3, 2.0),
    level=st.floats(1.0, 1e4),
    n_steps=st.integers(1, 12),
)
def test_proposition3_ratio_matches_variance_recursion(eps_frac, gamma, sigma_min, level, n_steps):
    """For data concentrated at 0, p_sigma_i = N(0, sigma_i^2): one Langevin step is
    x <- (1 - a/sigma_i^2) x + sqrt(2a) z, so Var <- (1 - a/sigma_i^2)^2 Var + 2a, a = eps sigma_i^2/sigma_L^2,
    starting from the previous level's variance sigma_{i-1}^2 = gamma^2 sigma_i^2."""
    eps = eps_frac * sigma_min**2
    sigma_i = sigma_min * level
    a = eps * sigma_i**2 / sigma_min**2
    v = gamma**2 * sigma_i**2
    for _ in range(n_steps):
        v = (1.0 - a / sigma_i**2) ** 2 * v + 2.0 * a
    assert math.isclose(proposition3_ratio(eps, gamma, sigma_min, n_steps), v / sigma_i**2, rel_tol=1e-8)


def test_technique4_cifar10_step_size_and_minimality():
    gamma, sigma_min, t = (50.0 / 0.01) ** (1.0 / 231), 0.01, 5
    eps = technique4_step_size(gamma, sigma_min, t)
    assert f"{eps:.1e}" == "6.2e-06"
    assert 0.0 < eps < sigma_min**2
    best_gap, best_eps = _brute_force_min_gap(gamma, sigma_min, t)
    gap = abs(float(_ratio_ref(np.array(eps), gamma, sigma_min, t)) - 1.0)
    assert gap <= best_gap * (1.0 + 1e-9)
    assert math.isclose(eps, best_eps, rel_tol=1e-3)


@settings(max_examples=10, deadline=None)
@given(gamma=st.floats(1.01, 1.5), sigma_min=st.floats(1e-3, 1.0), n_steps=st.integers(1, 10))
def test_technique4_is_a_minimiser(gamma, sigma_min, n_steps):
    eps = technique4_step_size(gamma, sigma_min, n_steps)
    best_gap, _ = _brute_force_min_gap(gamma, sigma_min, n_steps)
    gap = abs(float(_ratio_ref(np.array(eps), gamma, sigma_min, n_steps)) - 1.0)
    assert gap <= best_gap * (1.0 + 1e-7) + 1e-12


# --------------------------------------------------------------------------------------------
# noise_schedule
# --------------------------------------------------------------------------------------------


def _data(n: int = 120, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return 3.0 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_noise_schedule_all_auto():
    data = _data()
    sched = noise_schedule(data, n_steps_each=4)
    flat = data.double()
    smax = float(torch.cdist(flat, flat).max())
    assert math.isclose(sched.sigma_max, smax, rel_tol=1e-6)
    assert math.isclose(sched.sigma_min, 0.01, rel_tol=1e-6)
    n = len(sched.sigmas)
    dim = data.shape[1]
    # Technique 2: n is the fewest scales whose geometric ratio keeps the overlap >= 0.5
    assert _overlap_ref((smax / 0.01) ** (1.0 / (n - 1)), dim) >= 0.5 - 1e-9
    assert _overlap_ref((smax / 0.01) ** (1.0 / (n - 2)), dim) < 0.5
    # Technique 4 at the schedule's ratio
    gamma = (smax / 0.01) ** (1.0 / (n - 1))
    best_gap, _ = _brute_force_min_gap(gamma, 0.01, 4)
    assert abs(float(_ratio_ref(np.array(sched.eps), gamma, 0.01, 4)) - 1.0) <= best_gap * (1 + 1e-7)
    assert sched.n_steps_each == 4
    params = sched.as_params()
    assert params["schedule.num_scales"] == n and params["schedule.n_steps_each"] == 4
    assert params["schedule.eps"] == sched.eps


def test_noise_schedule_numbers_are_used_verbatim():
    sched = noise_schedule(_data(dim=2), sigma_max=7.0, sigma_min=0.1, num_scales=12, eps=3e-5, n_steps_each=3)
    expected = [7.0 * (0.1 / 7.0) ** (i / 11) for i in range(12)]
    np.testing.assert_allclose(sched.sigmas.double().numpy(), expected, rtol=1e-6)
    assert sched.eps == 3e-5
    assert sched.n_steps_each == 3
    # an integral float is an acceptable scale count
    assert len(noise_schedule(_data(dim=2), sigma_max=7.0, num_scales=12.0, eps=1e-5).sigmas) == 12


def test_noise_schedule_auto_sigma_max_with_numeric_rest():
    data = _data(n=50, dim=2, seed=3)
    sched = noise_schedule(data, num_scales=5, eps=1e-6)
    assert math.isclose(sched.sigma_max, float(torch.cdist(data.double(), data.double()).max()), rel_tol=1e-6)


def test_noise_schedule_two_dimensional_auto_scales_raises():
    with pytest.raises(ConfigError):
        noise_schedule(_data(dim=2), sigma_max=10.0)


@settings(max_examples=20, deadline=None)
@given(
    field=st.sampled_from(["sigma_max", "sigma_min", "num_scales", "eps"]),
    bad=st.one_of(st.text(max_size=5).filter(lambda s: s != "auto"), st.just("abc"), st.booleans(), st.none()),
)
def test_noise_schedule_bad_values_raise_config_error(field, bad):
    kwargs = {"sigma_max": 10.0, "sigma_min": 0.01, "num_scales": 10, "eps": 1e-5, field: bad}
    with pytest.raises(ConfigError):
        noise_schedule(_data(dim=2), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_scales": 2.5}, {"n_steps_each": 0}, {"n_steps_each": 1.5}, {"sigma_min": "auto"}, {"sigma_max": "abc"}],
)
def test_noise_schedule_other_bad_values(kwargs):
    base = {"sigma_max": 10.0, "num_scales": 10, "eps": 1e-5}
    with pytest.raises(ConfigError):
        noise_schedule(_data(dim=2), **{**base, **kwargs})


# --------------------------------------------------------------------------------------------
# Found by mutation testing (docs/mutation.md)
# --------------------------------------------------------------------------------------------


def test_log_uniform_sigmas_draw_from_the_given_generator():
    """The values are exp(log lo + u (log hi - log lo)) with u the generator's torch.rand stream (float64 here)."""
    lo, hi = 0.01, 50.0
    torch.manual_seed(123)  # the global stream must play no part
    got = log_uniform_sigmas(6, lo, hi, generator=torch.Generator().manual_seed(5))
    u = torch.rand(6, generator=torch.Generator().manual_seed(5)).double()
    expected = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0.0)


def test_max_pairwise_distance_of_float32_data_is_computed_in_float64():
    """float32 points, the answer of their exact (float64) values to 1e-12: the docstring's float64 promise."""
    x = 1e3 + torch.randn(300, 7, generator=torch.Generator().manual_seed(4))
    flat = x.double()
    exact = float(torch.cdist(flat, flat).max())
    assert math.isclose(max_pairwise_distance(x), exact, rel_tol=1e-12)
    assert math.isclose(max_pairwise_distance(x, chunk_size=7), exact, rel_tol=1e-12)


@pytest.mark.parametrize("dim", [2, 4])
def test_technique2_low_dimension_error_names_the_fix(dim):
    with pytest.raises(ConfigError) as err:
        technique2_ratio(dim)
    assert str(err.value) == (f"Technique 2 has no solution for data dimension D={dim} (it needs D >= 5); "
                              "set noise_schedule.num_scales to a number")


@pytest.mark.parametrize(("dim", "k"), [(3072, 40), (8, 7), (100, 25)])
def test_technique2_num_scales_when_the_range_is_an_exact_power_of_the_ratio(dim, k):
    """sigma_max / sigma_min = gamma^k is covered by exactly k ratios, k + 1 scales (no extra one for rounding)."""
    gamma = technique2_ratio(dim)
    assert technique2_num_scales(0.01 * gamma**k, 0.01, dim) == k + 1
    assert technique2_num_scales(0.01 * gamma**k * 1.001, 0.01, dim) == k + 2


def _technique4_reference(gamma: float, sigma_min: float, n_steps: int) -> float:
    """The minimiser of Proposition 3's ratio R(u), u = eps / sigma_L^2 in (0, 1), as the root of R'(u) in closed
    form: R(u) = (1 - u)^(2T) (gamma^2 - c) + c with c = 2 / (2 - u)."""
    from scipy.optimize import brentq

    def d_ratio(u: float) -> float:
        c, dc = 2.0 / (2.0 - u), 2.0 / (2.0 - u) ** 2
        return -2 * n_steps * (1 - u) ** (2 * n_steps - 1) * (gamma**2 - c) - (1 - u) ** (2 * n_steps) * dc + dc

    return brentq(d_ratio, 1e-12, 1.0 - 1e-12, xtol=1e-17) * sigma_min**2


@pytest.mark.parametrize(("gamma", "sigma_min", "n_steps"), [(1.0157, 0.01, 5), (1.5, 0.5, 10), (1.3, 0.9, 7)])
def test_technique4_step_size_to_1e_7(gamma, sigma_min, n_steps):
    """Where Proposition 3's ratio stays above 1 (these cases), Technique 4's eps is the ratio's minimiser; found to
    a relative 5e-8 (its log-eps tolerance is 1e-10; floating point limits it to ~1e-8)."""
    eps = technique4_step_size(gamma, sigma_min, n_steps)
    assert proposition3_ratio(eps, gamma, sigma_min, n_steps) > 1.0
    assert math.isclose(eps, _technique4_reference(gamma, sigma_min, n_steps), rel_tol=5e-8)


def test_schedule_params_are_logged_under_their_names():
    sched = noise_schedule(_data(dim=2), sigma_max=7.0, sigma_min=0.25, num_scales=12, eps=3e-5, n_steps_each=3)
    assert sched.as_params() == {
        "schedule.sigma_max": pytest.approx(7.0, rel=1e-6), "schedule.sigma_min": pytest.approx(0.25, rel=1e-6),
        "schedule.num_scales": 12, "schedule.eps": 3e-5, "schedule.n_steps_each": 3,
    }


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sigma_max": "abc"}, "noise_schedule.sigma_max must be a number or 'auto', got 'abc'"),
    ({"sigma_min": "abc"}, "noise_schedule.sigma_min must be a number or 'auto', got 'abc'"),
    ({"sigma_min": "auto"}, "noise_schedule.sigma_min must be a number"),
    ({"num_scales": "abc"}, "noise_schedule.num_scales must be a number or 'auto', got 'abc'"),
    ({"num_scales": 2.5}, "noise_schedule.num_scales must be an integer, got 2.5"),
    ({"eps": None}, "noise_schedule.eps must be a number or 'auto', got None"),
    ({"n_steps_each": 0}, "noise_schedule.n_steps_each must be a positive integer, got 0"),
    ({"sigma_min": 20.0}, "need sigma_max > sigma_min > 0, got sigma_max=10.0, sigma_min=20.0"),
    ({"num_scales": 1}, "num_scales must be at least 2, got 1"),
])
def test_noise_schedule_errors_name_the_binding_and_value(kwargs, message):
    base = {"sigma_max": 10.0, "sigma_min": 0.01, "num_scales": 10, "eps": 1e-5}
    with pytest.raises(ConfigError) as err:
        noise_schedule(_data(dim=2), **{**base, **kwargs})
    assert str(err.value).split("\n")[0] == message  # gin adds a line naming the configurable


def test_noise_schedule_defaults_and_one_langevin_step():
    sched = noise_schedule(_data(dim=2), sigma_max=10.0, num_scales=10, eps=1e-5)
    assert sched.n_steps_each == 5 and sched.sigma_min == pytest.approx(0.01)  # NCSNv2's T = 5, sigma_L = 0.01
    assert noise_schedule(_data(dim=2), sigma_max=10.0, num_scales=10, eps=1e-5, n_steps_each=1).n_steps_each == 1


def test_noise_schedule_reads_a_dataset_x_and_passes_the_overlap():
    """A dataset (an object with ``x``) gives the schedule of its tensor; ``overlap`` reaches Technique 2; one
    example is enough when sigma_max is given."""
    from types import SimpleNamespace

    data = _data(n=60, dim=8, seed=2)
    auto = noise_schedule(SimpleNamespace(x=data), eps=1e-5)
    smax = float(torch.cdist(data.double(), data.double()).max())
    assert math.isclose(auto.sigma_max, smax, rel_tol=1e-6)
    assert len(auto.sigmas) == technique2_num_scales(auto.sigma_max, 0.01, 8)
    wide = noise_schedule(data, eps=1e-5, overlap=0.9)
    assert len(wide.sigmas) == technique2_num_scales(wide.sigma_max, 0.01, 8, overlap=0.9) > len(auto.sigmas)
    one = noise_schedule(data[:1], sigma_max=50.0, eps=1e-5)
    assert len(one.sigmas) == technique2_num_scales(50.0, 0.01, 8)


@pytest.mark.parametrize(("dim", "overlap"), [(7, 0.2), (8, 0.05), (8, 0.1), (3072, 0.5), (5, 0.5), (6, 0.5),
                                             (5, 0.05), (5, 0.99), (12288, 0.99)])
def test_technique2_ratio_solves_low_overlaps_in_low_dimension(dim, overlap):
    """Large ratios (gamma ~ 5-6 for D = 7, 8) are found too: the overlap at the returned ratio is the target."""
    gamma = technique2_ratio(dim, overlap)
    assert gamma > 1.0 and math.isclose(_overlap_ref(gamma, dim), overlap, rel_tol=1e-9, abs_tol=1e-12)


def test_technique2_ratio_at_d5_and_d6_is_the_large_root_the_old_bracket_missed():
    """D = 5: the overlap first reaches 0.5 where a = 3 gamma, i.e. gamma = sqrt(10) / (sqrt(10) - 3) ~ 19.5 (the
    other half, Phi(a + 3 gamma), is 1 to 1e-16 there); the bracket [1, 1 + 20 / sqrt(2D)] ended at overlap 0.976."""
    s = math.sqrt(10.0)
    assert math.isclose(technique2_ratio(5, 0.5), s / (s - 3.0), rel_tol=1e-9)
    gamma6 = technique2_ratio(6, 0.5)
    assert 6.0 < gamma6 < 8.0 and math.isclose(_overlap_ref(gamma6, 6), 0.5, rel_tol=1e-9)


@pytest.mark.parametrize("overlap", [0.99731, 0.999, 1.0, 1.5, 0.0, -0.1])
def test_technique2_overlap_outside_its_range_is_one_line(overlap):
    """The overlap is Phi(3) - Phi(-3) = 0.99730 at gamma = 1; no ratio > 1 gives a target at or above it, nor 0."""
    top = _phi(3.0) - _phi(-3.0)
    with pytest.raises(ConfigError) as err:
        technique2_ratio(8, overlap)
    assert str(err.value) == (f"Technique 2's overlap must be in (0, {top:.4f}) (its value at gamma = 1), "
                              f"got {overlap!r}")
