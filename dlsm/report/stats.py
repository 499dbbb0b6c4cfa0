"""Seeds and confidence intervals: the summaries a multi-seed table reports (the digits reproduction of Table 2).

    mean +/- t_{(1+level)/2, n-1} * s / sqrt(n)        s: the sample standard deviation (n - 1 in the denominator)

the two-sided Student-t interval for the mean of n independent runs (seeds), and the same interval for the paired
differences a_i - b_i of two methods run on the same seeds (the same score model, batches and sampler noise), which
removes the between-seed variance the two share. The t quantile is scipy's (``scipy.stats.t.ppf``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dlsm.errors import ConfigError

__all__ = ["Interval", "mean_ci", "paired_ci", "verdict"]


@dataclass(frozen=True)
class Interval:
    """mean, the interval's half-width (NaN for one value), the number of values, the confidence level."""

    mean: float
    half_width: float
    n: int
    level: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def __str__(self) -> str:
        if math.isnan(self.half_width):
            return f"{self.mean:.4g}"
        return f"{self.mean:.4g} ± {self.half_width:.2g}"


def mean_ci(values: Sequence[float], *, level: float = 0.95) -> Interval:
    """The Student-t ``level`` interval for the mean of ``values`` (one value: half-width NaN)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ConfigError("mean_ci needs at least one value")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"the confidence level must be in (0, 1), got {level!r}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, 1, level)
    from scipy.stats import t

    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(mean, float(t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n), n, level)


def paired_ci(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> Interval:
    """The interval for the mean of the per-seed differences a_i - b_i (the same seeds, in the same order)."""
    if len(a) != len(b):
        raise ConfigError(f"paired_ci needs one value of each method per seed, got {len(a)} and {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b, strict=True)], level=level)


def verdict(diff: Interval, *, higher_is_better: bool = True) -> str:
    """'agrees' when the interval of a paired difference (method - baseline) lies wholly on the better side of 0,
    'does not' when wholly on the worse side, else 'cannot tell at this sample size'."""
    if math.isnan(diff.half_width):
        return "cannot tell at this sample size"
    better = diff.low > 0 if higher_is_better else diff.high < 0
    worse = diff.high < 0 if higher_is_better else diff.low > 0
    return "agrees" if better else "does not" if worse else "cannot tell at this sample size"
