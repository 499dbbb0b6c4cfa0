"""The (lambda, alpha) frontier: quality against diversity for every sampled (classifier loss, alpha) point of
several seeds, and whether any point beats both base and scaling on both axes (issue 15; ``gin/digits_frontier.gin``).

A point is one sampling method of the experiment, e.g. ``total_lam8_a3`` = (classifier ``total_lam8``, alpha 3);
``experiment.sampling_methods`` names them. Its value on an axis is the mean over seeds with a Student-t interval
(:mod:`dlsm.report.stats`); "p beats b on an axis" means the paired interval of p - b over the same seeds
lies wholly on the
better side of 0, so a claim needs every seed's pair, not overlapping means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dlsm.errors import ConfigError
from dlsm.report.stats import Interval, mean_ci, paired_ci, verdict

__all__ = ["Axis", "Point", "beats", "frontier_figure", "frontier_points", "frontier_table"]


@dataclass(frozen=True)
class Axis:
    """A metric (its key after ``{method}/``) and its direction."""

    key: str
    label: str
    higher_is_better: bool


@dataclass(frozen=True)
class Point:
    method: str
    classifier: str
    alpha: float
    x: Interval
    y: Interval


def _values(runs: Sequence[Mapping[str, float]], method: str, key: str) -> list[float]:
    missing = [i for i, m in enumerate(runs) if f"{method}/{key}" not in m]
    if missing:
        raise ConfigError(f"frontier: seed run {missing[0]} has no metric {method}/{key}")
    return [float(m[f"{method}/{key}"]) for m in runs]


def frontier_points(
    runs: Sequence[Mapping[str, float]],
    sampling_methods: Mapping[str, tuple[str, float]],
    x: Axis,
    y: Axis,
    *,
    level: float = 0.95,
) -> list[Point]:
    """One :class:`Point` per sampling method: ``runs`` are the final metrics of one experiment per seed."""
    if not runs:
        raise ConfigError("frontier: no seed runs")
    return [Point(name, clf, float(alpha), mean_ci(_values(runs, name, x.key), level=level),
                  mean_ci(_values(runs, name, y.key), level=level))
            for name, (clf, alpha) in sampling_methods.items()]


def beats(
    runs: Sequence[Mapping[str, float]], a: str, b: str, axis: Axis, *, level: float = 0.95
) -> tuple[str, Interval]:
    """(verdict, paired interval of a - b over the seeds) for "method ``a`` is better than ``b`` on ``axis``":
    'agrees', 'does not' or 'cannot tell at this sample size' (:func:`dlsm.report.stats.verdict`)."""
    diff = paired_ci(_values(runs, a, axis.key), _values(runs, b, axis.key), level=level)
    return verdict(diff, higher_is_better=axis.higher_is_better), diff


def frontier_table(
    runs: Sequence[Mapping[str, float]], points: Sequence[Point], x: Axis, y: Axis,
    baselines: Sequence[str] = ("base", "scaling"), *, level: float = 0.95,
) -> str:
    """Markdown: every point's axes (mean ± half-width over seeds) and, per baseline, whether it is better on
    both axes (paired over seeds); the points that beat every baseline on both axes are marked."""
    names = [p.method for p in points]
    missing = [b for b in baselines if b not in names]
    if missing:
        raise ConfigError(f"frontier: baseline {missing[0]} is not among the sampled methods")
    head = ["point", "classifier", "α", x.label, y.label, *[f"beats {b} on both" for b in baselines]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p in points:
        cells = [p.method, p.classifier, f"{p.alpha:g}", str(p.x), str(p.y)]
        wins = []
        for b in baselines:
            if b == p.method:
                cells.append("—")
                continue
            both = all(beats(runs, p.method, b, axis, level=level)[0] == "agrees" for axis in (x, y))
            wins.append(both)
            cells.append("yes" if both else "no")
        mark = " **(beats all)**" if wins and all(wins) and len(wins) == len(baselines) else ""
        lines.append(f"| {p.method}{mark} | " + " | ".join(cells[1:]) + " |")
    return "\n".join(lines) + "\n"


def frontier_figure(points: Sequence[Point], x: Axis, y: Axis, *, highlight: Sequence[str] = ("base", "scaling",
                                                                                              "ours")):
    """Every point as mean ± interval on both axes, one colour per classifier, alpha written beside it; the
    ``highlight`` methods (base, scaling, ours) circled and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5), constrained_layout=True)
    classifiers = list(dict.fromkeys(p.classifier for p in points))
    colours = {c: plt.get_cmap("tab10")(i) for i, c in enumerate(classifiers)}
    for p in points:
        xe = 0.0 if p.x.half_width != p.x.half_width else p.x.half_width  # NaN (one seed): no bar
        ye = 0.0 if p.y.half_width != p.y.half_width else p.y.half_width
        ax.errorbar(p.x.mean, p.y.mean, xerr=xe, yerr=ye, fmt="o", color=colours[p.classifier], ms=4,
                    capsize=2, label=p.classifier)
        ax.annotate(f"α{p.alpha:g}", (p.x.mean, p.y.mean), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if p.method in highlight:
            ax.scatter([p.x.mean], [p.y.mean], s=160, facecolors="none", edgecolors="black")
            ax.annotate(p.method, (p.x.mean, p.y.mean), textcoords="offset points", xytext=(-10, -14), fontsize=9,
                        weight="bold")
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    ax.legend(seen.values(), seen.keys(), fontsize=8, title="classifier")
    ax.set_xlabel(f"{x.label} ({'higher' if x.higher_is_better else 'lower'} is better)")
    ax.set_ylabel(f"{y.label} ({'higher' if y.higher_is_better else 'lower'} is better)")
    n = points[0].x.n if points else 0
    ax.set_title(f"(λ, α) frontier: mean ± 95% interval over {n} seed{'s' if n != 1 else ''}")
    return fig
