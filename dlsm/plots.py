"""Figures logged as PNG artifacts: training curves, conditional samples, posterior-score fields.

Each figure function is gin-configurable and returns a matplotlib Figure; the pipeline logs it.
"""

from __future__ import annotations

import gin
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dlsm.metrics import Evaluation, grid_points  # noqa: E402

__all__ = ["loss_curves", "posterior_field_figure"]

CLASS_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


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
    names = list(ev.methods)
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
                ax.set_title(n)
    for j, n in enumerate(names):
        ax = axes[k, j]
        for c, xs in ev.samples.get(n, {}).items():
            ax.scatter(*xs[:max_points].T, s=0.5, c=CLASS_COLOURS[c % 4], label=f"class {c}")
        ax.set(xlim=xlim, ylim=ylim, xticks=[], yticks=[])
        if j == 0:
            ax.set_ylabel("samples")
    return fig
