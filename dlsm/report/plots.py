"""Figures logged as PNG artifacts: training curves, conditional samples, posterior-score fields.

Each figure function is gin-configurable and returns a matplotlib Figure; the pipeline logs it.
"""

from __future__ import annotations

import gin
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dlsm.eval.points import Evaluation, grid_points  # noqa: E402

__all__ = ["curve_band", "loss_curves", "mean_and_ci", "posterior_field_figure", "training_curves_figure"]

CLASS_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
# the DLSM paper's labels for the moons methods (Figure 1 / Table 1 columns are ordered by them)
PAPER_LABELS = {"base": "(a) base", "scaling": "(b) scaling", "posterior_sm": "(c) posterior SM",
                "ours": "(d) ours", "oracle": "(e) oracle"}


def paper_order(names) -> list[str]:
    """Method names in the paper's (a)-(e) order, other names after them in their given order."""
    order = list(PAPER_LABELS)
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def mean_and_ci(runs: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and the half-width of its ``level`` Student-t confidence interval
    (t_{(1+level)/2, n-1} s / sqrt(n)); zero width for a single run."""
    n = runs.shape[0]
    mean = runs.mean(axis=0)
    if n < 2:
        return mean, np.zeros_like(mean)
    from scipy import stats  # 1 s of import: only where an interval is drawn

    return mean, stats.t.ppf((1 + level) / 2, n - 1) * runs.std(axis=0, ddof=1) / np.sqrt(n)


def curve_band(
    runs: list[list[tuple[int, float]]], level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, CI half-width) of one metric's (step, value) histories over runs, cut to the
    shortest run so every step averages the same runs."""
    n = min(len(h) for h in runs)
    mean, half = mean_and_ci(np.array([[v for _, v in h[:n]] for h in runs]), level)
    return np.array([s for s, _ in runs[0][:n]]), mean, half


TRACK_LABELS = {"D_L": "likelihood-score error E[D_L], x~ ~ p(x~|y)", "D_L_grid": "likelihood-score error E[D_L], grid",
                "ce": "cross-entropy"}


def training_curves_figure(
    curves: dict[str, list[dict[str, list[tuple[int, float]]]]], title: str = ""
) -> plt.Figure:
    """DLSM paper Figure 5: one panel per tracked metric (``track/{metric}/s{sigma}``); one line per
    loss, the mean over its runs (seeds) with a shaded 95 % confidence band."""
    keys = sorted({k for runs in curves.values() for h in runs for k in h}, key=lambda k: (k.split("/")[1] == "ce", k))
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.2 * max(len(keys), 1), 3.4), squeeze=False,
                             constrained_layout=True)
    for ax, key in zip(axes[0], keys, strict=False):
        for loss_name, runs in curves.items():
            hs = [h[key] for h in runs if key in h]
            if not hs:
                continue
            steps, mean, half = curve_band(hs)
            (line,) = ax.plot(steps, mean, label=f"{loss_name} (n={len(hs)})")
            ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.25, lw=0)
        _, metric, sig = key.split("/")
        ax.set(xlabel="training iteration", title=f"{TRACK_LABELS.get(metric, metric)}, σ={sig[1:]}")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(f"classifier: {title}")
    return fig


def loss_curves(curves: dict[str, list[tuple[int, float]]], title: str = "training loss") -> plt.Figure:
    """One line per named curve of (step, loss) pairs, log-scaled when all values are positive."""
    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    for name, pts in curves.items():
        if pts:
            steps, vals = zip(*pts, strict=True)
            ax.plot(steps, vals, label=name)
    if all(v > 0 for pts in curves.values() for _, v in pts):
        ax.set_yscale("log")
    ax.set(xlabel="iteration", ylabel="loss", title=title)
    ax.legend()
    return fig


@gin.configurable
def posterior_field_figure(
    ev: Evaluation,
    *,
    sigma: float = 7.5,
    grid: int = 35,
    xlim: tuple[float, float] = (-40.0, 40.0),
    ylim: tuple[float, float] = (-25.0, 25.0),
    max_points: int = 2000,
) -> plt.Figure:
    """DLSM paper Figure 1: rows = posterior-score field of each class at ``sigma``, then the samples;
    columns = methods. Arrows share one scale across a row, so lengths compare between methods."""
    names = paper_order(ev.methods)
    k = ev.data.num_classes
    pts = grid_points(grid, xlim, ylim)
    fig, axes = plt.subplots(k + 1, len(names), figsize=(3.2 * len(names), 2.4 * (k + 1)), squeeze=False,
                             constrained_layout=True)
    for c in range(k):
        fields = {n: ev.methods[n].posterior(pts, sigma, c).detach() for n in names}
        scale = max(float(f.norm(dim=1).max()) for f in fields.values()) * grid / 1.5
        for j, n in enumerate(names):
            ax = axes[c, j]
            f = fields[n]
            ax.scatter(*ev.data.of_class(c)[:max_points].T, s=0.3, c="lightgray")
            ax.quiver(pts[:, 0], pts[:, 1], f[:, 0], f[:, 1], color=CLASS_COLOURS[c % 4], scale=scale,
                      angles="xy", width=0.004)
            ax.set(xlim=xlim, ylim=ylim, xticks=[], yticks=[])
            if j == 0:
                name = ev.data.class_names[c] if ev.data.class_names else f"c{c}"
                ax.set_ylabel(f"class {c} ({name})\nposterior score, σ={sigma:g}")
            if c == 0:
                ax.set_title(PAPER_LABELS.get(n, n))
    for j, n in enumerate(names):
        ax = axes[k, j]
        for c, xs in ev.samples.get(n, {}).items():
            ax.scatter(*xs[:max_points].T, s=0.5, c=CLASS_COLOURS[c % 4], label=f"class {c}")
        ax.set(xlim=xlim, ylim=ylim, xticks=[], yticks=[])
        if j == 0:
            ax.set_ylabel("samples")
    return fig
