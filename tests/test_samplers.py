"""Samplers (dlsm.math.samplers) driven by the exact score of a Gaussian, checked against the law they must produce.

With score(x, sigma) = -(x - mu)/(s^2 + sigma^2) every sampler update is affine in x plus independent
Gaussian noise, so the output is exactly Gaussian and its mean and variance follow a scalar float64
recursion per coordinate (:func:`_langevin_law`, :func:`_pc_law`). That recursion is the independent
reference; the tolerances are 4 standard errors of the sample mean (sqrt(v/n)) and of the sample variance
(v sqrt(2/(n-1)), exact for Gaussian samples).

Note on the reference: annealed Langevin with T = 5 steps per level cannot fully re-equilibrate at the
levels where sigma_i < s, so its output is over-dispersed: with Technique 4's eps and 40 scales from 20
to 0.01 the variance is ~1.27 s^2 (independently of s), and the predictor-corrector sampler's is ~1.04 s^2.
The means are within 0.25 standard errors of mu for |mu| <= 2. The tests therefore compare the variance with
the exact law and separately bound how far that law is from s^2.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlsm.math.samplers import annealed_langevin, predictor_corrector, prior_sample
from dlsm.math.schedules import geometric_sigmas, technique4_step_size
from dlsm.train.device import make_generator, resolve_device

Z = 4.0
N = 10_000
SIGMA_MAX, SIGMA_MIN, L, T = 20.0, 0.01, 40, 5
SIGMAS = geometric_sigmas(SIGMA_MAX, SIGMA_MIN, L)
EPS = technique4_step_size((SIGMA_MAX / SIGMA_MIN) ** (1.0 / (L - 1)), SIGMA_MIN, T)
SNR = 0.16


def gaussian_score(mu: torch.Tensor, s: float):
    def score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],)
        return -(x - mu) / (s**2 + sigma[:, None] ** 2)

    return score


def _sigmas() -> list[float]:
    return [float(v) for v in SIGMAS]  # the float32 values the samplers actually use


def _langevin_law(mu: float, s: float, eps: float) -> tuple[float, float]:
    """Mean and variance of one output coordinate of annealed_langevin started from N(0, sigma_max^2)."""
    sig = _sigmas()
    m, v, sl = 0.0, sig[0] ** 2, sig[-1]
    for si in sig:
        a = eps * si**2 / sl**2
        k = 1.0 - a / (s**2 + si**2)
        for _ in range(T):
            m, v = mu + k * (m - mu), k * k * v + 2.0 * a
    f = 1.0 - sl**2 / (s**2 + sl**2)  # Tweedie: x + sigma_L^2 score
    return mu + f * (m - mu), f * f * v


def _pc_law(mu: float, s: float, snr: float) -> tuple[float, float]:
    """Mean and variance of predictor_corrector's output, treating its batch-averaged corrector step
    2 (snr mean||z|| / mean||score||)^2 by its large-batch limit 2 snr^2 V^2 / v (both norms are chi-distributed
    with the same dof, scaled by 1 and sqrt(v)/V), which is exact up to O(1/n)."""
    sig = _sigmas()
    m, v = 0.0, sig[0] ** 2
    for i, si in enumerate(sig):
        big_v = s**2 + si**2
        step = 2.0 * (snr * big_v) ** 2 / v
        k = 1.0 - step / big_v
        m, v = mu + k * (m - mu), k * k * v + 2.0 * step
        last = i + 1 == len(sig)
        d = si**2 - (0.0 if last else sig[i + 1] ** 2)
        k = 1.0 - d / big_v
        m, v = mu + k * (m - mu), k * k * v + (0.0 if last else d)
    return m, v


def _moments_ok(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> bool:
    """Every coordinate's sample mean and variance within Z standard errors of (mean, var)."""
    n = x.shape[0]
    xd = x.double()
    mean_ok = ((xd.mean(0) - mean).abs() < Z * (var / n).sqrt()).all()
    var_ok = ((xd.var(0) - var).abs() < Z * var * math.sqrt(2.0 / (n - 1))).all()
    return bool(mean_ok and var_ok)


def _run(sampler: str, score, *, seed: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = prior_sample((n, 2), SIGMA_MAX, generator=g)
    if sampler == "langevin":
        return annealed_langevin(score, x0, SIGMAS, eps=EPS, n_steps_each=T, generator=g, disable=True)
    return predictor_corrector(score, x0, SIGMAS, snr=SNR, generator=g, disable=True)


def _law(sampler: str, mu: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    laws = [_langevin_law(float(m), s, EPS) if sampler == "langevin" else _pc_law(float(m), s, SNR) for m in mu]
    mean = torch.tensor([a for a, _ in laws], dtype=torch.float64)
    return mean, torch.tensor([b for _, b in laws], dtype=torch.float64)


CASES = st.tuples(st.floats(-2.0, 2.0), st.floats(-2.0, 2.0), st.floats(0.3, 3.0), st.integers(0, 2**31 - 1))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(case=CASES, sampler=st.sampled_from(["langevin", "pc"]))
def test_sampler_matches_gaussian_law_and_wrong_scores_fail(case, sampler):
    m0, m1, s, seed = case
    mu = torch.tensor([m0, m1])
    mean, var = _law(sampler, mu, s)
    # the law itself is close to the target N(mu, s^2): its mean is within 0.25 standard errors of mu
    # (the predictor's Euler steps leave ~0.15% of the initial offset -mu), its variance inflated by a bounded factor
    assert bool(((mean - mu.double()).abs() < 0.25 * (var / N).sqrt()).all())
    lo, hi = (1.15, 1.40) if sampler == "langevin" else (1.0, 1.08)
    assert lo * s**2 < float(var.min()) and float(var.max()) < hi * s**2

    x = _run(sampler, gaussian_score(mu, s), seed=seed)
    assert x.shape == (N, 2) and x.dtype == torch.float32
    assert _moments_ok(x, mean, var)

    # the same check rejects a score whose mean is off by 0.3 s, and one whose spread is off by 30%
    shifted = _run(sampler, gaussian_score(mu + 0.3 * s, s), seed=seed)
    assert not _moments_ok(shifted, mean, var)
    wide = _run(sampler, gaussian_score(mu, 1.3 * s), seed=seed)
    assert not _moments_ok(wide, mean, var)


def test_langevin_denoise_is_tweedie_step():
    mu, s = torch.tensor([1.0, -2.0]), 0.05  # s comparable to sigma_L, so Tweedie's shrinkage is visible
    score = gaussian_score(mu, s)
    runs = {}
    for denoise in (False, True):
        g = torch.Generator().manual_seed(3)
        x0 = prior_sample((N, 2), SIGMA_MAX, generator=g)
        runs[denoise] = annealed_langevin(score, x0, SIGMAS, eps=EPS, denoise=denoise, generator=g, disable=True)
    raw, den = runs[False], runs[True]
    # the same random path, then x + sigma_L^2 score(x, sigma_L) = mu + f (x - mu), f = s^2/(s^2 + sigma_L^2)
    sl = float(SIGMAS[-1])
    f = s**2 / (s**2 + sl**2)
    torch.testing.assert_close(den, mu + f * (raw - mu), rtol=1e-5, atol=1e-6)
    mean, var = _law("langevin", mu, s)
    assert _moments_ok(den, mean, var)
    assert _moments_ok(raw, mu.double() + (mean - mu.double()) / f, var / f**2)
    assert not _moments_ok(raw, mean, var)  # f = 0.96 here: the shrinkage is detectable


@pytest.mark.parametrize("sampler", ["langevin", "pc"])
@pytest.mark.parametrize("s", [0.05, 0.3, 1.0])
def test_sampler_variance_precisely(sampler, s):
    """200,000 samples: the variance standard error is 0.3%, so a few-percent error in any noise term shows
    (s = 0.05 makes the final Tweedie step, a factor (s^2/(s^2 + sigma_L^2))^2 = 0.92 on the variance, visible)."""
    mu = torch.tensor([0.5, -1.0])
    mean, var = _law(sampler, mu, s)
    x = _run(sampler, gaussian_score(mu, s), seed=17, n=200_000)
    assert _moments_ok(x, mean, var)


def test_prior_sample_is_ve_prior():
    n = 20_000
    x = prior_sample((n, 3), 7.0, generator=torch.Generator().manual_seed(0))
    assert _moments_ok(x, torch.zeros(3, dtype=torch.float64), torch.full((3,), 49.0, dtype=torch.float64))


def test_samplers_are_reproducible_and_leave_global_rng_alone():
    mu, s = torch.tensor([0.5, 0.5]), 1.0
    torch.manual_seed(1234)
    for sampler in ("langevin", "pc"):
        before = torch.get_rng_state().clone()
        a = _run(sampler, gaussian_score(mu, s), seed=42, n=300)
        after = torch.get_rng_state()
        assert torch.equal(before, after), sampler
        b = _run(sampler, gaussian_score(mu, s), seed=42, n=300)
        c = _run(sampler, gaussian_score(mu, s), seed=43, n=300)
        assert torch.equal(a, b), sampler
        assert not torch.equal(a, c), sampler


def test_callback_sees_every_level_in_order():
    seen: list[tuple[int, float]] = []
    x0 = prior_sample((8, 2), SIGMA_MAX, generator=torch.Generator().manual_seed(0))
    for fn, kw in ((annealed_langevin, {"eps": EPS}), (predictor_corrector, {})):
        seen.clear()
        fn(
            gaussian_score(torch.zeros(2), 1.0),
            x0,
            SIGMAS,
            generator=torch.Generator().manual_seed(0),
            callback=lambda info: seen.append((info["i"], info["sigma"])),
            disable=True,
            **kw,
        )
        assert [i for i, _ in seen] == list(range(L))
        assert [sg for _, sg in seen] == _sigmas()


@pytest.mark.parametrize("sampler", ["langevin", "pc"])
def test_callback_x_is_the_state_after_each_level(sampler):
    """The callback's ``x`` after the last level is the returned sample when nothing follows that level (Langevin
    without its denoise step; PC's last predictor is part of the level), and x moves from level to level."""
    xs: list[torch.Tensor] = []
    x0 = prior_sample((8, 2), SIGMA_MAX, generator=torch.Generator().manual_seed(0))
    fn, kw = (annealed_langevin, {"eps": EPS, "denoise": False}) if sampler == "langevin" else (predictor_corrector, {})
    out = fn(gaussian_score(torch.zeros(2), 1.0), x0, SIGMAS, generator=torch.Generator().manual_seed(0),
             callback=lambda info: xs.append(info["x"].clone()), disable=True, **kw)
    assert len(xs) == L and torch.equal(xs[-1], out) and not torch.equal(xs[0], xs[1])


def test_pc_default_snr_is_song_et_al_s_0_16():
    x0 = prior_sample((8, 2), SIGMA_MAX, generator=torch.Generator().manual_seed(0))
    run = lambda **kw: predictor_corrector(gaussian_score(torch.zeros(2), 1.0), x0, SIGMAS,  # noqa: E731
                                           generator=torch.Generator().manual_seed(0), disable=True, **kw)
    assert torch.equal(run(), run(snr=0.16)) and not torch.equal(run(), run(snr=0.2))


def test_burn_in_adds_steps_at_sigma_max_only():
    """burn_in = B at T steps per level equals a first level of T + B steps, the rest unchanged:
    annealed Langevin on the exact Gaussian score, compared step for step with a hand-written loop."""
    mu, s, B, T = torch.tensor([0.3, -0.2]), 1.5, 7, 2
    score = gaussian_score(mu, s)
    x0 = prior_sample((64, 2), SIGMA_MAX, generator=torch.Generator().manual_seed(3))
    got = annealed_langevin(score, x0, SIGMAS, eps=EPS, n_steps_each=T, burn_in=B, denoise=False,
                            generator=torch.Generator().manual_seed(5), disable=True)
    g = torch.Generator().manual_seed(5)
    x = x0.clone()
    for i, sigma in enumerate(SIGMAS):
        step = EPS * float(sigma) ** 2 / float(SIGMAS[-1]) ** 2
        for _ in range(T + (B if i == 0 else 0)):
            z = torch.randn(x.shape, generator=g)
            x = x + step * score(x, sigma.expand(x.shape[0])) + (2 * step) ** 0.5 * z
    assert torch.allclose(got, x, atol=1e-5, rtol=1e-5)
    # burn-in changes the result of the predictor-corrector sampler too, and only through level 0
    a = predictor_corrector(score, x0, SIGMAS[:1], generator=torch.Generator().manual_seed(5), disable=True,
                            n_corrector_steps=1 + B)
    b = predictor_corrector(score, x0, SIGMAS[:1], generator=torch.Generator().manual_seed(5), disable=True,
                            n_corrector_steps=1, burn_in=B)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# the last step, by definition (docstrings of predictor_corrector and annealed_langevin)
# --------------------------------------------------------------------------------------------


def _linear_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deterministic affine score -(x - m)/(c + sigma^2) with per-coordinate m and c."""
    m = torch.tensor([1.5, -0.5, 0.25], dtype=x.dtype)
    c = torch.tensor([0.3, 1.0, 2.0], dtype=x.dtype)
    return -(x - m) / (c + sigma[:, None] ** 2)


def _pc_by_hand(x: torch.Tensor, sigmas: list[float], snr: float, n_corr: int, denoise: bool,
                g: torch.Generator) -> torch.Tensor:
    """Song et al. (2021) Algorithms 2-3 as the docstring states them, drawing noise in the same order:
    per level, the corrector's z for each corrector step, then the predictor's z (none after the last with
    denoise)."""
    for i, si in enumerate(sigmas):
        sig = torch.full((x.shape[0],), si, dtype=x.dtype)
        for _ in range(n_corr):
            s = _linear_score(x, sig)
            z = torch.randn(x.shape, generator=g).to(x)
            step = 2.0 * (snr * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2
            x = x + step * s + (2.0 * step).sqrt() * z
        nxt = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
        d = si**2 - nxt**2
        x = x + d * _linear_score(x, sig)
        if i + 1 < len(sigmas) or not denoise:
            x = x + math.sqrt(d) * torch.randn(x.shape, generator=g).to(x)
    return x


@pytest.mark.parametrize("levels", [[0.8], [3.0, 0.4]])
@pytest.mark.parametrize("n_corr", [0, 2])
def test_pc_last_step_with_and_without_denoise_follows_its_definition(levels, n_corr):
    sigmas = torch.tensor(levels)
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    sl2 = float(sigmas[-1]) ** 2
    out = {}
    for denoise in (True, False):
        got = predictor_corrector(_linear_score, x0.clone(), sigmas, snr=0.2, n_corrector_steps=n_corr,
                                  denoise=denoise, generator=torch.Generator().manual_seed(5), disable=True)
        ref = _pc_by_hand(x0.clone(), [float(v) for v in sigmas], 0.2, n_corr, denoise,
                          torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        out[denoise] = got
    # the two differ by exactly the last predictor's noise sqrt(sigma_L^2 - 0) z, z the next draw of the stream
    g = torch.Generator().manual_seed(5)
    n_draws = len(levels) * n_corr + (len(levels) - 1)
    for _ in range(n_draws):
        torch.randn(x0.shape, generator=g)
    z_last = torch.randn(x0.shape, generator=g).double()
    torch.testing.assert_close(out[False] - out[True], math.sqrt(sl2) * z_last, rtol=1e-10, atol=1e-12)


def test_pc_without_correctors_on_one_level_is_tweedie():
    """One level, no corrector: x + sigma^2 s(x, sigma) with denoise; plus sigma z without."""
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig = torch.full((5,), 0.7, dtype=torch.float64)
    sigma2 = float(torch.tensor(0.7)) ** 2  # the float32 level the sampler sees
    tweedie = x0 + sigma2 * _linear_score(x0, sig.float().double())
    got = predictor_corrector(_linear_score, x0, torch.tensor([0.7]), n_corrector_steps=0, denoise=True,
                              generator=torch.Generator().manual_seed(0), disable=True)
    torch.testing.assert_close(got, tweedie, rtol=1e-12, atol=1e-12)
    noisy = predictor_corrector(_linear_score, x0, torch.tensor([0.7]), n_corrector_steps=0, denoise=False,
                                generator=torch.Generator().manual_seed(0), disable=True)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(noisy, tweedie + math.sqrt(sigma2) * z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("denoise", [True, False])
def test_langevin_two_levels_follow_algorithm_1(denoise):
    """NCSNv2 Algorithm 1 by hand on two levels, with and without the final Tweedie step
    x + sigma_L^2 s(x, sigma_L) (sigma_L the *smallest* level)."""
    sigmas, eps, t = torch.tensor([2.0, 0.5]), 0.01, 3
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = annealed_langevin(_linear_score, x0, sigmas, eps=eps, n_steps_each=t, denoise=denoise,
                            generator=torch.Generator().manual_seed(9), disable=True)
    g, x = torch.Generator().manual_seed(9), x0.clone()
    lv = [float(v) for v in sigmas]
    for si in lv:
        a = eps * si**2 / lv[-1] ** 2
        for _ in range(t):
            z = torch.randn(x.shape, generator=g).double()
            x = x + a * _linear_score(x, torch.full((6,), si, dtype=torch.float64)) + math.sqrt(2 * a) * z
    if denoise:
        x = x + lv[-1] ** 2 * _linear_score(x, torch.full((6,), lv[-1], dtype=torch.float64))
    # the library forms alpha_i in float32 (langevin_step_sizes of float32 sigmas): ~1e-7 relative
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------
# devices and generators: known CPU numbers, reproducibility, and on a GPU no per-step synchronisation
# --------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _known_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return -(x - torch.tensor([0.5, -1.0], dtype=x.dtype, device=x.device)) / (1.0 + sigma[:, None] ** 2)


def _known_run(sampler: str, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(123) if generator is None else generator
    x0 = prior_sample((3, 2), 20.0, generator=g).to(dtype)
    sigmas = geometric_sigmas(20.0, 0.05, 6)
    if sampler == "langevin":
        return annealed_langevin(_known_score, x0, sigmas, eps=1e-4, n_steps_each=2, burn_in=1, generator=g,
                                 disable=True)
    return predictor_corrector(_known_score, x0, sigmas, snr=0.16, n_corrector_steps=2, burn_in=1, generator=g,
                               disable=True)


# _known_run's outputs, written down by running it on the samplers as they were before the device change
# (noise drawn with torch.randn(x.shape, generator=g).to(x) on the CPU); float64 runs draw float32 noise too.
_KNOWN = {
    ("langevin", torch.float32): [[-8.29291820526123, -2.4509944915771484], [-1.2356810569763184, 7.122219562530518],
                                  [-17.72474479675293, -6.3478169441223145]],
    ("langevin", torch.float64): [[-8.29291820833012, -2.450995197880002], [-1.2356808087055153, 7.1222187828124355],
                                  [-17.724744321942932, -6.3478176261108175]],
    ("pc", torch.float32): [[-0.19094938039779663, -7.733558177947998], [2.9709224700927734, -0.5943926572799683],
                            [0.8199065923690796, 1.5298856496810913]],
    ("pc", torch.float64): [[-0.19094964455844576, -7.733557568555649], [2.970921721419282, -0.5943928452468775],
                            [0.8199065491644509, 1.5298854388375716]],
}
_KNOWN_X0 = [[-2.229342222213745, 2.407258987426758], [-7.392690181732178, -4.808359622955322],
             [-23.938486099243164, 4.185387134552002]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampler", ["langevin", "pc"])
def test_cpu_results_are_those_of_before_the_device_change(sampler, dtype):
    """Bit for bit: the prior draw, then every Langevin / corrector / predictor noise from the same CPU stream."""
    x0 = prior_sample((3, 2), 20.0, generator=torch.Generator().manual_seed(123))
    assert x0.dtype == torch.float32 and torch.equal(x0, torch.tensor(_KNOWN_X0))
    out = _known_run(sampler, dtype)
    assert out.dtype == dtype and out.device.type == "cpu"
    assert torch.equal(out, torch.tensor(_KNOWN[sampler, dtype], dtype=dtype))


@pytest.mark.parametrize("sampler", ["langevin", "pc"])
def test_same_generator_seed_gives_identical_samples(sampler):
    a = _known_run(sampler, torch.float32, make_generator(9, "cpu"))
    b = _known_run(sampler, torch.float32, make_generator(9, "cpu"))
    c = _known_run(sampler, torch.float32, make_generator(10, "cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, _known_run(sampler, torch.float32, torch.Generator().manual_seed(9)))


def test_prior_sample_device_follows_the_generator():
    g = make_generator(0, "cpu")
    assert prior_sample((4, 2), 3.0, generator=g).device.type == "cpu"
    assert prior_sample((4, 2), 3.0).device.type == "cpu"
    a = prior_sample((4, 2), 3.0, generator=make_generator(0, "cpu"), device="cpu")
    assert torch.equal(a, 3.0 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0)))


def _count_syncs(fn) -> int:
    """Number of CUDA synchronisations (host<->device copies, .item(), stream syncs) that ``fn()`` makes."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@cuda
@pytest.mark.parametrize("sampler", ["langevin", "pc"])
def test_samplers_on_the_gpu_stay_there_reproduce_and_do_not_sync_per_step(sampler):
    dev = torch.device("cuda")
    mu, s = torch.tensor([0.5, -1.0]), 1.0
    score = gaussian_score(mu.to(dev), s)

    def run(seed: int, sigmas: torch.Tensor = SIGMAS, n: int = N) -> torch.Tensor:
        g = make_generator(seed, dev)
        x0 = prior_sample((n, 2), SIGMA_MAX, generator=g)
        assert x0.device == resolve_device("cuda")
        if sampler == "langevin":
            return annealed_langevin(score, x0, sigmas, eps=EPS, n_steps_each=T, generator=g, disable=True)
        return predictor_corrector(score, x0, sigmas, snr=SNR, generator=g, disable=True)

    a, b, c = run(3), run(3), run(4)
    assert a.device.type == "cuda" and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    mean, var = _law(sampler, mu, s)  # the GPU stream samples the same law
    assert _moments_ok(a.cpu(), mean, var)
    # synchronisations do not grow with the number of steps: 40 levels vs 10 (sigmas given on the host)
    long, short = _count_syncs(lambda: run(5, SIGMAS, 64)), _count_syncs(lambda: run(5, SIGMAS[::4], 64))
    assert long == short <= 2, (long, short)
    on_device = SIGMAS.to(dev)
    assert _count_syncs(lambda: run(5, on_device, 64)) <= 2


@cuda
def test_prior_sample_on_the_gpu():
    g = make_generator(0, "cuda")
    x = prior_sample((1000, 3), 7.0, generator=g)
    assert x.device.type == "cuda"
    assert torch.equal(x, prior_sample((1000, 3), 7.0, generator=make_generator(0, "cuda")))
    assert prior_sample((2, 3), 7.0, generator=make_generator(0, "cuda"), device="cuda").device.type == "cuda"


@pytest.mark.parametrize(("sampler", "desc", "kw"), [(annealed_langevin, "langevin", {"eps": EPS}),
                                                     (predictor_corrector, "pc", {})])
def test_progress_bar_is_labelled_cleared_at_the_end_and_silent_when_disabled(sampler, desc, kw, capsys):
    """The sampler's bar (under a stage's own bar): named after the sampler, cleared when it ends (``leave=False``:
    the last thing written is a carriage return, not a finished bar and a newline), and silent with
    ``disable=True`` (sweep trials, ranks other than 0). ``disable=False`` shows it even where stderr is no
    terminal, as here; tqdm's ``disable=None`` would hide it."""
    x0, g = torch.zeros(4, 2), torch.Generator().manual_seed(0)
    sampler(gaussian_score(torch.zeros(2), 1.0), x0, SIGMAS, generator=g, disable=False, **kw)
    err = capsys.readouterr().err
    assert err.startswith(f"\r{desc}: ") and err.endswith("\r") and not err.endswith("\n"), repr(err[-200:])
    sampler(gaussian_score(torch.zeros(2), 1.0), x0, SIGMAS, generator=g, disable=True, **kw)
    assert capsys.readouterr().err == ""
