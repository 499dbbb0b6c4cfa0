"""The EDM Heun sampler (dlsm.math.heun) against closed forms.

For Gaussian data N(mu, s^2 I) the VE-perturbed score is s(x, sigma) = -(x - mu)/(s^2 + sigma^2) and the
probability-flow ODE dx/dsigma = -sigma s(x, sigma) has the exact solution

    x(sigma) = mu + (x(sigma_max) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2)),

so a fixed x0 has one right answer per sample. The sampler's last step (sigma_min -> 0) is an Euler step by
design (EDM Algorithm 1), i.e. Tweedie's x + sigma_min^2 s(x, sigma_min) = mu + (x - mu) s^2/(s^2 + sigma_min^2);
the reference is therefore the exact flow to sigma_min followed by that step, and the Heun steps before it are
what converges, at second order in the number of levels N. Everything is float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from dlsm.errors import ConfigError
from dlsm.math import heun
from dlsm.math.heun import heun_sampler, karras_sigmas
from dlsm.math.scores import ModelScores

F64 = torch.float64
SIGMA_MAX, SIGMA_MIN = 20.0, 0.01
SIGMAS = torch.tensor([SIGMA_MAX, 1.0, SIGMA_MIN], dtype=F64)  # only the ends are read


def gaussian_score(mu: torch.Tensor, s: float):
    def score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        return -(x - mu) / (s**2 + sigma[:, None] ** 2)

    return score


def exact_flow(x0: torch.Tensor, mu: torch.Tensor, s: float, sigma: float, sigma_max: float = SIGMA_MAX):
    """x(sigma) of the VE probability-flow ODE started at x(sigma_max) = x0, Gaussian data N(mu, s^2 I)."""
    return mu + (x0 - mu) * math.sqrt((s**2 + sigma**2) / (s**2 + sigma_max**2))


def reference(x0: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    """The exact flow to sigma_min, then the last (Euler = Tweedie) step to sigma = 0."""
    x = exact_flow(x0, mu, s, SIGMA_MIN)
    return mu + (x - mu) * s**2 / (s**2 + SIGMA_MIN**2)


def _x0(n: int = 256, seed: int = 0) -> torch.Tensor:
    return SIGMA_MAX * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


MU, S = torch.tensor([0.5, -1.0], dtype=F64), 0.5


# --------------------------------------------------------------------------------------------
# the time discretisation (EDM eq. 5)
# --------------------------------------------------------------------------------------------


def _eq5(sigma_min: float, sigma_max: float, n: int, rho: float) -> list[float]:
    """EDM eq. 5 term by term in Python floats (float64)."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)]


@pytest.mark.parametrize("sigma_min,sigma_max,n,rho", [(0.002, 80.0, 18, 7.0), (0.01, 20.0, 5, 3.0),
                                                       (0.01, 50.0, 2, 7.0), (0.3, 2.0, 40, 1.5)])
def test_karras_sigmas_is_eq5(sigma_min, sigma_max, n, rho):
    got = karras_sigmas(sigma_min, sigma_max, n, rho)
    assert got.dtype == F64 and got.shape == (n,)
    torch.testing.assert_close(got, torch.tensor(_eq5(sigma_min, sigma_max, n, rho), dtype=F64), rtol=1e-13, atol=0)
    assert float(got[0]) == sigma_max and float(got[-1]) == sigma_min
    assert bool((got[1:] < got[:-1]).all())


def test_karras_sigmas_rho_one_is_linear_and_rho_packs_levels_near_sigma_min():
    lin = karras_sigmas(0.5, 10.0, 7, 1.0)
    torch.testing.assert_close(lin, torch.linspace(10.0, 0.5, 7, dtype=F64), rtol=1e-14, atol=1e-14)
    # EDM's known 18-level grid for (0.002, 80, 7): sigma_1 and sigma_9 (float64, from eq. 5 by hand)
    edm = karras_sigmas(0.002, 80.0, 18, 7.0)
    a, b = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    assert float(edm[1]) == pytest.approx((a + (b - a) / 17) ** 7, rel=1e-14)
    assert float(edm[9]) == pytest.approx((a + 9 * (b - a) / 17) ** 7, rel=1e-14)
    assert 57.0 < float(edm[1]) < 58.0 and float(edm[-2]) < 0.01
    # larger rho: more of the levels below the geometric midpoint
    mid = math.sqrt(0.002 * 80.0)
    below = [int((karras_sigmas(0.002, 80.0, 18, r) < mid).sum()) for r in (1.0, 3.0, 7.0)]
    assert below[0] < below[1] < below[2]


# --------------------------------------------------------------------------------------------
# the known answer: Gaussian data, second order in N
# --------------------------------------------------------------------------------------------


def _error(n_steps: int, sampler=heun_sampler, **kw) -> float:
    x0 = _x0()
    got = sampler(gaussian_score(MU, S), x0, SIGMAS, n_steps=n_steps, disable=True, **kw)
    assert got.dtype == F64 and got.shape == x0.shape
    return float((got - reference(x0, MU, S)).abs().max())


def _orders(sampler=heun_sampler) -> list[float]:
    errors = [_error(n, sampler) for n in (32, 64, 128, 256)]
    return [errors[i] / errors[i + 1] for i in range(3)]


def test_heun_converges_at_second_order_to_the_exact_ode_map():
    """The max error over 256 samples falls by 4.23, 4.11, 4.06 as N doubles 32 -> 256 (measured): each ratio
    must be within 4 +- 0.4. Euler would give 2."""
    ratios = _orders()
    assert all(abs(r - 4.0) < 0.4 for r in ratios), ratios
    # and the default N = 18 is already close: max error 0.05 for |x0 - mu| up to ~60 (0.1% of the travel)
    assert _error(18) < 0.1


def _euler_only(score_fn, x, sigmas, *, n_steps, disable=None):
    """The deliberate break: the same steps without the trapezoidal correction."""
    t = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n_steps).tolist() + [0.0]
    for i in range(n_steps):
        x = x + (t[i + 1] - t[i]) * (-t[i] * score_fn(x, torch.full((x.shape[0],), t[i], dtype=x.dtype)))
    return x


def test_the_order_check_rejects_first_order_euler():
    ratios = _orders(_euler_only)
    assert all(abs(r - 2.0) < 0.4 for r in ratios), ratios  # first order ...
    assert not all(abs(r - 4.0) < 0.4 for r in ratios)  # ... so the second-order check above would fail


def test_the_exact_map_to_zero_is_within_the_last_euler_step():
    """Against the exact flow to sigma = 0 the only extra error is the final Euler step's,
    |x - mu| (sqrt(s^2/(s^2 + sigma_min^2)) - s^2/(s^2 + sigma_min^2)) ~ |x - mu| sigma_min^2 / (2 s^2)."""
    x0 = _x0()
    got = heun_sampler(gaussian_score(MU, S), x0, SIGMAS, n_steps=256, disable=True)
    exact0 = exact_flow(x0, MU, S, 0.0)
    bias = (exact_flow(x0, MU, S, SIGMA_MIN) - MU).abs() * (math.sqrt(S**2 / (S**2 + SIGMA_MIN**2))
                                                           - S**2 / (S**2 + SIGMA_MIN**2))
    assert bool(((got - exact0).abs() <= bias + 2e-4).all())


def test_float32_follows_float64():
    x0 = _x0()
    got = heun_sampler(gaussian_score(MU.float(), S), x0.float(), SIGMAS.float(), disable=True)
    ref = heun_sampler(gaussian_score(MU, S), x0, SIGMAS, disable=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_callback_sees_each_level_after_its_step():
    seen = []
    n = 6
    heun_sampler(gaussian_score(MU, S), _x0(4), SIGMAS, n_steps=n, disable=True, callback=seen.append)
    assert [c["i"] for c in seen] == list(range(n))
    assert [c["sigma"] for c in seen] == karras_sigmas(SIGMA_MIN, SIGMA_MAX, n).tolist()[1:] + [0.0]


def test_score_evaluations_are_2n_minus_1():
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_score(MU, S)(x, sigma)

    heun_sampler(counting, _x0(4), SIGMAS, n_steps=5, disable=True)
    t = karras_sigmas(SIGMA_MIN, SIGMA_MAX, 5).tolist()
    assert calls == [t[0], t[1], t[1], t[2], t[2], t[3], t[3], t[4], t[4]]  # Euler at t_i, correction at t_{i+1}


def test_defaults_are_edm_algorithm_1_with_18_steps():
    """No setting given: N = 18 (35 evaluations, on the rho = 7 levels), deterministic (no noise drawn), and
    S_noise = 1, S_tmin = 0, S_tmax = inf once S_churn > 0 (the stochastic call equals one with them written out)."""
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_score(MU, S)(x, sigma)

    x = heun_sampler(counting, _x0(4), SIGMAS, disable=True)
    t = karras_sigmas(SIGMA_MIN, SIGMA_MAX, 18, 7.0).tolist()
    assert len(calls) == 35 and calls[0] == pytest.approx(t[0]) and calls[-1] == pytest.approx(t[-1])
    torch.testing.assert_close(x, heun_sampler(gaussian_score(MU, S), _x0(4), SIGMAS, n_steps=18, disable=True,
                                               generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)
    churned = heun_sampler(gaussian_score(MU, S), _x0(4), SIGMAS, s_churn=5.0, disable=True,
                           generator=torch.Generator().manual_seed(3))
    spelled = heun_sampler(gaussian_score(MU, S), _x0(4), SIGMAS, n_steps=18, rho=7.0, s_churn=5.0, s_tmin=0.0,
                           s_tmax=math.inf, s_noise=1.0, disable=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(churned, spelled, rtol=0, atol=0)
    half = heun_sampler(gaussian_score(MU, S), _x0(4), SIGMAS, s_churn=5.0, s_noise=0.5, disable=True,
                        generator=torch.Generator().manual_seed(3))
    assert not torch.equal(churned, half)  # S_noise reaches the churn noise


@pytest.mark.parametrize("rho", [1.0, 3.0])
def test_rho_sets_the_levels_the_score_sees(rho):
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_score(MU, S)(x, sigma)

    heun_sampler(counting, _x0(4), SIGMAS, n_steps=4, rho=rho, disable=True)
    t = karras_sigmas(SIGMA_MIN, SIGMA_MAX, 4, rho).tolist()  # x is float64: the levels as computed
    assert calls == pytest.approx([t[0], t[1], t[1], t[2], t[2], t[3], t[3]], rel=1e-12)
    seven = karras_sigmas(SIGMA_MIN, SIGMA_MAX, 4, 7.0).tolist()
    assert abs(calls[1] - seven[1]) > 1e-3 * seven[1]  # another rho, other levels


def test_callback_x_is_the_state_after_each_step():
    seen = []
    out = heun_sampler(gaussian_score(MU, S), _x0(4), SIGMAS, n_steps=3, disable=True,
                       callback=lambda d: seen.append(d["x"].clone()))
    assert len(seen) == 3 and torch.equal(seen[-1], out)
    assert not torch.equal(seen[0], seen[1])  # x moves between steps


def test_two_steps_is_the_smallest_binding_and_it_parses():
    import gin

    from dlsm import components  # noqa: F401
    from dlsm.config import parse_config

    try:
        parse_config([], ["experiment.sampler = @heun_sampler", "heun_sampler.n_steps = 2"])
        assert gin.query_parameter("heun_sampler.n_steps") == 2
    finally:
        gin.clear_config()


# --------------------------------------------------------------------------------------------
# guidance: two Gaussian classes, a Bayes-exact classifier
# --------------------------------------------------------------------------------------------

M, S_CLASS = torch.tensor([1.5, 0.5], dtype=F64), 0.4
CLASS_MEANS = torch.stack([M, -M])  # class 0 ~ N(+m, s^2 I), class 1 ~ N(-m, s^2 I), equal priors


def _class_logits(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log p_sigma(x|y) up to a constant shared by the classes: p(y|x, sigma) = softmax of these, exactly."""
    v = S_CLASS**2 + sigma[:, None] ** 2
    return -((x[:, None, :] - CLASS_MEANS) ** 2).sum(-1) / (2.0 * v)


def _mixture_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """grad log p_sigma(x) of the equal mixture: sum_k p(k|x, sigma) (-(x - m_k)/(s^2 + sigma^2))."""
    w = torch.softmax(_class_logits(x, sigma), dim=-1)
    v = S_CLASS**2 + sigma[:, None] ** 2
    return -(x - w @ CLASS_MEANS) / v


def _guided(y: int, alpha: float, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = _x0(64, seed=3)
    scores = ModelScores(_mixture_score, _class_logits, alpha=alpha)  # what the sample stage builds
    return x0, heun_sampler(scores.posterior_fn(y), x0, SIGMAS, n_steps=n_steps, disable=True)


@pytest.mark.parametrize("y", [0, 1])
def test_guided_samples_follow_the_class_gaussian_ode_map(y):
    """alpha = 1: prior score + grad log p(y|x, sigma) is the class Gaussian's score, so the guided run is the
    class Gaussian's run (1e-9: the autograd likelihood against the closed form) and within the discretisation
    error of the exact map (N = 32: measured max error 1.0e-2 for |x0| up to 50, tolerance 2e-2)."""
    x0, got = _guided(y, 1.0, 32)
    mu = CLASS_MEANS[y]
    direct = heun_sampler(gaussian_score(mu, S_CLASS), x0, SIGMAS, n_steps=32, disable=True)
    torch.testing.assert_close(got, direct, rtol=1e-9, atol=1e-9)
    err = float((got - _class_reference(x0, mu)).abs().max())
    assert err < 2e-2, err


def _class_reference(x0: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    x = exact_flow(x0, mu, S_CLASS, SIGMA_MIN)
    return mu + (x - mu) * S_CLASS**2 / (S_CLASS**2 + SIGMA_MIN**2)


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_the_guidance_check_fails_without_guidance_or_with_another_scale(alpha):
    """The check above rejects the unguided mixture flow (alpha = 0: samples of both classes) and the scaled
    posterior (alpha = 2: the class score plus the likelihood score once more)."""
    x0, got = _guided(0, alpha, 32)
    assert float((got - _class_reference(x0, M)).abs().max()) > 0.1


# --------------------------------------------------------------------------------------------
# the stochastic variant (EDM Algorithm 2)
# --------------------------------------------------------------------------------------------

CHURN = {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 5.0}  # gamma = 10/N on the levels in [0.05, 5] (9 of 16, 37 of 64)


def _run(seed: int | None, n: int = 64, n_steps: int = 16, **kw) -> torch.Tensor:
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return heun_sampler(gaussian_score(MU, S), _x0(n), SIGMAS, n_steps=n_steps, generator=g, disable=True, **kw)


def test_no_churn_is_the_deterministic_sampler_and_draws_nothing():
    g = torch.Generator().manual_seed(7)
    before = g.get_state().clone()
    det = _run(None)
    out = heun_sampler(gaussian_score(MU, S), _x0(64), SIGMAS, n_steps=16, generator=g, s_noise=1.0, disable=True)
    assert torch.equal(out, det) and torch.equal(g.get_state(), before)
    # churn outside [S_tmin, S_tmax] on every level is no churn either
    assert torch.equal(_run(1, s_churn=10.0, s_tmin=30.0), det)
    assert not torch.equal(_run(1, **CHURN), det)


def test_churn_uses_the_generator_only():
    torch.manual_seed(0)
    before = torch.get_rng_state().clone()
    a, b, c = _run(5, **CHURN), _run(5, **CHURN), _run(6, **CHURN)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _churn_law(n_steps: int, s_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance per coordinate of Algorithm 2's output on the Gaussian score, x0 ~ N(0, sigma_max^2):
    each step adds N(0, (sigma_hat^2 - sigma^2) S_noise^2) and is then affine, x_{i+1} - mu = k_i (x_hat - mu), with
    k = 1 + h a (Euler, a = sigma_hat/(s^2 + sigma_hat^2)) or 1 + h/2 (a + b (1 + h a)) (Heun, b at sigma_{i+1})."""
    t = karras_sigmas(SIGMA_MIN, SIGMA_MAX, n_steps).tolist() + [0.0]
    gamma = min(CHURN["s_churn"] / n_steps, math.sqrt(2.0) - 1.0)
    mean, var = torch.zeros(2, dtype=F64), torch.full((2,), SIGMA_MAX**2, dtype=F64)
    for i in range(n_steps):
        th = t[i] * (1.0 + gamma) if CHURN["s_tmin"] <= t[i] <= CHURN["s_tmax"] else t[i]
        var = var + (th**2 - t[i] ** 2) * s_noise**2
        h, a, b = t[i + 1] - th, th / (S**2 + th**2), t[i + 1] / (S**2 + t[i + 1] ** 2)
        k = 1.0 + h * a if t[i + 1] == 0 else 1.0 + 0.5 * h * (a + b * (1.0 + h * a))
        mean, var = MU + k * (mean - MU), k * k * var
    return mean, var


def _moments_ok(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, z: float = 4.0) -> bool:
    n = x.shape[0]
    mean_ok = ((x.mean(0) - mean).abs() < z * (var / n).sqrt()).all()
    var_ok = ((x.var(0) - var).abs() < z * var * math.sqrt(2.0 / (n - 1))).all()
    return bool(mean_ok and var_ok)


def test_churned_samples_follow_their_gaussian_law_and_the_law_is_the_data():
    """20,000 samples against the exact law of Algorithm 2 (4 standard errors); with N = 64 that law is N(mu, s^2)
    up to the discretisation (var/s^2 = 1.012, mean within 1.1e-3 of mu: asserted within 2% and 0.01; at N = 16 the
    variance is 1.18 s^2); dropping the churn noise (S_noise = 0: var/s^2 = 0.002) is rejected."""
    n, n_steps = 20_000, 64
    g = torch.Generator().manual_seed(11)
    x0 = SIGMA_MAX * torch.randn(n, 2, generator=g, dtype=F64)
    run = lambda s_noise: heun_sampler(gaussian_score(MU, S), x0, SIGMAS, n_steps=n_steps, generator=g,  # noqa: E731
                                       s_noise=s_noise, disable=True, **CHURN)
    mean, var = _churn_law(n_steps, 1.0)
    assert bool(((var / S**2 - 1.0).abs() < 0.02).all()) and bool(((mean - MU).abs() < 0.01).all())
    assert _moments_ok(run(1.0), mean, var)
    assert not _moments_ok(run(0.0), mean, var)


# --------------------------------------------------------------------------------------------
# bad input: one line each, at call time and when the gin config is parsed
# --------------------------------------------------------------------------------------------

BAD_CALLS = [
    ({"n_steps": 1}, "heun_sampler.n_steps must be an integer >= 2, got 1"),
    ({"n_steps": 2.5}, "heun_sampler.n_steps must be an integer >= 2, got 2.5"),
    ({"rho": 0.0}, "heun_sampler.rho must be a finite number > 0, got 0.0"),
    ({"rho": -7.0}, "heun_sampler.rho must be a finite number > 0, got -7.0"),
    ({"s_churn": -1.0}, "heun_sampler.s_churn must be a finite number >= 0, got -1.0"),
    ({"s_noise": -0.5}, "heun_sampler.s_noise must be a finite number >= 0, got -0.5"),
    ({"sigmas": torch.tensor([0.01, 20.0])},
     "heun_sampler needs sigmas[0] > sigmas[-1] > 0 (sigma_max > sigma_min), got sigma_max=0.01, "
     "sigma_min=20"),
    ({"sigmas": torch.tensor([5.0])},
     "heun_sampler needs sigmas[0] > sigmas[-1] > 0 (sigma_max > sigma_min), got sigma_max=5, sigma_min=5"),
    ({"sigmas": torch.tensor([5.0, 0.0])},
     "heun_sampler needs sigmas[0] > sigmas[-1] > 0 (sigma_max > sigma_min), got sigma_max=5, sigma_min=0"),
]


@pytest.mark.parametrize("kw,message", BAD_CALLS, ids=[m[:40] for _, m in BAD_CALLS])
def test_bad_arguments_are_one_line_config_errors(kw, message):
    kw = dict(kw)
    sigmas = kw.pop("sigmas", torch.tensor([20.0, 0.5]))
    with pytest.raises(ConfigError) as err:
        heun_sampler(gaussian_score(MU, S), _x0(2), sigmas, disable=True, **kw)
    assert str(err.value).splitlines()[0] == message  # gin adds "In call to configurable ..." on a later line


@pytest.mark.parametrize("args,message", [
    ((0.01, 20.0, 1, 7.0), "karras_sigmas: n must be an integer >= 2, got 1"),
    ((20.0, 0.01, 5, 7.0), "karras_sigmas: need sigma_max > sigma_min > 0, got sigma_max=0.01, sigma_min=20.0"),
    ((0.0, 20.0, 5, 7.0), "karras_sigmas: need sigma_max > sigma_min > 0, got sigma_max=20.0, sigma_min=0.0"),
    ((0.01, 20.0, 5, 0.0), "karras_sigmas: rho must be a finite number > 0, got 0.0"),
])
def test_bad_grid_is_a_config_error(args, message):
    with pytest.raises(ConfigError) as err:
        karras_sigmas(*args)
    assert str(err.value) == message


@pytest.mark.parametrize("binding,message", [
    ("heun_sampler.n_steps = 1", "heun_sampler.n_steps = 1: must be >= 2"),
    ("heun_sampler.rho = -1.0", "heun_sampler.rho = -1.0: must be a finite number > 0"),
    ("heun_sampler.s_churn = -2.0", "heun_sampler.s_churn = -2.0: must be a finite number >= 0"),
    ("heun_sampler.s_noise = -1.0", "heun_sampler.s_noise = -1.0: must be a finite number >= 0"),
    ("heun_sampler.n_steps = 'many'", "heun_sampler.n_steps = 'many': expected int"),
])
def test_bad_bindings_fail_when_the_config_is_parsed(binding, message):
    import gin

    from dlsm import components  # noqa: F401
    from dlsm.config import parse_config

    try:
        parse_config([], ["experiment.sampler = @heun_sampler", "heun_sampler.n_steps = 40"])  # a good one parses
        with pytest.raises(ConfigError) as err:
            parse_config([], ["experiment.sampler = @heun_sampler", binding])
        assert str(err.value).startswith(message), str(err.value)
    finally:
        gin.clear_config()


def test_the_module_is_registered_by_components():
    import gin

    from dlsm import components

    assert "heun" in vars(components) and components.heun is heun
    assert gin.config._REGISTRY.get_match("heun_sampler") is not None


# --------------------------------------------------------------------------------------------
# through the sample stage, with small real networks and a gin binding
# --------------------------------------------------------------------------------------------


def test_sample_stage_runs_the_bound_sampler_with_guidance():
    """``experiment.sampler = @heun_sampler`` with ``heun_sampler.n_steps = 3``: the sample stage's
    :func:`sample_class` draws x0 ~ N(0, sigma_max^2 I) and runs it, 2N - 1 = 5 guided evaluations per batch,
    the same numbers as a direct call on the same generator stream."""
    import gin

    from dlsm import components  # noqa: F401
    from dlsm.config import parse_config
    from dlsm.math.samplers import prior_sample
    from dlsm.math.schedules import NoiseSchedule, geometric_sigmas
    from dlsm.nets.mlp import ClassifierMLP, ScoreMLP
    from dlsm.stages.sample import sample_class
    from dlsm.train.device import make_generator

    torch.manual_seed(0)
    scores = ModelScores(ScoreMLP(2, hidden=16, depth=2, emb_dim=8), ClassifierMLP(2, 2, hidden=16, depth=2, emb_dim=8),
                         alpha=1.5)
    schedule = NoiseSchedule(geometric_sigmas(10.0, 0.05, 10), eps=1e-5, n_steps_each=1)
    calls = []

    def guided(x, sigma):
        calls.append(x.shape[0])
        return scores.posterior_fn(1)(x, sigma)

    try:
        parse_config([], ["experiment.sampler = @heun_sampler", "heun_sampler.n_steps = 3",
                          "heun_sampler.disable = True"])
        run = lambda seed, bs: sample_class(heun_sampler, guided, schedule, (2,), 10, seed=seed,  # noqa: E731
                                            device=torch.device("cpu"), batch_size=bs)
        a = run(4, 4)
        assert a.shape == (10, 2) and bool(a.isfinite().all()) and calls == [4] * 5 + [4] * 5 + [2] * 5
        assert torch.equal(run(4, 4), a) and not torch.equal(run(5, 4), a)
        whole = run(4, None)
    finally:
        gin.clear_config()
    gen = make_generator(4, "cpu")
    x0 = prior_sample((10, 2), schedule.sigma_max, generator=gen)
    direct = heun_sampler(scores.posterior_fn(1), x0, schedule.sigmas, n_steps=3, generator=gen, disable=True)
    assert torch.equal(whole, direct)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("churn", [{}, CHURN])
def test_on_the_gpu_it_stays_there_reproduces_and_does_not_sync_per_step(churn):
    """Synchronisations do not grow with N (8 vs 32 levels): the levels are copied to the device once."""
    import warnings

    dev = torch.device("cuda")
    score = gaussian_score(MU.float().to(dev), S)

    def run(seed: int, n_steps: int) -> torch.Tensor:
        g = torch.Generator(dev).manual_seed(seed)
        x0 = SIGMA_MAX * torch.randn(64, 2, generator=g, device=dev)
        return heun_sampler(score, x0, SIGMAS.float(), n_steps=n_steps, generator=g, disable=True, **churn)

    def syncs(n_steps: int) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(0, n_steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in caught)

    a = run(3, 16)
    assert a.device.type == "cuda" and a.dtype == torch.float32 and bool(a.isfinite().all())
    assert torch.equal(a, run(3, 16)) and (not churn or not torch.equal(a, run(4, 16)))
    assert syncs(8) == syncs(32) <= 3


def test_churned_levels_are_edm_algorithm_2s_known_values():
    """sigma_hat_i = (1 + gamma) sigma_i with gamma = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], written
    out for N = 4 levels (plus sigma_N = 0): S_churn = 0.8 gives gamma = 0.2 (below the cap), S_churn = 40 the cap."""
    from dlsm.math.heun import _churned

    levels = [8.0, 4.0, 2.0, 1.0, 0.0]
    assert _churned(levels, 0.8, 0.0, math.inf) == pytest.approx([9.6, 4.8, 2.4, 1.2], rel=1e-15)
    assert _churned(levels, 0.8, 1.5, 5.0) == pytest.approx([8.0, 4.8, 2.4, 1.0], rel=1e-15)  # only 4 and 2 raised
    assert _churned(levels, 40.0, 0.0, math.inf) == pytest.approx([t * math.sqrt(2.0) for t in levels[:-1]], rel=1e-15)
    assert _churned(levels, 0.0, 0.0, math.inf) == levels[:-1]  # no churn: the levels themselves


def test_the_boundaries_of_the_settings():
    """The smallest valid settings pass (n_steps = 2, rho below 1, a level exactly at S_tmin or S_tmax is churned)
    and the first invalid ones fail: sigma_max = sigma_min, n = 1.5 or 2.5 (not an int), True (a bool)."""
    from dlsm.math.heun import _churned

    torch.testing.assert_close(karras_sigmas(1.0, 4.0, 2, 0.5), torch.tensor([4.0, 1.0], dtype=torch.float64))
    out = heun_sampler(gaussian_score(MU, S), _x0(2), torch.tensor([20.0, 0.5]), n_steps=2, rho=0.5, disable=True)
    assert torch.isfinite(out).all()
    assert _churned([8.0, 4.0, 2.0, 1.0, 0.0], 0.8, 2.0, 4.0) == pytest.approx([8.0, 4.8, 2.4, 1.0], rel=1e-15)
    for args in ((2.0, 2.0, 5, 7.0), (0.01, 20.0, 1.5, 7.0), (0.01, 20.0, 2.5, 7.0), (0.01, 20.0, True, 7.0)):
        with pytest.raises(ConfigError):
            karras_sigmas(*args)
