"""The (lambda, alpha) frontier: quality against diversity for every sampled (classifier loss, alpha) point of
several seeds, and whether any point beats both base and scaling on both axes (issue 15; ``gin/digits_frontier.gin``).

A point is one sampling method of the experiment, e.g. ``total_lam8_a3`` = (classifier ``total_lam8``, alpha 3), or
a guidance schedule, e.g. ``interval`` = (classifier ``ce``, ``mid/interval_guidance``);
``experiment.sampling_methods`` names them (:func:`parse_sampling_methods` reads them back from the MLflow param).
Its value on an axis is the mean over seeds with a Student-t interval (:mod:`dlsm.report.stats`); "p beats b on an
axis" means the paired interval of p - b over the same seeds lies wholly on the better side of 0, so a claim needs
every seed's pair, not overlapping means.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dlsm.errors import ConfigError
from dlsm.report.stats import Interval, mean_ci, paired_ci, verdict

__all__ = ["Axis", "Point", "beats", "closest_point", "frontier_figure", "frontier_points", "frontier_table",
           "parse_sampling_methods"]


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
    alpha: float | None  # None: a guidance schedule (``label`` names it)
    x: Interval
    y: Interval
    label: str = ""


def parse_sampling_methods(text: str, macros: Mapping[str, str] | None = None) -> dict[str, tuple[str, float | str]]:
    """``experiment.sampling_methods`` as logged (the gin text of a dict): ``{name: (classifier, alpha)}``, with a
    macro ``%NAME`` replaced by ``macros['NAME']`` and a guidance reference ``@scope/name()`` kept as the string
    ``'scope/name'``."""
    for name, value in (macros or {}).items():
        text = re.sub(rf"%{re.escape(name)}\b", value, text)
    text = re.sub(r"@([\w./]+)\(\)", r"'\1'", text)
    try:
        spec = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"cannot read experiment.sampling_methods {text[:80]!r}") from None
    return {str(k): (str(v[0]), v[1] if isinstance(v[1], str) else float(v[1])) for k, v in spec.items()}


def _values(runs: Sequence[Mapping[str, float]], method: str, key: str) -> list[float]:
    missing = [i for i, m in enumerate(runs) if f"{method}/{key}" not in m]
    if missing:
        raise ConfigError(f"frontier: seed run {missing[0]} has no metric {method}/{key}")
    return [float(m[f"{method}/{key}"]) for m in runs]


def frontier_points(
    runs: Sequence[Mapping[str, float]],
    sampling_methods: Mapping[str, tuple[str, float | str]],
    x: Axis,
    y: Axis,
    *,
    level: float = 0.95,
) -> list[Point]:
    """One :class:`Point` per sampling method: ``runs`` are the final metrics of one experiment per seed; a method
    whose second item is not a number is a guidance schedule, labelled with the method's name."""
    if not runs:
        raise ConfigError("frontier: no seed runs")
    out = []
    for name, (clf, alpha) in sampling_methods.items():
        number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
        out.append(Point(name, clf, float(alpha) if number else None, mean_ci(_values(runs, name, x.key), level=level),
                         mean_ci(_values(runs, name, y.key), level=level),
                         f"α{float(alpha):g}" if number else name))
    return out


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
        cells = [p.method, p.classifier, f"{p.alpha:g}" if p.alpha is not None else "schedule", str(p.x), str(p.y)]
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


def closest_point(
    runs: Sequence[Mapping[str, float]], points: Sequence[Point], x: Axis, y: Axis,
    baselines: Sequence[str] = ("base", "scaling"), *, level: float = 0.95,
) -> tuple[str, dict[tuple[str, str], Interval]] | None:
    """The point that comes closest to beating every baseline on both axes, and its margins: for each point, the
    paired interval of (point - baseline) on each axis, turned so that > 0 is better; its worst end on the better
    side is min over the 2 x len(baselines) intervals of (mean - half-width) / |scale|, scale the baseline's mean;
    the point with the largest worst end wins. None when no point but the baselines."""
    best, best_score = None, -float("inf")
    for p in points:
        if p.method in baselines:
            continue
        margins, score = {}, float("inf")
        for b in baselines:
            for axis in (x, y):
                d = paired_ci(_values(runs, p.method, axis.key), _values(runs, b, axis.key), level=level)
                margins[(b, axis.label)] = d
                sign = 1.0 if axis.higher_is_better else -1.0
                scale = abs(mean_ci(_values(runs, b, axis.key)).mean) or 1.0
                hw = 0.0 if d.half_width != d.half_width else d.half_width
                score = min(score, (sign * d.mean - hw) / scale)
        if score > best_score:
            best, best_score = (p.method, margins), score
    return best


def _place_labels(ax, points: Sequence[Point], texts: Sequence[str]) -> None:
    """Each point's label at the first offset, on rings of growing radius around the point, whose drawn box lies in
    the axes and meets no label placed before (boxes measured by the renderer): crowded points get readable labels,
    with a thin leader line when the label sits away from its point. No extra library."""
    import math

    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    area = ax.get_window_extent(renderer)
    rings = [(r, k) for r in (7, 16, 26, 38, 52, 68) for k in range(8)]
    offsets = [(round(r * math.cos(math.pi * (k / 4 + 0.125))), round(r * math.sin(math.pi * (k / 4 + 0.125))))
               for r, k in rings]
    placed = []
    for p, text in zip(points, texts, strict=True):
        for dx, dy in offsets:
            far = dx * dx + dy * dy > 150
            ann = ax.annotate(text, (p.x.mean, p.y.mean), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                              ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                              arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if far else None)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)  # the text alone, not its leader line
            inside = area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1
            if inside and not any(box.overlaps(b) for b in placed):
                break
            ann.remove()
        else:  # every ring taken: the first place, overlapping
            dx, dy = offsets[0]
            ann = ax.annotate(text, (p.x.mean, p.y.mean), textcoords="offset points", xytext=(dx, dy), fontsize=7)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)
        placed.append(box)


def frontier_figure(points: Sequence[Point], x: Axis, y: Axis, *, highlight: Sequence[str] = ("base", "scaling",
                                                                                              "ours")):
    """Every point as mean ± interval on both axes, one colour per classifier, alpha (or the schedule's name)
    beside it at an offset where labels do not collide; the ``highlight`` methods (base, scaling, ours) circled and
    named. An FID axis is logarithmic, so points near the scaling corner separate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.8), constrained_layout=True)
    classifiers = list(dict.fromkeys(p.classifier for p in points))
    colours = {c: plt.get_cmap("tab10")(i) for i, c in enumerate(classifiers)}
    for p in points:
        xe = 0.0 if p.x.half_width != p.x.half_width else p.x.half_width  # NaN (one seed): no bar
        ye = 0.0 if p.y.half_width != p.y.half_width else p.y.half_width
        marker = "o" if p.alpha is not None else "D"
        ax.errorbar(p.x.mean, p.y.mean, xerr=xe, yerr=ye, fmt=marker, color=colours[p.classifier], ms=4,
                    capsize=2, label=p.classifier, elinewidth=0.8)
        if p.method in highlight:
            ax.scatter([p.x.mean], [p.y.mean], s=160, facecolors="none", edgecolors="black")
    for axis, set_scale in ((x, ax.set_xscale), (y, ax.set_yscale)):
        if "fid" in axis.key and all(getattr(p, "x" if axis is x else "y").mean > 0 for p in points):
            set_scale("log")
    handles, labels = ax.get_legend_handles_labels()
    seen: dict = {}
    for label, handle in zip(labels, handles, strict=True):
        seen.setdefault(label, handle)  # the classifier's first point: a constant alpha's circle where there is one
    ax.legend(seen.values(), seen.keys(), fontsize=8, title="classifier (◆ = schedule)")
    ax.set_xlabel(f"{x.label} ({'higher' if x.higher_is_better else 'lower'} is better)")
    ax.set_ylabel(f"{y.label} ({'higher' if y.higher_is_better else 'lower'} is better)")
    n = points[0].x.n if points else 0
    ax.set_title(f"frontier: mean ± 95% interval over {n} seed{'s' if n != 1 else ''}")
    texts = [f"{p.method} ({p.label})" if p.method in highlight and p.alpha is not None
             else (p.label if p.alpha is not None else p.method) for p in points]
    fig.canvas.draw()  # lay the figure out once, then freeze it: labels are placed in display coordinates
    fig.set_layout_engine("none")
    _place_labels(ax, points, texts)
    return fig
