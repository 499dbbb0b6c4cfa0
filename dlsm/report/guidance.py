"""The guidance report: where and how strongly to guide, from the seed sweep of ``gin/digits_guidance.gin``.

    python -m dlsm.report guidance [--experiment digits_guidance] [--notes FILE] [--out docs/results/guidance.md]

It reads the latest finished sweep of the experiment (one trial = one seed) and computes, with 95 % Student-t
intervals over seeds and paired verdicts (:mod:`dlsm.report.stats`): every point's sample accuracy and class-wise
metrics, the "where does guidance matter" ablation (the scaling alpha only above / only below sigma_c, against base
and scaling), the mechanism over the whole sampled range (score errors against the Parzen oracle, held-out DLSM',
accuracy and calibration error, the fitted temperatures), and the three frontier planes with a verdict each. Nothing
is typed by hand except the ``--notes`` file, appended verbatim; figures go beside the report.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from dlsm.errors import ConfigError
from dlsm.report.common import client as mlflow_client
from dlsm.report.common import commit, figure_folder, machine, run_report, write_report
from dlsm.report.common import table as md_table
from dlsm.report.digits import FRONTIER_AXES, frontier_section, sampling_methods
from dlsm.report.digits_figures import mechanism_figure
from dlsm.report.seeds import (
    SeedRuns,
    count_sentence,
    load_seed_runs,
    mechanism_rows,
    mechanism_table,
    paired_mechanism,
    settings_table,
    wall_lines,
)
from dlsm.report.stats import mean_ci, paired_ci, verdict

__all__ = ["main", "write_guidance_report"]

SETTINGS = (
    "macro.SEED", "experiment.classifier_losses", "experiment.sampling_methods", "experiment.sampler",
    "experiment.score_model", "experiment.classifier", "macro.SCALING_ALPHA", "interval_guidance.alpha",
    "mid/interval_guidance.sigma_lo", "mid/interval_guidance.sigma_hi", "power_guidance.alpha",
    "power_guidance.power", "power_guidance.sigma_ref", "entropy_guidance.alpha", "entropy_guidance.cap",
    "temperature_guidance.alpha", "calibrate_temperature.n_points", "noise_schedule.sigma_max",
    "noise_schedule.num_scales", "noise_schedule.n_steps_each", "total_loss.lam", "score/train.n_iters",
    "classifier/train.n_iters", "sample.n_per_class", "image_metrics.k", "EvaluatorSettings.n_iters",
    "macro.MECHANISM_SIGMAS", "score_error_metrics.n_points", "heldout_metrics.n_points",
)
COLUMNS = (("acc ↑", "sample_acc"), ("CW-FID ↓", "cw/fid.{net}"), ("CW-P ↑", "cw/precision.{net}"),
           ("CW-R ↑", "cw/recall.{net}"), ("CW-C ↑", "cw/coverage.{net}"), ("FID ↓", "fid.{net}"))


def _points_table(runs: SeedRuns, methods: dict) -> str:
    """Every sampled point, after the sanity rows ``real`` (the test split scored as samples) and ``exact`` (the
    oracle's likelihood at alpha 1) where they were measured."""
    rows = []
    sanity = {n: ("—", "real data" if n == "real" else "oracle, α 1") for n in ("real", "exact")
              if runs.has(n, "sample_acc")}
    for name, (clf, a) in {**sanity, **methods}.items():
        cells = [str(runs.ci(name, key.format(net=runs.net)) or "—") for _, key in COLUMNS]
        shown = f"{a:g}" if isinstance(a, float) else a if name in sanity else f"`{a}`"
        rows.append([name, clf, shown, *cells])
    return md_table(["point", "classifier", "α / guidance", *[c for c, _ in COLUMNS]], rows)


def _ablation(runs: SeedRuns, methods: dict) -> list[str]:
    """The scaling alpha above / below sigma_c: each cut's accuracy and class-wise FID against base and scaling."""
    cuts = sorted({float(m.group(2)) for n in methods if (m := re.fullmatch(r"(above|below)([\d.]+)", n))})
    if not cuts or not {"base", "scaling"} <= set(methods):
        return ["The ablation points (`above{σ_c}`, `below{σ_c}`) were not sampled."]
    fid = f"cw/fid.{runs.net}"
    rows = []
    for c in cuts:
        for side in ("above", "below"):
            name = f"{side}{c:g}"
            if not runs.has(name, "sample_acc"):
                continue
            cells = [f"σ {'≥' if side == 'above' else '≤'} {c:g}", str(runs.ci(name, "sample_acc")),
                     str(runs.ci(name, fid))]
            for b in ("base", "scaling"):
                for key, up in (("sample_acc", True), (fid, False)):
                    d = paired_ci(runs.values(name, key), runs.values(b, key))
                    v = verdict(d, higher_is_better=up)
                    word = {"agrees": "better", "does not": "worse"}.get(v, "?")
                    cells.append(f"{d.mean:+.3g} ({word})")
            rows.append(cells)
    head = ["guided at", "acc ↑", "CW-FID ↓", "acc − base", "CW-FID − base", "acc − scaling", "CW-FID − scaling"]
    ref = [[f"every σ (scaling, α = {methods['scaling'][1]:g})", str(runs.ci("scaling", "sample_acc")),
            str(runs.ci("scaling", fid)), "", "", "—", "—"],
           ["every σ at α = 1 (base)", str(runs.ci("base", "sample_acc")), str(runs.ci("base", fid)), "—", "—", "",
            ""]]
    return [md_table(head, ref + rows), "",
            "Differences are paired over seeds (mean, then the paired 95 % verdict: better / worse / ? = cannot tell).",
            ""]


def _calibration(runs: SeedRuns, classifiers: list[str], fig_dir: Path) -> list[str]:
    """The fitted temperature and the calibration error before / after, per sigma of the schedule, per classifier."""
    keys = runs.metrics[0]
    sig = sorted({k.rsplit("/s", 1)[1] for k in keys if "/calibration/tau/s" in k}, key=float)
    if not sig:
        return ["`calibrate_temperature` was not run; no temperatures."]
    rows = []
    for s in sig:
        cells = [s]
        for clf in classifiers:
            vals = {m: [r.get(f"{clf}/calibration/{m}/s{s}") for r in runs.metrics] for m in ("tau", "ece", "ece_tau")}
            cells += [str(mean_ci(v)) if all(x is not None for x in v) else "—" for v in vals.values()]
        rows.append(cells)
    head = ["σ", *[f"{c}: {what}" for c in classifiers for what in ("τ", "ECE", "ECE at τ")]]
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
    for clf in classifiers:
        ms = [mean_ci([r[f"{clf}/calibration/tau/s{s}"] for r in runs.metrics]).mean for s in sig]
        ax.plot([float(s) for s in sig], ms, "o-", ms=3, label=clf)
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="σ", ylabel="fitted τ (> 1: the classifier is overconfident)",
           title="temperature per noise level")
    ax.legend(fontsize=8)
    fig.savefig(fig_dir / "temperature.png", dpi=120)
    plt.close(fig)
    return [f"![temperature]({fig_dir.name}/temperature.png)", "", md_table(head, rows), ""]


def _mechanism(runs: SeedRuns, methods: dict, fig_dir: Path) -> list[str]:
    alpha1 = {n: n for n in ("base", "ours") if n in methods}
    if runs.has("exact", "sample_acc") or any(k.startswith("exact/c0/D_L/") for k in runs.metrics[0]):
        alpha1["exact likelihood (oracle)"] = "exact"
    classifiers = list(dict.fromkeys(c for c, _ in methods.values()))
    d_l = mechanism_rows(runs, "D_L", alpha1, per_class=True)
    d_p = mechanism_rows(runs, "D_P", alpha1, per_class=True)
    a_star = mechanism_rows(runs, "alpha_star", {k: v for k, v in alpha1.items() if v != "exact"}, per_class=True)
    rows = {stem: mechanism_rows(runs, stem, {c: c for c in classifiers}, per_class=False)
            for stem in ("dlsm", "acc", "ece")}
    if not (d_l or rows["dlsm"]):
        return ["The mechanism metrics were not bound; nothing to show."]
    import matplotlib.pyplot as plt

    fig = mechanism_figure(runs, [("E[D_L] vs the oracle (↓)", {k: v for k, v in d_l.items() if "exact" not in k},
                                   False), ("α* (1 = right strength)", a_star, False),
                                  ("held-out accuracy (↑)", rows["acc"], False),
                                  ("held-out calibration error (↓)", rows["ece"], False)])
    fig.savefig(fig_dir / "mechanism.png", dpi=120)
    plt.close(fig)
    out = [f"![mechanism]({fig_dir.name}/mechanism.png)", "",
           "E[D_L] (distance of the likelihood score at α = 1 to the Parzen oracle's, x̃ ~ p_σ(x̃|y)):", "",
           mechanism_table(runs, d_l), "", "E[D_P] (the posterior score):", "", mechanism_table(runs, d_p), "",
           "α* (the least-squares scale onto the oracle's likelihood score; > 1: too weak):", "",
           mechanism_table(runs, a_star), "", "Held-out DLSM′:", "", mechanism_table(runs, rows["dlsm"]), "",
           "Held-out accuracy:", "", mechanism_table(runs, rows["acc"]), "",
           "Held-out expected calibration error (15 bins):", "", mechanism_table(runs, rows["ece"]), ""]
    if {"base", "ours"} <= set(methods):
        out += ["- " + count_sentence(paired_mechanism(runs, "ours", "base", "D_L", per_class=True,
                                                       higher_is_better=False), "E[D_L] of ours below base's"), ""]
    return out


def _header(runs: SeedRuns, experiment: str) -> list[str]:
    sha = commit()
    n = len(runs.metrics)
    sampler = runs.params.get("experiment.sampler", "?")
    return [
        "# Guidance: where and how strongly to guide (digits, 8 × 8)",
        "",
        f"Generated by `python -m dlsm.report guidance` (`make reproduce-guidance`) on "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from the MLflow sweep of `{experiment}`; commit "
        f"`{sha or 'unknown'}`. Machine: {machine()}. Sampler: `{sampler}`.",
        "",
        f"Every cell is a mean ± the half-width of its 95 % Student-t interval over {n} seed{'s' if n != 1 else ''} "
        f"({', '.join(map(str, runs.seeds))})"
        + ("; the seeds share one stage-1 score model and differ in the classifiers, the sampler's noise, the "
           "evaluator and the CAS network" if runs.shared_wall_s else "")
        + ". Comparisons are paired over the same seeds: *agrees* / *does not* when the paired interval lies wholly "
        f"on one side of 0, else *cannot tell*. Features: the project's evaluator (`{runs.net}`).",
        "",
        "## Wall time on this machine", "", *wall_lines(runs),
        *([f"- In all (shared stage 1 and sweep): {((runs.sweep_wall_s or 0) + (runs.shared_wall_s or 0)) / 60:.1f} "
           "min."] if runs.sweep_wall_s else []), ""]


def write_guidance_report(experiment: str, out: Path, notes: Path | None = None) -> Path:
    """Write ``out`` and its figures from the seed sweep of ``experiment``; returns ``out``."""
    client = mlflow_client()
    runs = load_seed_runs(client, experiment)
    if runs is None:
        raise ConfigError(f"no finished {experiment!r} run in the MLflow store; run `make reproduce-guidance` (or "
                          f"`python tune/sweep.py --gin gin/{experiment}.gin --param SEED --values 0 1 2 3 4 5 "
                          "--share stage1`) first")
    methods = {k: v for k, v in sampling_methods(runs).items() if runs.has(k, "sample_acc")}
    fig_dir = figure_folder(out)
    classifiers = list(dict.fromkeys(c for c, _ in methods.values()))
    lines = [*_header(runs, experiment),
             "## Every point", "", _points_table(runs, methods), "",
             "## Where does guidance matter?", "",
             "The scaling method's α only where σ ≥ σ_c, or only where σ ≤ σ_c (`interval_guidance`); outside, "
             "the prior score alone.", "", *_ablation(runs, methods),
             "## The mechanism over the whole sampled range", "", *_mechanism(runs, methods, fig_dir),
             "## Calibration: the temperature fitted per σ", "",
             "τ minimises the NLL on half the test split; the error is measured on the other half, before and "
             "after scaling (`calibrate_temperature`).", "", *_calibration(runs, classifiers, fig_dir),
             "## The frontier: does any setting beat both base and scaling?", "",
             "Goal, stated before the run: a point that beats both base and scaling on both axes of a plane, with "
             "paired 95 % intervals; or \"no setting does\", with the closest point and its margins. Circles: "
             "constant α; diamonds: schedules.", "",
             *frontier_section(runs, fig_dir, axes=FRONTIER_AXES),
             "## Settings", "", settings_table(runs, SETTINGS), ""]
    if notes is not None:
        lines += [notes.read_text().rstrip(), ""]
    return write_report(client, out, lines, fig_dir, runs.sweep_id)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dlsm.report guidance", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="digits_guidance", help="MLflow experiment of the seed sweep")
    p.add_argument("--notes", type=Path, default=None, help="markdown appended verbatim (hand-written discussion)")
    p.add_argument("--out", type=Path, default=Path("docs/results/guidance.md"))
    args = p.parse_args(argv)
    return run_report(args.notes, lambda: write_guidance_report(args.experiment, args.out, args.notes))
