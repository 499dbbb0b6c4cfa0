"""The digits report's figures that are read back from the runs' artifacts or drawn from their numbers: Figure 3
(seed 0's sample grids), Figure 4 averaged over seeds, and the mechanism figure (errors against sigma)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dlsm.eval.images import PRDC, figure4
from dlsm.report.common import table as md_table
from dlsm.report.seeds import SeedRuns, mechanism_sigmas

__all__ = ["figure3", "figure4_mean", "mechanism_figure"]


def _download(client, run_id: str, path: str) -> Path | None:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        tracking_uri=client.tracking_uri))
    except Exception:
        return None


def _child(client, runs: SeedRuns, seed_index: int, stage: str) -> str | None:
    exp = client.get_experiment_by_name(runs.experiment)
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                              f"'{runs.run_ids[seed_index]}' and tags.`dlsm.stage` = '{stage}'", max_results=1)
    return kids[0].info.run_id if kids else None


def figure4_mean(client, runs: SeedRuns, fig_dir: Path, tag: str) -> list[str]:
    """Figure 4 from every seed's ``tables/per_class.{net}.json``: the class-wise P/R/D/C of ours − base, averaged
    over seeds, each panel sorted; and a table of how many classes are above / below 0."""
    per_seed = []
    for i in range(len(runs.run_ids)):
        run_id = _child(client, runs, i, "evaluation")
        path = _download(client, run_id, f"tables/per_class.{runs.net}.json") if run_id else None
        if path is not None:
            per_seed.append(json.loads(path.read_text()))
    if not per_seed or not all({"ours", "base"} <= set(p) for p in per_seed):
        return ["Figure 4 needs the per-class tables of ours and base; not drawn."]
    mean = {m: {int(c): {k: float(np.mean([p[m][c][k] for p in per_seed])) for k in PRDC}
                for c in per_seed[0][m]} for m in ("ours", "base")}
    fig = figure4(mean, runs.net)
    import matplotlib.pyplot as plt

    name = f"figure4-{tag}.png"
    fig.savefig(fig_dir / name, dpi=120)
    plt.close(fig)
    rows = []
    for k in PRDC:
        diffs = [mean["ours"][c][k] - mean["base"][c][k] for c in mean["ours"]]
        rows.append([f"CW {k}", str(sum(d > 0 for d in diffs)), str(sum(d == 0 for d in diffs)),
                     str(sum(d < 0 for d in diffs)), f"{min(diffs):+.3g} to {max(diffs):+.3g}"])
    return [f"![Figure 4, {tag}]({fig_dir.name}/{name})", "",
            f"ours − base per class, mean over {len(per_seed)} seed{'s' if len(per_seed) != 1 else ''}:", "",
            md_table(["metric", "classes above 0", "at 0", "below 0", "range"], rows), ""]


def figure3(client, runs: SeedRuns, fig_dir: Path, tag: str) -> list[str]:
    run_id = _child(client, runs, 0, "sampling")
    path = _download(client, run_id, "images/figure3.png") if run_id else None
    if path is None:
        return ["Figure 3 was not logged."]
    shutil.copy(path, fig_dir / f"figure3-{tag}.png")
    return [f"![Figure 3, {tag}]({fig_dir.name}/figure3-{tag}.png)", "",
            f"Seed {runs.seeds[0]}; base | scaling | ours from the same starting noise, one row per class.", ""]


def mechanism_figure(runs: SeedRuns, panels: Sequence[tuple[str, dict[str, list], bool]]):
    """One panel per (title, {label: Interval per sigma}, log y-axis): mean and 95 % band against sigma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sig = [float(s) for s in mechanism_sigmas(runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), constrained_layout=True)
    for ax, (title, rows, logy) in zip(np.atleast_1d(axes), panels, strict=True):
        for label, cells in rows.items():
            pts = [(s, c) for s, c in zip(sig, cells, strict=True) if c is not None]
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ms = np.array([c.mean for _, c in pts])
            hw = np.array([0.0 if math.isnan(c.half_width) else c.half_width for _, c in pts])
            ax.plot(xs, ms, "o-", label=label, ms=3)
            ax.fill_between(xs, ms - hw, ms + hw, alpha=0.2)
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set(xlabel="σ", title=title)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    return fig


# -- the report -------------------------------------------------------------------------------------------------------
