"""dlsm.report.stats: Student-t intervals against known quantiles and hand computations, paired differences,
verdicts."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlsm.errors import ConfigError
from dlsm.report.stats import mean_ci, paired_ci, verdict

# t_{0.975, 2} in closed form (df = 2: t_q = (2q - 1) sqrt(2 / (4 q (1 - q)))); df = 9 from printed tables (10 digits)
T975 = {2: 0.95 * math.sqrt(2.0 / (4 * 0.975 * 0.025)), 9: 2.2621571628}


def test_three_seeds_use_the_t_quantile_with_two_degrees_of_freedom():
    ci = mean_ci([1.0, 2.0, 3.0])  # mean 2, s = 1
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(T975[2] / math.sqrt(3), rel=1e-12)
    assert str(ci) == f"2 ± {T975[2] / math.sqrt(3):.2g}"


def test_ten_values_and_another_level():
    xs = [0.1 * i for i in range(10)]
    mean = 0.45
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 9)
    assert mean_ci(xs).half_width == pytest.approx(T975[9] * sd / math.sqrt(10), rel=1e-9)
    # 90 %: t_{0.95, 9} = 1.8331129327
    assert mean_ci(xs, level=0.9).half_width == pytest.approx(1.8331129327 * sd / math.sqrt(10), rel=1e-9)


def test_one_value_has_no_interval_and_cannot_decide():
    ci = mean_ci([0.7])
    assert ci.mean == 0.7 and math.isnan(ci.half_width) and str(ci) == "0.7"
    assert verdict(ci) == "cannot tell at this sample size"


def test_paired_differences_remove_a_shared_seed_effect():
    """ours = base + 0.01 on every seed, with seed effects of +-1: unpaired intervals overlap, the paired one is
    exactly 0.01 wide 0."""
    base = [0.0, 1.0, -1.0, 0.5, -0.5]
    ours = [b + 0.01 for b in base]
    diff = paired_ci(ours, base)
    assert diff.mean == pytest.approx(0.01) and diff.half_width == pytest.approx(0.0, abs=1e-12)
    assert verdict(diff) == "agrees" and verdict(diff, higher_is_better=False) == "does not"
    assert mean_ci(ours).low < mean_ci(base).high  # unpaired: no decision possible
    with pytest.raises(ConfigError, match="one value of each method per seed"):
        paired_ci([1.0, 2.0], [1.0])


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=12), st.floats(-1e3, 1e3))
def test_interval_is_shift_equivariant_and_contains_the_mean(xs, shift):
    a, b = mean_ci(xs), mean_ci([x + shift for x in xs])
    assert b.mean == pytest.approx(a.mean + shift, abs=1e-6)
    assert b.half_width == pytest.approx(a.half_width, rel=1e-6, abs=1e-6)
    assert a.low <= a.mean <= a.high


def test_verdict_straddling_zero_cannot_tell():
    assert verdict(mean_ci([-1.0, 1.0, 0.5])) == "cannot tell at this sample size"


def test_bad_input_is_a_config_error():
    with pytest.raises(ConfigError):
        mean_ci([])
    with pytest.raises(ConfigError):
        mean_ci([1.0, 2.0], level=1.5)


def test_bad_input_messages_and_the_open_level_interval():
    with pytest.raises(ConfigError) as err:
        mean_ci([])
    assert str(err.value) == "mean_ci needs at least one value"
    for level in (0.0, 1.0, 1.5):  # (0, 1) is open: 0 and 1 have no finite t quantile
        with pytest.raises(ConfigError) as err:
            mean_ci([1.0, 2.0], level=level)
        assert str(err.value) == f"the confidence level must be in (0, 1), got {level!r}"


def test_the_interval_records_its_size_and_level():
    from dlsm.report.stats import Interval

    one = mean_ci([0.7], level=0.9)
    assert (one.mean, one.n, one.level) == (0.7, 1, 0.9) and math.isnan(one.half_width)
    many = mean_ci([1.0, 2.0, 3.0], level=0.9)
    assert (many.n, many.level) == (3, 0.9)
    assert Interval(2.0, 1.0, 3).level == 0.95  # the default level


def test_paired_interval_uses_the_level_asked_for():
    """Differences 1, 2, 3: mean 2, s = 1; at 90 %, df = 2: t_{0.95, 2} = 0.9 sqrt(2 / (4 0.95 0.05)) (closed form)."""
    diff = paired_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], level=0.9)
    assert diff.level == 0.9 and diff.mean == 2.0
    assert diff.half_width == pytest.approx(0.9 * math.sqrt(2.0 / (4 * 0.95 * 0.05)) / math.sqrt(3), rel=1e-12)


@pytest.mark.parametrize(("mean", "half", "up", "expected"), [
    (1.0, 1.0, True, "cannot tell at this sample size"),    # low = 0 exactly: not wholly above 0
    (-1.0, 1.0, False, "cannot tell at this sample size"),  # high = 0 exactly: not wholly below 0
    (-1.0, 1.0, True, "cannot tell at this sample size"),   # high = 0 exactly: not wholly below 0 either
    (1.0, 1.0, False, "cannot tell at this sample size"),   # low = 0 exactly
    (0.0, 0.5, True, "cannot tell at this sample size"),    # (-0.5, 0.5) straddles 0
    (0.0, 0.5, False, "cannot tell at this sample size"),
    (1.0, 0.5, True, "agrees"), (1.0, 0.5, False, "does not"),
    (-1.0, 0.5, True, "does not"), (-1.0, 0.5, False, "agrees"),
])
def test_verdict_at_the_edges_of_zero(mean, half, up, expected):
    from dlsm.report.stats import Interval

    assert verdict(Interval(mean, half, 3), higher_is_better=up) == expected
