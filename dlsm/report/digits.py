"""The digits report (DLSM paper Table 2, Figures 3 and 4, the mechanism and the (lambda, alpha) frontier on
scikit-learn's handwritten digits) generated from the seed sweeps in MLflow.

    python -m dlsm.report digits [--frontier digits_frontier] [--images32 digits32] [--notes FILE]
                                 [--out docs/results/digits.md]

``--frontier`` is the experiment of ``tune/sweep.py --gin gin/digits_frontier.gin --param SEED ...`` (8 x 8 digits:
base, scaling, ours, every (classifier loss, lambda, alpha) point, the sanity rows, the score errors against the
Parzen oracle); ``--images32`` that of the same sweep over ``gin/digits32.gin`` (32 x 32, the CIFAR networks). The
latest finished sweep run of each is read, one trial = one seed; an experiment with no sweep is read as its latest
finished run (one seed). Every number is a mean with its 95 % Student-t interval over seeds (:mod:`dlsm.report.stats`),
every comparison a paired interval over the same seeds with its verdict; nothing is typed by hand except the
optional ``--notes`` file, appended verbatim. Figures are written beside the report (``<out stem>/*.png``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlsm.errors import ConfigError
from dlsm.eval.images import PRDC, TABLE2_COLUMNS, figure4
from dlsm.report.common import client as mlflow_client
from dlsm.report.common import run_report
from dlsm.report.common import table as md_table
from dlsm.report.frontier import Axis, frontier_figure, frontier_points, frontier_table
from dlsm.report.stats import Interval, mean_ci, paired_ci, verdict

__all__ = ["SeedRuns", "claim_lines", "mechanism_rows", "paired_rows", "table2_rows", "write_digits_report"]

SANITY = ("real", "uncond", "exact")
PAPER = ("base", "scaling", "ours")
# the paper's claims on CIFAR (Table 2, Sections 5.2-5.3): metric key -> higher is better
OURS_VS_BASE = ("fid", "is", "cas", "cw/fid", "cw/precision", "cw/recall", "cw/density", "cw/coverage")
SCALING_UP = ("precision", "density")
SCALING_DOWN = ("recall", "coverage")
SETTINGS = (
    "macro.SEED", "experiment.classifier_losses", "experiment.sampling_methods", "experiment.score_model",
    "experiment.classifier", "experiment.sampler", "digits.size", "noise_schedule.sigma_max",
    "noise_schedule.num_scales", "noise_schedule.n_steps_each", "macro.NUM_LEVELS", "macro.SCALING_ALPHA",
    "total_loss.lam", "lam_small/total_loss.lam", "lam_large/total_loss.lam", "total_loss.weight_power",
    "score/train.n_iters", "macro.SCORE_ITERS", "score/train.batch_size", "score/train.ema_decay",
    "classifier/train.n_iters", "macro.CLASSIFIER_ITERS", "classifier/train.batch_size", "sample.n_per_class",
    "macro.N_PER_CLASS", "image_metrics.k", "image_metrics.cas_n_iters", "evaluator_network.n_iters",
    "evaluator_network.width", "evaluator_network.depth", "evaluator_network.seed", "score_error_metrics.sigmas",
    "score_error_metrics.n_points", "heldout_metrics.sigmas", "heldout_metrics.n_points", "macro.MECHANISM_SIGMAS",
)


def _higher_is_better(key: str) -> bool:
    """Direction of a Table-2 metric key (``fid``, ``cw/recall``, ``cas``, ``sample_acc`` ...)."""
    stem = key.split(".")[0].removeprefix("cw/")
    return stem not in ("fid", "kid")


@dataclass
class SeedRuns:
    """One experiment's seed runs: their final metrics (in seed order), params, ids and wall times."""

    experiment: str
    seeds: list[int]
    metrics: list[dict[str, float]]
    params: dict[str, str]
    run_ids: list[str]
    wall_s: list[float]
    sweep_id: str | None = None
    sweep_wall_s: float | None = None
    sweep_metrics: dict[str, float] = field(default_factory=dict)
    shared_wall_s: float | None = None  # a shared stage-1 run (--share stage1), if any

    @property
    def net(self) -> str:
        """The feature network of the Table-2 metrics: Inception when it was bound, else the evaluator."""
        keys = self.metrics[0] if self.metrics else {}
        return "inception" if any(k.endswith(".inception") for k in keys) else "evaluator"

    def has(self, method: str, key: str) -> bool:
        return all(f"{method}/{key}" in m for m in self.metrics)

    def values(self, method: str, key: str) -> list[float]:
        return [float(m[f"{method}/{key}"]) for m in self.metrics]

    def ci(self, method: str, key: str) -> Interval | None:
        return mean_ci(self.values(method, key)) if self.has(method, key) else None


def load_seed_runs(client, experiment: str) -> SeedRuns | None:
    """The trials of the latest finished sweep of ``experiment`` (else its latest finished run), or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    sweeps = client.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'sweep' and "
                                "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                                max_results=1)
    sweep = sweeps[0] if sweeps else None
    if sweep is not None:
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                  f"'{sweep.info.run_id}' and tags.`dlsm.kind` = 'parent' and "
                                  "attributes.status = 'FINISHED'")
    else:
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent' and "
                                  "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                                  max_results=1)
    if not runs:
        return None
    runs = sorted(runs, key=lambda r: int(r.data.params.get("macro.SEED", r.data.params.get("experiment.seed", 0))))
    shared = None
    for key in ("sweep.shared.0",):
        m = re.search(r"'(\w+)'", sweep.data.params.get(key, "")) if sweep is not None else None
        if m:
            shared_run = client.get_run(m.group(1))
            shared = (shared_run.info.end_time - shared_run.info.start_time) / 1000
    return SeedRuns(
        experiment=experiment,
        seeds=[int(r.data.params.get("macro.SEED", r.data.params.get("experiment.seed", 0))) for r in runs],
        metrics=[dict(r.data.metrics) for r in runs], params=dict(runs[0].data.params),
        run_ids=[r.info.run_id for r in runs], wall_s=[(r.info.end_time - r.info.start_time) / 1000 for r in runs],
        sweep_id=sweep.info.run_id if sweep is not None else None,
        sweep_wall_s=(sweep.info.end_time - sweep.info.start_time) / 1000 if sweep is not None else None,
        sweep_metrics=dict(sweep.data.metrics) if sweep is not None else {}, shared_wall_s=shared,
    )


# -- tables ---------------------------------------------------------------------------------------------------------
def _columns(runs: SeedRuns) -> list[tuple[str, str]]:
    """(label with arrow, metric key) of every Table-2 column the runs have."""
    net = runs.net
    cols = [(f"{label} {'↓' if arrow == 'down' else '↑'}", f"{key}.{net}") for label, key, arrow in TABLE2_COLUMNS]
    cols += [("CAS ↑", "cas"), ("acc ↑", "sample_acc")]
    return [(label, key) for label, key in cols if any(runs.has(m, key) for m in (*SANITY, *PAPER))]


def table2_rows(runs: SeedRuns, methods: Sequence[str]) -> str:
    """The paper's Table 2 with every cell a mean ± 95 % half-width over the seeds."""
    cols = _columns(runs)
    rows = []
    for m in methods:
        if not any(runs.has(m, key) for _, key in cols):
            continue
        rows.append([m] + [str(runs.ci(m, key)) if runs.has(m, key) else "—" for _, key in cols])
    return md_table(["method", *[label for label, _ in cols]], rows)


def paired_rows(runs: SeedRuns, a: str, b: str) -> tuple[str, dict[str, tuple[str, Interval]]]:
    """Per metric: each seed's a - b, their mean ± 95 % interval, and whether a is better (paired verdict)."""
    out: dict[str, tuple[str, Interval]] = {}
    rows = []
    for label, key in _columns(runs):
        if not (runs.has(a, key) and runs.has(b, key)):
            continue
        diff = paired_ci(runs.values(a, key), runs.values(b, key))
        v = verdict(diff, higher_is_better=_higher_is_better(key))
        out[key] = (v, diff)
        per_seed = ", ".join(f"{x - y:+.3g}" for x, y in zip(runs.values(a, key), runs.values(b, key), strict=True))
        rows.append([label, per_seed, str(diff), v])
    return md_table(["metric", f"{a} − {b} per seed", "mean ± 95 % CI", f"{a} better?"], rows), out


def _mean_over_classes(metrics: Mapping[str, float], method: str, stem: str, sigma: str) -> float | None:
    vals = [v for k, v in metrics.items() if re.fullmatch(rf"{re.escape(method)}/c\d+/{stem}/s{re.escape(sigma)}", k)]
    return float(np.mean(vals)) if vals else None


def mechanism_sigmas(runs: SeedRuns) -> list[str]:
    found = {k.rsplit("/s", 1)[1] for k in runs.metrics[0] if "/D_L/s" in k or "/heldout/dlsm/s" in k}
    return sorted(found, key=float)


def mechanism_rows(runs: SeedRuns, stem: str, names: Mapping[str, str], *, per_class: bool) -> dict[str, list]:
    """{label: [Interval or None per sigma]} of a class-averaged score error (``per_class``: keys
    ``{method}/c{k}/{stem}/s{sigma}``) or of a held-out classifier metric (``{clf}/heldout/{stem}/s{sigma}``)."""
    out: dict[str, list] = {}
    for label, name in names.items():
        cells = []
        for s in mechanism_sigmas(runs):
            if per_class:
                vals = [_mean_over_classes(m, name, stem, s) for m in runs.metrics]
            else:
                vals = [m.get(f"{name}/heldout/{stem}/s{s}") for m in runs.metrics]
            cells.append(mean_ci(vals) if all(v is not None for v in vals) else None)
        if any(c is not None for c in cells):
            out[label] = cells
    return out


def _mechanism_table(runs: SeedRuns, rows: dict[str, list]) -> str:
    sig = mechanism_sigmas(runs)
    return md_table(["", *[f"σ = {s}" for s in sig]], [[k] + [str(c) if c is not None else "—" for c in v]
                                                      for k, v in rows.items()])


def _paired_mechanism(runs: SeedRuns, a: str, b: str, stem: str, *, per_class: bool,
                      higher_is_better: bool) -> list[tuple[str, str, Interval]]:
    """Per sigma: (sigma, verdict that a is better than b, paired interval of a - b)."""
    out = []
    for s in mechanism_sigmas(runs):
        if per_class:
            va = [_mean_over_classes(m, a, stem, s) for m in runs.metrics]
            vb = [_mean_over_classes(m, b, stem, s) for m in runs.metrics]
        else:
            va = [m.get(f"{a}/heldout/{stem}/s{s}") for m in runs.metrics]
            vb = [m.get(f"{b}/heldout/{stem}/s{s}") for m in runs.metrics]
        if any(v is None for v in (*va, *vb)):
            continue
        d = paired_ci(va, vb)
        out.append((s, verdict(d, higher_is_better=higher_is_better), d))
    return out


def _count_sentence(results: list[tuple[str, str, Interval]], what: str) -> str:
    if not results:
        return f"{what}: not measured."
    counts = {v: sum(1 for _, x, _ in results if x == v) for v in ("agrees", "does not",
                                                                      "cannot tell at this sample size")}
    where = ", ".join(f"σ = {s}: {d} ({'yes' if v == 'agrees' else 'no' if v == 'does not' else '?'})"
                      for s, v, d in results)
    overall = ("**agrees**" if counts["agrees"] == len(results) else "**does not**" if counts["does not"]
               == len(results) else "**agrees at some σ**" if counts["agrees"] and not counts["does not"]
               else "**mixed**" if counts["agrees"] else "**does not at some σ**" if counts["does not"]
               else "**cannot tell at this sample size**")
    return (f"{what}: {overall} — better at {counts['agrees']} of {len(results)} σ, worse at {counts['does not']}, "
            f"cannot tell at {counts['cannot tell at this sample size']} (paired 95 % intervals: {where}).")


def _overall(agree: int, disagree: int, n: int) -> str:
    """A claim over n metrics from its per-metric verdicts."""
    unsure = n - agree - disagree
    if agree == n:
        return "**agrees**"
    if disagree == n:
        return "**does not**"
    if not agree and not disagree:
        return "**cannot tell at this sample size**"
    if agree and disagree:
        return f"**mixed** (agrees on {agree} of {n}, opposite on {disagree})"
    if agree:
        return f"**agrees on {agree} of {n} metrics, cannot tell on {unsure}**"
    return f"**does not on {disagree} of {n} metrics, cannot tell on {unsure}**"


def claim_lines(runs: SeedRuns, label: str) -> list[str]:
    """The paper's Table-2 claims as sentences computed from the paired intervals over ``runs``' seeds."""
    net, lines = runs.net, []
    if not all(runs.has(m, f"fid.{net}") for m in PAPER):
        return [f"- *{label}*: base, scaling and ours were not all sampled; no claim checked."]
    n = len(runs.metrics)
    res = []
    for key in OURS_VS_BASE:
        k = key if key == "cas" else f"{key}.{net}"
        if runs.has("ours", k) and runs.has("base", k):
            d = paired_ci(runs.values("ours", k), runs.values("base", k))
            res.append((key, verdict(d, higher_is_better=_higher_is_better(k)), d))
    better = [k for k, v, _ in res if v == "agrees"]
    worse = [k for k, v, _ in res if v == "does not"]
    word = _overall(len(better), len(worse), len(res))
    detail = "; ".join(f"{k} {d}" for k, _, d in res)
    lines.append(f"- *{label}*, \"ours beats base on FID, IS, CAS and the class-wise metrics\": {word} "
                 f"({n} seed{'s' if n != 1 else ''}; better on {len(better)} of {len(res)}: "
                 f"{', '.join(better) or 'none'}; worse on: {', '.join(worse) or 'none'}). ours − base: {detail}.")
    res2 = []
    for key, up in [*((k, True) for k in SCALING_UP), *((k, False) for k in SCALING_DOWN)]:
        k = f"{key}.{net}"
        if runs.has("scaling", k):
            d = paired_ci(runs.values("scaling", k), runs.values("base", k))
            res2.append((key, up, verdict(d, higher_is_better=up), d))
    hold = [k for k, _, v, _ in res2 if v == "agrees"]
    fail = [k for k, _, v, _ in res2 if v == "does not"]
    word2 = _overall(len(hold), len(fail), len(res2))
    detail2 = "; ".join(f"{k} {d}" for k, _, _, d in res2)
    lines.append(f"- *{label}*, \"scaling raises precision and density but lowers recall and coverage\" "
                 f"(scaling − base, paired): {word2} (as claimed on: {', '.join(hold) or 'none'}; opposite on: "
                 f"{', '.join(fail) or 'none'}). scaling − base: {detail2}.")
    return lines


# -- the frontier -----------------------------------------------------------------------------------------------------
def _sampling_methods(runs: SeedRuns) -> dict[str, tuple[str, float]]:
    """``experiment.sampling_methods`` of the runs (MLflow param, a Python literal with %SCALING_ALPHA resolved)."""
    import ast

    text = runs.params.get("experiment.sampling_methods", "")
    alpha = runs.params.get("macro.SCALING_ALPHA", "10.0")
    text = text.replace("%SCALING_ALPHA", alpha)
    try:
        spec = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{runs.experiment}: cannot read experiment.sampling_methods {text[:80]!r}") from None
    return {k: (str(v[0]), float(v[1])) for k, v in spec.items()}


FRONTIER_AXES = (
    (Axis("cw/fid.{net}", "class-wise FID", False), Axis("cw/recall.{net}", "class-wise recall", True)),
    (Axis("cw/fid.{net}", "class-wise FID", False), Axis("cw/coverage.{net}", "class-wise coverage", True)),
    (Axis("sample_acc", "sample accuracy", True), Axis("cw/recall.{net}", "class-wise recall", True)),
)


def _axis(a: Axis, net: str) -> Axis:
    return Axis(a.key.format(net=net), a.label, a.higher_is_better)


def frontier_section(runs: SeedRuns, fig_dir: Path) -> list[str]:
    methods = {k: v for k, v in _sampling_methods(runs).items() if k != "uncond" and runs.has(k, "sample_acc")}
    if not {"base", "scaling"} <= set(methods):
        return ["The frontier needs base and scaling among the sampled points; not drawn."]
    lines = []
    for i, (ax_x, ax_y) in enumerate(FRONTIER_AXES):
        x, y = _axis(ax_x, runs.net), _axis(ax_y, runs.net)
        if not all(runs.has(m, x.key) and runs.has(m, y.key) for m in methods):
            continue
        pts = frontier_points(runs.metrics, methods, x, y)
        fig = frontier_figure(pts, x, y)
        name = f"frontier-{i + 1}.png"
        fig.savefig(fig_dir / name, dpi=120)
        import matplotlib.pyplot as plt

        plt.close(fig)
        table = frontier_table(runs.metrics, pts, x, y)
        rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in table.splitlines()[2:]]
        winners = [r[0].split(" ")[0] for r in rows if "(beats all)" in r[0]]
        beat = {b: [r[0] for r in rows if r[-2 + i] == "yes"] for i, b in enumerate(("base", "scaling"))}
        lines += [f"### {y.label} against {x.label}", "", f"![frontier {i + 1}]({fig_dir.name}/{name})", "",
                  table, "",
                  (f"**Beats both base and scaling on both axes (paired 95 % intervals over {len(runs.metrics)} "
                   f"seeds): {', '.join(winners)}.**" if winners else
                   f"**No point beats both base and scaling on both axes** (paired 95 % intervals over "
                   f"{len(runs.metrics)} seed{'s' if len(runs.metrics) != 1 else ''})."),
                  f"Points that beat base on both axes: {len(beat['base'])} of {len(rows) - 1} "
                  f"({', '.join(beat['base']) or 'none'}); that beat scaling on both: {len(beat['scaling'])} of "
                  f"{len(rows) - 1} ({', '.join(beat['scaling']) or 'none'}).", ""]
    return lines


# -- figures --------------------------------------------------------------------------------------------------------
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
def _wall(runs: SeedRuns) -> list[str]:
    times: dict[str, list[float]] = {}
    for m in runs.metrics:
        for k, v in m.items():
            if k.startswith("time/"):
                times.setdefault(k.removeprefix("time/").removesuffix("_s"), []).append(v)
    parts = ", ".join(f"{k} {np.mean(v):.0f} s" for k, v in sorted(times.items(), key=lambda kv: -np.mean(kv[1])))
    out = [f"- **{runs.experiment}**: "
           + (f"shared stage 1 {runs.shared_wall_s / 60:.1f} min, then " if runs.shared_wall_s else "")
           + (f"sweep {runs.sweep_wall_s / 60:.1f} min (run `{runs.sweep_id}`); " if runs.sweep_wall_s else "")
           + f"{len(runs.wall_s)} seed run{'s' if len(runs.wall_s) != 1 else ''} of "
           + ", ".join(f"{w / 60:.1f}" for w in runs.wall_s) + " min.",
           f"  Mean per seed run, by stage (longest first): {parts}."]
    return out


def _total_min(*runs: SeedRuns) -> float:
    return sum((r.sweep_wall_s or 0.0) + (r.shared_wall_s or 0.0) for r in runs) / 60


def _settings(runs: SeedRuns) -> str:
    """The main bindings (a macro shown with its value) and the noise schedule as built (``schedule.*``)."""
    rows = []
    for k in SETTINGS:
        if k not in runs.params:
            continue
        v = runs.params[k]
        if v.startswith("%") and f"macro.{v[1:]}" in runs.params:
            v = f"{v} = {runs.params[f'macro.{v[1:]}']}"
        rows.append([f"`{k}`", f"`{v[:200]}`"])
    rows += [[f"`{k}`", f"`{v}`"] for k, v in sorted(runs.params.items()) if k.startswith("schedule.")]
    return md_table(["binding", "value"], rows)


def _mechanism(runs: SeedRuns, fig_dir: Path) -> tuple[list[str], list[str]]:
    """(report lines, claim lines) of the mechanism section."""
    methods = _sampling_methods(runs)
    alpha1 = {f"{clf} (as {name})": name for name, (clf, a) in methods.items() if a == 1.0
              and name != "uncond" and any(f"{name}/c0/D_L/s" in k for k in runs.metrics[0])}
    if any("exact/c0/D_L/s" in k for k in runs.metrics[0]):
        alpha1["exact likelihood (oracle)"] = "exact"
    classifiers = {clf: clf for clf in dict.fromkeys(c for c, _ in methods.values())}
    d_l = mechanism_rows(runs, "D_L", alpha1, per_class=True)
    d_p = mechanism_rows(runs, "D_P", alpha1, per_class=True)
    a_star = mechanism_rows(runs, "alpha_star", {k: v for k, v in alpha1.items() if v != "exact"}, per_class=True)
    h_dlsm = mechanism_rows(runs, "dlsm", classifiers, per_class=False)
    h_acc = mechanism_rows(runs, "acc", classifiers, per_class=False)
    if not (d_l or h_dlsm):
        return ["The mechanism metrics (score_error_metrics, heldout_metrics) were not bound; nothing to show."], []
    fig = mechanism_figure(runs, [("E[D_L] vs the Parzen oracle (↓)", {k: v for k, v in d_l.items()
                                                                      if "exact" not in k}, False),
                                  ("held-out DLSM′ (↓)", h_dlsm, True), ("held-out accuracy (↑)", h_acc, False),
                                  ("α* (1 = right strength)", a_star, False)])
    import matplotlib.pyplot as plt

    fig.savefig(fig_dir / "mechanism.png", dpi=120)
    plt.close(fig)
    lines = ["![mechanism](" + fig_dir.name + "/mechanism.png)", "",
             "E[D_L]: mean distance of the method's likelihood score to the Parzen oracle's, over x̃ ~ p_σ(x̃|y) "
             "(the class's training images plus σ-noise), averaged over classes:", "", _mechanism_table(runs, d_l), "",
             "E[D_P] (the posterior score, prior model included):", "", _mechanism_table(runs, d_p), "",
             "α* (the least-squares scale that best maps the likelihood score onto the oracle's; > 1: too weak):",
             "", _mechanism_table(runs, a_star), "",
             "Held-out DLSM′ (½ ||∇log p(y|x̃) + s(x̃) − ∇log p_σ(x̃|x)||², test split):", "",
             _mechanism_table(runs, h_dlsm), "", "Held-out accuracy (test split):", "",
             _mechanism_table(runs, h_acc), ""]
    claims = []
    if "ours" in methods and "base" in methods:
        claims.append("- \"The improvement comes from a more accurate likelihood score\" — "
                      + _count_sentence(_paired_mechanism(runs, "ours", "base", "D_L", per_class=True,
                                                          higher_is_better=False),
                                        "E[D_L] of ours (Total, λ = 1) below base's (CE)"))
        ce, tot = methods["base"][0], methods["ours"][0]
        claims.append("- " + _count_sentence(_paired_mechanism(runs, tot, ce, "dlsm", per_class=False,
                                                               higher_is_better=False),
                                             "Held-out DLSM′ of Total below CE's"))
        claims.append("- " + _count_sentence(_paired_mechanism(runs, tot, ce, "acc", per_class=False,
                                                               higher_is_better=True),
                                             "Held-out accuracy of Total above CE's"))
    return lines, claims


def write_digits_report(frontier: str, images32: str | None, out: Path, notes: Path | None = None) -> Path:
    """Write ``out`` and its figures from the seed sweeps of the two experiments; returns ``out``."""
    client = mlflow_client()
    fr = load_seed_runs(client, frontier)
    if fr is None:
        raise ConfigError(f"no finished {frontier!r} run in the MLflow store; run `make reproduce-digits` (or "
                          f"`python tune/sweep.py --gin gin/{frontier}.gin --param SEED --values 0 1 2 "
                          "--share none`) first")
    big = load_seed_runs(client, images32) if images32 else None
    fig_dir = out.parent / out.stem
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    fig_dir.mkdir(parents=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    import torch

    n = len(fr.metrics)
    lines = [
        "# Digits: does DLSM help on real images?",
        "",
        f"Generated by `python -m dlsm.report digits` (`make reproduce-digits`) on "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from the MLflow sweeps of `{frontier}`"
        + (f" and `{images32}`" if big else "") + f"; commit `{commit or 'unknown'}`. "
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}.",
        "",
        f"Every cell is a mean ± the half-width of its 95 % Student-t interval over {n} seed"
        f"{'s' if n != 1 else ''} ({', '.join(map(str, fr.seeds))}); a seed changes every network's initialisation, "
        "the batches, the sampler's noise, the evaluator and the CAS network; the train/test split stays fixed. "
        "Comparisons are paired over the same seeds; a verdict is *agrees* / *does not* when the paired interval "
        "lies wholly on one side of 0, else *cannot tell at this sample size*. Metrics use the project's evaluator "
        f"classifier's features (`{fr.net}`; no Inception weights offline), k = "
        f"{fr.params.get('image_metrics.k', '5')}.",
        "",
        "## Wall time on this machine",
        "",
        *_wall(fr),
        *(_wall(big) if big else []),
        *([f"- Both sweeps, shared stages included: {_total_min(fr, big):.1f} min."]
          if big and fr.sweep_wall_s and big.sweep_wall_s else []),
        "",
        "## Table 2 on 8 × 8 digits (`gin/digits_frontier.gin`: `gin/digits.gin` plus the frontier's points)",
        "",
        "`real`: the real test split scored as samples (floor of FID/KID, ceiling of the rest); `uncond`: the prior "
        "score alone (α = 0); `exact`: the prior model plus the Parzen oracle's exact likelihood of the training "
        "set at α = 1 (what a perfect classifier buys with this sampler).",
        "",
        table2_rows(fr, (*SANITY, *PAPER)),
        "",
        "ours − base, paired over seeds:",
        "",
        paired_rows(fr, "ours", "base")[0],
        "",
        "scaling − base, paired over seeds:",
        "",
        paired_rows(fr, "scaling", "base")[0],
        "",
    ]
    if big is not None:
        lines += ["## Table 2 on 32 × 32 digits (`gin/digits32.gin`: the CIFAR-10 networks, narrowed)", "",
                  f"{len(big.metrics)} seeds ({', '.join(map(str, big.seeds))})"
                  + ("; the seeds share one stage-1 score model (`--share stage1`) and differ in everything after "
                     "it" if big.shared_wall_s else "") + ".", "",
                  table2_rows(big, (*SANITY, *PAPER)), "", "ours − base, paired over seeds:", "",
                  paired_rows(big, "ours", "base")[0], "", "scaling − base, paired over seeds:", "",
                  paired_rows(big, "scaling", "base")[0], ""]
    else:
        lines += ["## Table 2 on 32 × 32 digits", "", f"No finished `{images32}` run; not reported." if images32
                  else "Not requested (`--images32 ''`).", ""]
    lines += ["## Figure 3: base | scaling | ours", "", "8 × 8:", "", *figure3(client, fr, fig_dir, "digits8")]
    if big is not None:
        lines += ["32 × 32:", "", *figure3(client, big, fig_dir, "digits32")]
    lines += ["## Figure 4: class-wise ours − base", "", "8 × 8:", "", *figure4_mean(client, fr, fig_dir, "digits8")]
    if big is not None:
        lines += ["32 × 32:", "", *figure4_mean(client, big, fig_dir, "digits32")]
    mech_lines, mech_claims = _mechanism(fr, fig_dir)
    lines += ["## The mechanism: is Total's likelihood score closer to the oracle's?", "", *mech_lines]
    lines += ["## The (λ, α) frontier", "",
              "Every (classifier loss, λ, α) point of `gin/digits_frontier.gin`, mean ± 95 % interval over seeds; "
              "base, scaling and ours circled. \"Beats\" = the paired interval of point − baseline lies wholly on "
              "the better side of 0 on both axes. The MLflow UI shows the same points as the runs tagged "
              "`dlsm.kind = 'point'` (params `classifier`, `lam`, `alpha`, `seed`).", "",
              *frontier_section(fr, fig_dir)]
    lines += ["## The paper's claims, checked against these numbers", "", *claim_lines(fr, "8 × 8 digits")]
    if big is not None:
        lines += claim_lines(big, "32 × 32 digits")
    lines += [*mech_claims, ""]
    if fr.has("exact", "sample_acc") and fr.has("base", "sample_acc"):
        d = paired_ci(fr.values("exact", "sample_acc"), fr.values("base", "sample_acc"))
        word = {"agrees": "**higher**", "does not": "**lower**"}.get(verdict(d), "**not clearly different**")
        lines += [f"- Sanity (a perfect classifier): sample accuracy with the exact likelihood at α = 1 is "
                  f"{fr.ci('exact', 'sample_acc')} against base's {fr.ci('base', 'sample_acc')} (paired difference "
                  f"{d}): {word}.", ""]
    lines += ["## Settings", "", f"`{frontier}`:", "", _settings(fr), ""]
    if big is not None:
        lines += [f"`{images32}`:", "", _settings(big), ""]
    if notes is not None:
        lines += [notes.read_text().rstrip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    if fr.sweep_id:  # the MLflow UI shows the frontier and the report beside the sweep's runs
        for png in sorted(fig_dir.glob("*.png")):
            client.log_artifact(fr.sweep_id, str(png), "report")
        client.log_artifact(fr.sweep_id, str(out), "report")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dlsm.report digits", description=__doc__.splitlines()[0])
    p.add_argument("--frontier", default="digits_frontier", help="MLflow experiment of the 8x8 seed sweep")
    p.add_argument("--images32", default="digits32", help="MLflow experiment of the 32x32 seed sweep ('' for none)")
    p.add_argument("--notes", type=Path, default=None, help="markdown appended verbatim (hand-written discussion)")
    p.add_argument("--out", type=Path, default=Path("docs/results/digits.md"))
    args = p.parse_args(argv)
    return run_report(args.notes, lambda: write_digits_report(args.frontier, args.images32 or None, args.out,
                                                              args.notes))
