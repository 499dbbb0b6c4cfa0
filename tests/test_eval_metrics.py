"""Image metrics (dlsm.eval): P/R/D/C against the reference ``prdc`` package and hand-computed answers;
FID / KID / IS against closed forms and float64 references; the Inception route offline."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import math
import threading
import time

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlsm.errors import ConfigError, DataError
from dlsm.eval import fid
from dlsm.eval.fid import (
    INCEPTION_WEIGHTS_URL,
    fid_from_features,
    inception_features,
    inception_score_from_logits,
    inception_score_from_probs,
    inception_weights_path,
    kid_from_features,
    load_inception,
)
from dlsm.eval.prdc import classwise, prdc

prdc_ref = pytest.importorskip("prdc")  # NAVER's reference implementation (dev extra), used by the official code


def reference_prdc(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes
        out = prdc_ref.compute_prdc(real.numpy(), fake.numpy(), nearest_k=k)
    return {key: float(v) for key, v in out.items()}


def assert_same_prdc(ours: dict[str, float], ref: dict[str, float], n_fake: int, k: int) -> None:
    """Precision, recall and coverage are fractions of counts: equal exactly; density up to summation order."""
    assert set(ours) == {"precision", "recall", "density", "coverage"}
    for key in ("precision", "recall", "coverage"):
        assert ours[key] == ref[key], (key, ours, ref)
    assert ours["density"] * k * n_fake == pytest.approx(ref["density"] * k * n_fake, abs=1e-9), (ours, ref)


def one_line(err: pytest.ExceptionInfo) -> str:
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].strip() == lines[0] and lines[0], lines
    return lines[0]


# ----------------------------------------------------------------------------------------------- P/R/D/C


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    dim=st.integers(1, 6),
    k=st.integers(1, 5),
    shift=st.floats(0.0, 2.0),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 2**31 - 1),
)
def test_prdc_equals_reference_package(n, m, dim, k, shift, chunk, seed):
    """Random sets of any sizes >= k+2 (float64: tie-free, so every comparison is decided as in the package).
    The package itself needs k+2 points (``np.argpartition(d, k+1)`` on k+1 columns fails); we accept k+1."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n + k + 1, dim, generator=g, dtype=torch.float64)
    fake = shift + 1.5 * torch.randn(m + k + 1, dim, generator=g, dtype=torch.float64)
    ours = prdc(real, fake, k=k, chunk_size=chunk, dtype=torch.float64)
    assert_same_prdc(ours, reference_prdc(real, fake, k), m + k + 1, k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prdc_float32_equals_reference_on_offset_features(seed):
    """Inception-like features: far from the origin (pool_3 is post-ReLU). float32 and the default blocks
    (cdist's ||x||^2 + ||y||^2 - 2 x.y path) still decide every comparison as the package does."""
    g = torch.Generator().manual_seed(seed)
    real = 30.0 + torch.randn(300, 16, generator=g)
    fake = 30.2 + 1.2 * torch.randn(250, 16, generator=g)
    ours = prdc(real, fake, k=5)
    ref = reference_prdc(real, fake, 5)
    assert_same_prdc(ours, ref, 250, 5)
    assert 0.05 < ref["precision"] < 0.95 and 0.05 < ref["coverage"] < 0.95  # not a trivial 0 / 1 case


def test_prdc_hand_computed_with_boundary_ties():
    """1-D sets by hand, k = 1. Real radii (nearest other real point): 0->1, 1->1, 3->2, 6->3, 10->4.
    Fake radii: 0.5->4.5, 5->3, 8->3, 11->3.
    fake 0.5 lies in the balls of 0 and 1; 5 is exactly on the boundary of 3's ball (|5-3| = 2 = r, strict <:
    outside) and inside 6's; 8 is inside 6's (2 < 3) and 10's (2 < 4); 11 inside 10's only.
    precision = 4/4, density = (2 + 1 + 2 + 1) / 4 = 1.5.
    recall: real 0 (|0-0.5| < 4.5), 1, 3 (|3-0.5| < 4.5), 6 (|6-5| < 3), 10 (|10-11| < 3): 5/5.
    coverage: nearest fake within own radius: 0 (0.5 < 1), 1 (0.5 < 1), 3 (2 < 2 no), 6 (1 < 3), 10 (1 < 4): 4/5.
    """
    real = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]], dtype=torch.float64)
    fake = torch.tensor([[0.5], [5.0], [8.0], [11.0]], dtype=torch.float64)
    expected = {"precision": 1.0, "recall": 1.0, "density": 1.5, "coverage": 0.8}
    assert prdc(real, fake, k=1, dtype=torch.float64) == expected
    assert prdc(real, fake, k=1) == expected  # float32: these integers and halves are exact
    assert reference_prdc(real, fake, 1) == pytest.approx(expected, abs=1e-12)
    # k = 2: real radii 0->3, 1->2, 3->3, 6->4, 10->7; fake radii 0.5->7.5, 5->4.5, 8->3, 11->6.
    # fake 0.5: balls of 0, 1, 3 (2.5 < 3): 3; 5: 3 (2 < 3), 6 (1 < 4), 10 (5 < 7): 3; 8: 6 (2 < 4), 10 (2 < 7): 2;
    # 11: 10 (1 < 7): 1. density = 9 / (2 * 4). coverage: 3's nearest fake is 2 away < 3 now: 5/5.
    expected2 = {"precision": 1.0, "recall": 1.0, "density": 9 / 8, "coverage": 1.0}
    assert prdc(real, fake, k=2, dtype=torch.float64) == expected2
    assert reference_prdc(real, fake, 2) == pytest.approx(expected2, abs=1e-12)


def test_prdc_duplicates_collapse_the_ball():
    """A real point with k exact duplicates (k+1 copies counting itself) has radius 0: its ball is empty."""
    real = torch.tensor([[0.0], [0.0], [0.0], [5.0], [7.0], [20.0]], dtype=torch.float64)
    fake = torch.tensor([[0.0], [0.0], [6.0], [30.0]], dtype=torch.float64)
    # k = 2: radii 0, 0, 0 (three copies), 5->5 (7 at 2, 0 at 5), 7->7 (5 at 2, 0 at 7), 20->15.
    # fake 0: in no zero ball; |0-5| = 5 not < 5; |0-7| = 7 not < 7; |0-20| = 20 not < 15: outside all.
    # fake 6: in 5's (1 < 5), 7's (1 < 7), 20's (14 < 15); fake 30: in 20's (10 < 15).
    # precision 2/4, density (0 + 0 + 3 + 1) / (2 * 4) = 0.5.
    ours = prdc(real, fake, k=2, dtype=torch.float64)
    assert ours["precision"] == 0.5 and ours["density"] == 0.5
    assert_same_prdc(ours, reference_prdc(real, fake, 2), 4, 2)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(6, 60), dim=st.integers(1, 8), k=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_prdc_of_a_set_with_itself(n, dim, k, seed):
    """Identical sets: every point lies in its own ball (0 < r), so P = R = C = 1. Density is exactly 1 when
    distances are tie-free: sum_j #{i: |x_j - x_i| < r_i} = sum_i #{j: |x_i - x_j| < r_i} = sum_i k (itself and
    its k-1 nearest neighbours; the k-th lies on the boundary |x_i - x_(k)| = r_i, outside by the strict <)."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert prdc(x, x.clone(), k=k, chunk_size=7, dtype=torch.float64) == {
        "precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}


def test_prdc_far_apart_sets_are_all_zero():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(40, 3, generator=g), 100.0 + torch.randn(30, 3, generator=g)
    assert prdc(real, fake, k=3) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@settings(max_examples=15, deadline=None)
@given(chunk=st.integers(1, 120), seed=st.integers(0, 2**31 - 1))
def test_prdc_chunk_size_does_not_change_the_result(chunk, seed):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(97, 5, generator=g, dtype=torch.float64)
    fake = 0.5 + torch.randn(83, 5, generator=g, dtype=torch.float64)
    whole = prdc(real, fake, k=4, chunk_size=1000, dtype=torch.float64)
    assert prdc(real, fake, k=4, chunk_size=chunk, dtype=torch.float64) == whole


def test_prdc_needs_k_plus_one_points_and_matching_shapes():
    x = torch.randn(10, 4)
    for real, fake in ((x[:5], x), (x, x[:5])):
        with pytest.raises(ConfigError) as err:
            prdc(real, fake, k=5)
        assert "fewer samples than k+1" in one_line(err) and "k=5" in one_line(err)
    # exactly k + 1 points is enough (the reference package needs k + 2): each radius is the farthest point of its
    # set, so for identical sets each ball holds all but that farthest point: density = 5 / k = 1
    assert prdc(x[:6], x[:6], k=5, dtype=torch.float64) == dict.fromkeys(("precision", "recall", "density",
                                                                          "coverage"), 1.0)
    with pytest.raises(ConfigError) as err:
        prdc(x, torch.randn(10, 3), k=2)
    assert one_line(err) == "real and fake features differ in dimension: (10, 4) vs (10, 3)"
    with pytest.raises(ConfigError):
        prdc(x, x, k=0)


_K_MESSAGE = "prdc.k must be a positive integer (the paper: 5, official CIFAR-10 eval: 3), got {}"
_CHUNK_MESSAGE = "prdc.chunk_size must be a positive integer, e.g. 4096, got {}"


@pytest.mark.parametrize(("real", "fake", "kw", "error", "message"), [
    # a 1-D tensor is not (N, D) features, though it is a tensor
    (torch.zeros(10), None, {}, ConfigError, "real features must be a tensor of shape (N, D), got (10,)"),
    (None, torch.zeros(10), {}, ConfigError, "fake features must be a tensor of shape (N, D), got (10,)"),
    (None, [[0.0, 1.0]] * 10, {}, ConfigError, "fake features must be a tensor of shape (N, D), got list"),
    (None, None, {"k": True}, ConfigError, _K_MESSAGE.format("True")),
    (None, None, {"k": 2.0}, ConfigError, _K_MESSAGE.format("2.0")),
    (None, None, {"k": 0}, ConfigError, _K_MESSAGE.format("0")),
    (None, None, {"chunk_size": True}, ConfigError, _CHUNK_MESSAGE.format("True")),
    (None, None, {"chunk_size": 2.5}, ConfigError, _CHUNK_MESSAGE.format("2.5")),
    (None, None, {"chunk_size": 0}, ConfigError, _CHUNK_MESSAGE.format("0")),
    (None, None, {"dtype": torch.float16}, ConfigError,
     "prdc.dtype must be torch.float32 or torch.float64, got torch.float16"),
    (torch.full((10, 4), math.nan), None, {}, DataError,
     "real features contain NaN or Inf: check the samples or the feature extractor"),
    (None, torch.full((10, 4), math.inf), {}, DataError,
     "fake features contain NaN or Inf: check the samples or the feature extractor"),
])
def test_prdc_bad_input_is_one_exact_line(real, fake, kw, error, message):
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(error) as err:
        prdc(x if real is None else real, x if fake is None else fake, **kw)
    assert str(err.value) == message


def test_prdc_default_k_is_the_papers_five():
    """Without k, the metrics are those of k = 5 (the DLSM paper), which differ here from k = 4 and k = 6."""
    g = torch.Generator().manual_seed(1)
    real = torch.randn(40, 3, generator=g, dtype=torch.float64)
    fake = 0.7 + torch.randn(30, 3, generator=g, dtype=torch.float64)
    default = prdc(real, fake, dtype=torch.float64)
    assert default == prdc(real, fake, k=5, dtype=torch.float64)
    assert_same_prdc(default, reference_prdc(real, fake, 5), 30, 5)
    for other in (4, 6):
        assert default != prdc(real, fake, k=other, dtype=torch.float64)


def test_prdc_recall_ball_is_open_at_an_exact_tie():
    """k = 1, real {0, 4}, fake {0, 2}: fake radii 0 -> 2 and 2 -> 2, real radii 4 and 4. Real 4 is exactly
    2 from fake 2 (the radius: outside the open ball) and 4 from fake 0: recall 1/2. Precision: both fakes lie
    within 4 of real 0: 1. Density: fake 0 in real 0's ball only (|0-4| = 4 is on 4's boundary), fake 2 in both:
    3 / 2. Coverage: real 0's nearest fake is at 0 < 4, real 4's at 2 < 4: 1."""
    real = torch.tensor([[0.0], [4.0]], dtype=torch.float64)
    fake = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    expected = {"precision": 1.0, "recall": 0.5, "density": 1.5, "coverage": 1.0}
    assert prdc(real, fake, k=1, dtype=torch.float64) == expected
    assert prdc(real, fake, k=1) == expected


def test_prdc_computes_in_the_requested_dtype():
    """The hand case of test_prdc_hand_computed_with_boundary_ties with fake 5 moved in by 1e-12, given as float64.
    In float64 it enters the ball of real 3 (radius 2, distance 2 - 1e-12): density (2 + 2 + 2 + 1) / 4 and
    coverage 1. Asked for float32, the features are cast first, 5 - 1e-12 rounds to 5.0, and the tie is back:
    the hand answer of the exact 5 (density 1.5, coverage 0.8)."""
    real = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]], dtype=torch.float64)
    fake = torch.tensor([[0.5], [5.0 - 1e-12], [8.0], [11.0]], dtype=torch.float64)
    assert prdc(real, fake, k=1, dtype=torch.float64) == {
        "precision": 1.0, "recall": 1.0, "density": 1.75, "coverage": 1.0}
    assert prdc(real, fake, k=1, dtype=torch.float32) == {
        "precision": 1.0, "recall": 1.0, "density": 1.5, "coverage": 0.8}


def test_classwise_with_one_class_is_the_overall_metric():
    g = torch.Generator().manual_seed(4)
    real, fake = torch.randn(60, 4, generator=g), 0.3 + torch.randn(50, 4, generator=g)
    mean, per_class = classwise(prdc, real, torch.zeros(60, dtype=torch.long), fake,
                                torch.zeros(50, dtype=torch.long), 1, k=3)
    assert mean == prdc(real, fake, k=3) and per_class == {0: mean}
    mean, per_class = classwise(fid_from_features, real, torch.zeros(60, dtype=torch.long), fake,
                                torch.zeros(50, dtype=torch.long), 1)
    assert mean == fid_from_features(real, fake) and per_class == {0: mean}


def test_classwise_pairs_each_class_and_averages_unweighted():
    g = torch.Generator().manual_seed(5)
    real = torch.randn(90, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(70, 3, generator=g, dtype=torch.float64)
    yr, yf = torch.arange(90) % 3, torch.arange(70) % 3  # classes of unequal fake sizes: 24, 23, 23
    mean, per_class = classwise(prdc, real, yr, fake, yf, 3, k=2, dtype=torch.float64)
    for c in range(3):
        assert_same_prdc(per_class[c], reference_prdc(real[yr == c], fake[yf == c], 2), int((yf == c).sum()), 2)
        assert per_class[c] == prdc(real[yr == c], fake[yf == c], k=2, dtype=torch.float64)
    for key in mean:
        assert mean[key] == pytest.approx(sum(per_class[c][key] for c in range(3)) / 3, abs=1e-15)
    yf_missing = yf.clone()
    yf_missing[yf == 2] = 0  # class 2 has no fake samples
    with pytest.raises(ConfigError) as err:
        classwise(prdc, real, yr, fake, yf_missing, 3, k=2)
    assert one_line(err).startswith("class 2: P/R/D/C with k=2 got fewer samples than k+1: 30 real, 0 fake")


# --------------------------------------------------------------------------------------------------- FID


def with_moments(n: int, mu: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n points whose sample mean is mu and unbiased sample covariance is cov (up to float64 rounding)."""
    z = torch.randn(n, mu.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(dim=0)
    z = torch.linalg.solve_triangular(torch.linalg.cholesky(z.T @ z / (n - 1)), z.T, upper=False).T  # cov = I
    return mu + z @ torch.linalg.cholesky(cov).T


def test_fid_of_a_set_with_itself_is_zero():
    x = 3.0 + torch.randn(400, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(fid_from_features(x, x.clone())) < 1e-9
    assert fid_from_features(x, x + 0.5) == pytest.approx(6 * 0.25, rel=1e-9)  # a shift c: FID = ||c||^2


@settings(max_examples=20, deadline=None)
@given(dim=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_fid_of_diagonal_gaussians_is_the_closed_form(dim, seed):
    """Diagonal covariances commute: FID = ||mu1 - mu2||^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i))."""
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = rng.uniform(0.1, 4.0, size=dim), rng.uniform(0.1, 4.0, size=dim)
    a = with_moments(50, torch.tensor(mu1), torch.diag(torch.tensor(s1)), seed)
    b = with_moments(70, torch.tensor(mu2), torch.diag(torch.tensor(s2)), seed + 1)
    expected = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-8, abs=1e-10)


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_fid_of_general_gaussians_matches_float64_scipy(dim, seed):
    """Non-commuting covariances: Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2} (symmetric, via scipy)."""
    rng = np.random.default_rng(seed)
    a1, a2 = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a1 @ a1.T + 0.1 * np.eye(dim), a2 @ a2.T + 0.1 * np.eye(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    r1 = np.real(scipy.linalg.sqrtm(s1))
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)
    a = with_moments(3 * dim + 2, torch.tensor(mu1), torch.tensor(s1), seed)
    b = with_moments(5 * dim, torch.tensor(mu2), torch.tensor(s2), seed + 7)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_fid_errors_are_one_line():
    x = torch.randn(5, 3)
    with pytest.raises(ConfigError) as err:
        fid_from_features(x, x[:1])
    assert one_line(err) == "fake features needs at least 2 feature vectors, got 1"
    with pytest.raises(ConfigError) as err:
        fid_from_features(x, torch.randn(5, 4))
    assert "differ in dimension" in one_line(err)


# --------------------------------------------------------------------------------------------------- KID


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef: float) -> float:
    """Bińkowski et al. (2018), eq. (3) with k(a, b) = (gamma a.b + coef)^degree: U-statistics within each set."""
    kxx, kyy, kxy = ((gamma * x @ x.T + coef) ** degree, (gamma * y @ y.T + coef) ** degree,
                     (gamma * x @ y.T + coef) ** degree)
    off = ~np.eye(len(x), dtype=bool)
    return float(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())


@settings(max_examples=15, deadline=None)
@given(n=st.integers(3, 40), dim=st.integers(1, 10), degree=st.integers(1, 4), coef=st.floats(0.1, 2.0),
       gamma=st.one_of(st.none(), st.floats(0.05, 1.0)), seed=st.integers(0, 2**31 - 1))
def test_kid_with_one_full_subset_is_the_float64_unbiased_mmd(n, dim, degree, coef, gamma, seed):
    """subsets=1 of size n (all points, in some order) makes the estimator deterministic."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, dim)), 0.4 + rng.normal(size=(n, dim))
    mean, std = kid_from_features(torch.tensor(x), torch.tensor(y), subsets=1, subset_size=n,
                                  degree=degree, gamma=gamma, coef=coef)
    expected = mmd2_unbiased(x, y, degree, 1.0 / dim if gamma is None else gamma, coef)
    assert mean == pytest.approx(expected, rel=1e-9, abs=1e-12) and std == 0.0


def test_kid_is_unbiased_for_one_distribution():
    """E[MMD^2_u] = 0 for two samples of one distribution: over 40 independent pairs the mean is within 3 standard
    errors of 0, while the biased (V-statistic) estimator sits far above it."""
    rng = np.random.default_rng(11)
    kid, biased = [], []
    for _ in range(40):
        x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
        kid.append(kid_from_features(torch.tensor(x), torch.tensor(y), subsets=1, subset_size=30)[0])
        kxx, kyy, kxy = ((a @ b.T / 4 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(kid, ddof=1) / math.sqrt(len(kid))
    assert abs(np.mean(kid)) < 3 * se
    assert np.mean(biased) > 10 * se
    # and with subsets of one pair of sets: mean within a few of the estimator's std (the brief's check)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    mean, std = kid_from_features(torch.tensor(x), torch.tensor(y), subsets=50, subset_size=50)
    assert abs(mean) < 3 * std and std > 0
    far_mean, far_std = kid_from_features(torch.tensor(x), torch.tensor(y + 1.0), subsets=50, subset_size=50)
    assert far_mean > 3 * far_std


def test_kid_seed_fixes_the_subsets_and_leaves_the_global_generator_alone():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(100, 3, generator=g), torch.randn(100, 3, generator=g)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = kid_from_features(x, y, subsets=5, subset_size=20, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert kid_from_features(x, y, subsets=5, subset_size=20, seed=7) == first
    assert kid_from_features(x, y, subsets=5, subset_size=20, seed=8) != first
    with pytest.raises(ConfigError) as err:
        kid_from_features(x, y[:10], subsets=5, subset_size=20)
    assert one_line(err).startswith("kid.subset_size must be an integer in [2, 10]")


# ---------------------------------------------------------------------------------------------------- IS


def test_inception_score_of_uniform_predictions_is_one():
    for splits in (1, 4):
        mean, std = inception_score_from_probs(torch.full((40, 7), 1 / 7, dtype=torch.float64), splits=splits)
        assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = inception_score_from_logits(torch.full((40, 7), 3.3), splits=4)  # equal logits
    assert mean == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("num_classes", [2, 10, 1008])
def test_inception_score_of_a_perfect_classifier_on_balanced_data_is_the_class_count(num_classes):
    """One-hot p(y|x), each class equally often: KL(p(y|x) || U) = log C for every x, so IS = C (one split)."""
    probs = torch.eye(num_classes, dtype=torch.float64).repeat(3, 1)
    mean, std = inception_score_from_probs(probs, splits=1)
    assert mean == pytest.approx(num_classes, rel=1e-12) and std == 0.0
    logits = torch.log(probs.clamp_min(1e-30))  # nearly one-hot logits: the same within 1e-26
    assert inception_score_from_logits(logits, splits=1)[0] == pytest.approx(num_classes, rel=1e-9)


def test_inception_score_matches_float64_numpy_per_split(monkeypatch):
    """With torchmetrics' random permutation replaced by the identity, the splits are consecutive blocks:
    IS_s = exp(mean_x KL(p(y|x) || mean_s p(y|x))) per block, reported as mean and std with 1/splits."""
    logits = np.random.default_rng(5).normal(scale=3.0, size=(60, 5))
    p = scipy.special.softmax(logits, axis=1)
    scores = []
    for block in np.split(p, 4):
        kl = (block * (np.log(block) - np.log(block.mean(axis=0, keepdims=True)))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **kw: torch.arange(n))
    mean, std = inception_score_from_logits(torch.tensor(logits), splits=4)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-10) and std > 0.01
    assert inception_score_from_probs(torch.tensor(p), splits=4) == pytest.approx((mean, std), rel=1e-12)


def test_inception_score_rejects_non_probabilities():
    with pytest.raises(DataError) as err:
        inception_score_from_probs(torch.full((4, 3), 0.5))
    assert "rows summing to 1" in one_line(err)
    with pytest.raises(ConfigError):
        inception_score_from_logits(torch.zeros(4, 3), splits=5)


# --------------------------------------------------------------------------------------- Inception-v3 offline


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_missing_inception_weights_offline_is_one_fast_line(empty_caches, no_network, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    downloads = []
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **kw: downloads.append(a))
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        inception_features(images)
    assert time.perf_counter() - t0 < 5.0
    cached = empty_caches / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert one_line(err) == ("Inception-v3 weights not found (nothing is downloaded): download "
                             f"{INCEPTION_WEIGHTS_URL} and set inception_network.weights_path to that file, "
                             f"or put it at {cached}, or set inception_network.download = True (with internet)")
    missing = empty_caches / "nowhere.pth"
    with pytest.raises(ConfigError) as err:
        inception_features(images, weights_path=missing)
    assert one_line(err).startswith(f"inception_network.weights_path={missing} does not exist")
    assert no_network == [] and downloads == []
    assert not (empty_caches / "torch").exists() and not (empty_caches / "cache").exists()  # nothing written


def test_unreadable_inception_weights_are_one_line(tmp_path, no_network):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as err:
        load_inception(bad)
    assert one_line(err).startswith(f"cannot load Inception-v3 weights from {bad} (")
    assert no_network == []


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A stand-in weights file: torch-fidelity's Inception-v3 with random weights (the real ones are not here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **kw: {})
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **kw: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_are_torchmetrics_fid_features(random_inception_weights, empty_caches, no_network):
    """The bound weights file is used offline, and the pool_3 features are those of torchmetrics'
    ``FrechetInceptionDistance(feature=2048, antialias=False)`` (TF1 resize) on the same file."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    feats = inception_features(images, weights_path=random_inception_weights, batch_size=1)
    assert feats["2048"].shape == (2, 2048) and feats["logits_unbiased"].shape == (2, 1008)
    assert bool(torch.isfinite(feats["2048"]).all()) and feats["2048"].std() > 0
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(random_inception_weights),
                                   antialias=False)
    with torch.no_grad():
        expected = fid.inception(images)
    torch.testing.assert_close(feats["2048"], expected, rtol=1e-5, atol=1e-5)
    net = load_inception(random_inception_weights)  # logits_unbiased = pool_3 @ fc.weight^T (no bias)
    torch.testing.assert_close(feats["logits_unbiased"], feats["2048"] @ net.fc.weight.T, rtol=1e-4, atol=1e-4)
    as_float = inception_features(images.float() / 255, weights_path=random_inception_weights,
                                  features=("2048",))["2048"]
    torch.testing.assert_close(as_float, feats["2048"], rtol=0, atol=0)  # [0, 1] floats map back to the same bytes
    assert no_network == []


# ------------------------------------------------------------------------ Inception-v3 download (opt-in, loopback)

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


@contextlib.contextmanager
def serving(path):
    """A local HTTP server (127.0.0.1, a free port) that serves ``path``'s bytes at any URL; yields the list of
    requested paths (one entry per request)."""
    body, requests = path.read_bytes(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def weights_server(random_inception_weights, empty_caches, monkeypatch):
    """The stand-in weights served on loopback as ``INCEPTION_WEIGHTS_URL`` (urllib goes direct, no proxy); yields
    (requests, the file's SHA-256, torch-hub's cache path under ``empty_caches``)."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with serving(random_inception_weights) as (port, requests):
        monkeypatch.setattr("dlsm.eval.fid.INCEPTION_WEIGHTS_URL", f"http://127.0.0.1:{port}/{WEIGHTS_NAME}")
        digest = hashlib.sha256(random_inception_weights.read_bytes()).hexdigest()
        yield requests, digest, empty_caches / "torch" / "hub" / "checkpoints" / WEIGHTS_NAME


def leftovers(folder):
    """Files in ``folder`` other than the download's lock file."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


@pytest.mark.parametrize("digits", [8, 64])
def test_inception_download_fetches_checks_and_caches_once(weights_server, random_inception_weights, digits):
    requests, digest, cached = weights_server
    path = inception_weights_path(download=True, sha256=digest[:digits])
    assert path == cached and requests == [f"/{WEIGHTS_NAME}"]
    assert cached.read_bytes() == random_inception_weights.read_bytes()
    assert leftovers(cached.parent) == [WEIGHTS_NAME]  # no temporary file beside it
    assert load_inception(path).fc.weight.shape == (1008, 2048)
    assert inception_weights_path(download=True, sha256=digest[:digits]) == cached
    assert inception_weights_path() == cached and len(requests) == 1  # there now: not downloaded again


def test_inception_download_into_the_bound_weights_path(weights_server, random_inception_weights, tmp_path):
    requests, digest, cached = weights_server
    target = tmp_path / "deep" / "folder" / "inception.pth"
    assert inception_weights_path(target, download=True, sha256=digest.upper()) == target  # hex in either case
    assert target.read_bytes() == random_inception_weights.read_bytes() and len(requests) == 1
    assert not cached.parent.exists()


def test_inception_download_waits_for_the_lock_and_then_finds_the_file(weights_server, monkeypatch):
    """Another launch (or torchrun rank) holds the lock and downloads: this one waits, then finds the file there
    and asks nothing of the server."""
    import filelock

    requests, digest, cached = weights_server
    cached.parent.mkdir(parents=True)
    waiting = threading.Event()

    class Announced(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            waiting.set()  # past the first existence check, about to wait for the lock
            return super().acquire(*args, **kwargs)

    monkeypatch.setattr(filelock, "FileLock", Announced)
    result = {}
    other = filelock.UnixFileLock(str(cached) + ".lock")
    with other:
        thread = threading.Thread(target=lambda: result.update(path=inception_weights_path(download=True)))
        thread.start()
        assert waiting.wait(10)
        time.sleep(0.2)
        assert thread.is_alive()  # blocked on the lock
        cached.write_bytes(b"the other launch's download")
    thread.join(10)
    assert result == {"path": cached} and requests == []
    assert cached.read_bytes() == b"the other launch's download"


def test_inception_download_with_a_wrong_checksum_leaves_no_file(weights_server):
    requests, digest, cached = weights_server
    wrong = "0123abcd" if not digest.startswith("0123abcd") else "fedc9876"
    with pytest.raises(ConfigError) as err:
        inception_weights_path(download=True, sha256=wrong)
    url = fid.INCEPTION_WEIGHTS_URL  # the local server's
    assert one_line(err) == (f"downloaded Inception-v3 weights from {url} fail the checksum (SHA-256 should start "
                             f"with {wrong}): the file was removed; if the published file changed and you trust "
                             "it, set inception_network.sha256 to its SHA-256")
    assert requests == [f"/{WEIGHTS_NAME}"] and leftovers(cached.parent) == []


def test_inception_without_download_asks_nothing_of_the_server(weights_server):
    requests, digest, cached = weights_server
    with pytest.raises(ConfigError) as err:
        inception_weights_path(sha256=digest[:8])
    assert one_line(err).startswith("Inception-v3 weights not found (nothing is downloaded): download ")
    assert one_line(err).endswith(f"or put it at {cached}, or set inception_network.download = True (with internet)")
    assert requests == [] and not cached.parent.exists()


def test_inception_download_offline_is_one_fast_line(empty_caches, no_network):
    cached = empty_caches / "torch" / "hub" / "checkpoints" / WEIGHTS_NAME
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        inception_weights_path(download=True)
    assert time.perf_counter() - t0 < 5.0
    line = one_line(err)
    assert line.startswith(f"could not download Inception-v3 weights from {INCEPTION_WEIGHTS_URL} into {cached} (")
    assert line.endswith("): with no internet, download it elsewhere and set inception_network.weights_path to the "
                         "file")
    assert no_network and leftovers(cached.parent) == []  # it tried, and wrote nothing but its lock


@pytest.mark.parametrize("sha256", ["xyz", "1234567", "a" * 65, "6726825g", "", 6726825])
def test_inception_sha256_must_be_8_to_64_hex_digits(sha256, empty_caches, no_network):
    for download in (True, False):
        with pytest.raises(ConfigError) as err:
            inception_weights_path(download=download, sha256=sha256)
        assert one_line(err) == ("inception_network.sha256 must be 8 to 64 hexadecimal digits (a SHA-256 or its "
                                 f"prefix), got {sha256!r}")
    assert no_network == [] and not (empty_caches / "torch").exists()


@pytest.mark.parametrize(("binding", "message"), [
    ("inception_network.sha256 = 'xyz'",
     "inception_network.sha256 = 'xyz': must be 8 to 64 hexadecimal digits (a SHA-256 or its prefix)"),
    ("inception_network.download = 'yes'", "inception_network.download = 'yes': expected bool"),
])
def test_inception_download_bindings_are_checked_when_parsed(binding, message):
    import gin

    from dlsm.config import parse_config

    try:
        parse_config([], ["inception_network.sha256 = '6726825D'", "inception_network.download = True"])  # fine
        with pytest.raises(ConfigError) as err:
            parse_config([], [binding])
        assert one_line(err) == message
    finally:
        gin.clear_config()


def test_preflight_downloads_when_the_binding_asks(weights_server, random_inception_weights):
    import gin

    from dlsm.eval.images import preflight

    requests, digest, cached = weights_server
    gin.clear_config()
    try:
        gin.parse_config("image_features.networks = [@inception_network]")
        with pytest.raises(ConfigError, match="inception_network.download = True"):
            preflight()  # not asked: nothing downloads
        assert requests == []
        gin.parse_config(f"inception_network.download = True\ninception_network.sha256 = '{digest[:8]}'")
        preflight()
        assert cached.read_bytes() == random_inception_weights.read_bytes() and len(requests) == 1
    finally:
        gin.clear_config()


def test_classwise_mean_of_a_float_metric_over_several_classes():
    """A float metric (as fid_from_features) is averaged unweighted over the classes: counts per class known."""
    real, fake = torch.zeros(6, 2), torch.zeros(9, 2)
    yr, yf = torch.tensor([0, 0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 1, 2, 2, 2, 2])
    mean, per_class = classwise(lambda r, f: float(10 * len(r) + len(f)), real, yr, fake, yf, 3)
    assert per_class == {0: 31.0, 1: 14.0, 2: 24.0}
    assert mean == pytest.approx((31.0 + 14.0 + 24.0) / 3, rel=1e-15)


@pytest.mark.parametrize(("num_classes", "labels", "message"), [
    (0, None, "classwise.num_classes must be a positive integer, got 0"),
    (True, None, "classwise.num_classes must be a positive integer, got True"),
    (2.0, None, "classwise.num_classes must be a positive integer, got 2.0"),
    (3, ("real", [0, 1, 3]), "real labels must lie in [0, 3), got [0, 3]"),   # a label equal to the class count
    (3, ("fake", [-1, 1, 2]), "fake labels must lie in [0, 3), got [-1, 2]"),
    (3, ("fake", [[0, 1, 2]]), "fake labels must have shape (3,), got (1, 3)"),
    (3, ("fake", [[0], [1], [2]]), "fake labels must have shape (3,), got (3, 1)"),  # first dimension matches
])
def test_classwise_bad_input_is_one_exact_line(num_classes, labels, message):
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 2])
    ys = {"real": y, "fake": y}
    if labels is not None:
        ys[labels[0]] = torch.tensor(labels[1])
    with pytest.raises(ConfigError) as err:
        classwise(lambda r, f: 0.0, x, ys["real"], x, ys["fake"], num_classes)
    assert str(err.value) == message
