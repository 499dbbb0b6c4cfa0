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
from pathlib import Path

from dlsm.errors import ConfigError
from dlsm.report.common import client as mlflow_client
from dlsm.report.common import commit, figure_folder, machine, run_report, write_report
from dlsm.report.digits_figures import figure3, figure4_mean, mechanism_figure
from dlsm.report.frontier import (
    Axis,
    closest_point,
    frontier_figure,
    frontier_points,
    frontier_table,
    parse_sampling_methods,
)
from dlsm.report.seeds import (
    PAPER,
    SANITY,
    SeedRuns,
    claim_lines,
    count_sentence,
    load_seed_runs,
    mechanism_rows,
    mechanism_table,
    paired_mechanism,
    paired_rows,
    settings_table,
    table2_rows,
    wall_lines,
)
from dlsm.report.stats import paired_ci, verdict

__all__ = ["FRONTIER_AXES", "frontier_section", "main", "sampling_methods", "write_digits_report"]

SETTINGS = (
    "macro.SEED", "experiment.classifier_losses", "experiment.sampling_methods", "experiment.score_model",
    "experiment.classifier", "experiment.sampler", "digits.size", "noise_schedule.sigma_max",
    "noise_schedule.num_scales", "noise_schedule.n_steps_each", "macro.NUM_LEVELS", "macro.SCALING_ALPHA",
    "total_loss.lam", "lam_small/total_loss.lam", "lam_large/total_loss.lam", "total_loss.weight_power",
    "score/train.n_iters", "macro.SCORE_ITERS", "score/train.batch_size", "score/train.ema_decay",
    "classifier/train.n_iters", "macro.CLASSIFIER_ITERS", "classifier/train.batch_size", "sample.n_per_class",
    "macro.N_PER_CLASS", "image_metrics.k", "EvaluatorSettings.n_iters", "EvaluatorSettings.width",
    "EvaluatorSettings.depth", "EvaluatorSettings.seed", "cas/EvaluatorSettings.n_iters",
    "image_metrics.cas_n_iters", "evaluator_network.n_iters", "evaluator_network.width", "evaluator_network.depth",
    "evaluator_network.seed",  # image_metrics.cas_n_iters, evaluator_network.*: runs made before EvaluatorSettings
    "score_error_metrics.sigmas",
    "score_error_metrics.n_points", "heldout_metrics.sigmas", "heldout_metrics.n_points", "macro.MECHANISM_SIGMAS",
)


# -- the frontier -----------------------------------------------------------------------------------------------------
def sampling_methods(runs: SeedRuns) -> dict[str, tuple[str, float | str]]:
    """``experiment.sampling_methods`` of the runs (MLflow param) with its macros resolved; a guidance schedule's
    entry is its gin reference's name (:func:`dlsm.report.frontier.parse_sampling_methods`)."""
    macros = {k.removeprefix("macro."): v for k, v in runs.params.items() if k.startswith("macro.")}
    try:
        return parse_sampling_methods(runs.params.get("experiment.sampling_methods", ""), macros)
    except ConfigError as err:
        raise ConfigError(f"{runs.experiment}: {err}") from None


FRONTIER_AXES = (
    (Axis("cw/fid.{net}", "class-wise FID", False), Axis("cw/recall.{net}", "class-wise recall", True)),
    (Axis("cw/fid.{net}", "class-wise FID", False), Axis("cw/coverage.{net}", "class-wise coverage", True)),
    (Axis("sample_acc", "sample accuracy", True), Axis("cw/recall.{net}", "class-wise recall", True)),
)


def _axis(a: Axis, net: str) -> Axis:
    return Axis(a.key.format(net=net), a.label, a.higher_is_better)


def frontier_section(runs: SeedRuns, fig_dir: Path, axes=FRONTIER_AXES) -> list[str]:
    """Each plane of ``axes`` (default :data:`FRONTIER_AXES`): its figure, its table, which points beat base and
    scaling on both axes (paired over seeds) and, when none does, the point that comes closest with its margins."""
    methods = {k: v for k, v in sampling_methods(runs).items() if k != "uncond" and runs.has(k, "sample_acc")}
    if not {"base", "scaling"} <= set(methods):
        return ["The frontier needs base and scaling among the sampled points; not drawn."]
    lines = []
    for i, (ax_x, ax_y) in enumerate(axes):
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
        if not winners and (close := closest_point(runs.metrics, pts, x, y)) is not None:
            name, margins = close
            lines += [f"Closest to beating both (largest worst-case paired margin): **{name}**; paired 95 % "
                      "intervals of " + name + " − baseline: "
                      + "; ".join(f"{a} vs {b}: {d}" for (b, a), d in margins.items()) + ".", ""]
    return lines


# -- figures --------------------------------------------------------------------------------------------------------
def _total_min(*runs: SeedRuns) -> float:
    return sum((r.sweep_wall_s or 0.0) + (r.shared_wall_s or 0.0) for r in runs) / 60


def _mechanism(runs: SeedRuns, fig_dir: Path) -> tuple[list[str], list[str]]:
    """(report lines, claim lines) of the mechanism section."""
    methods = sampling_methods(runs)
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
             "(the class's training images plus σ-noise), averaged over classes:", "", mechanism_table(runs, d_l), "",
             "E[D_P] (the posterior score, prior model included):", "", mechanism_table(runs, d_p), "",
             "α* (the least-squares scale that best maps the likelihood score onto the oracle's; > 1: too weak):",
             "", mechanism_table(runs, a_star), "",
             "Held-out DLSM′ (½ ||∇log p(y|x̃) + s(x̃) − ∇log p_σ(x̃|x)||², test split):", "",
             mechanism_table(runs, h_dlsm), "", "Held-out accuracy (test split):", "",
             mechanism_table(runs, h_acc), ""]
    claims = []
    if "ours" in methods and "base" in methods:
        claims.append("- \"The improvement comes from a more accurate likelihood score\" — "
                      + count_sentence(paired_mechanism(runs, "ours", "base", "D_L", per_class=True,
                                                          higher_is_better=False),
                                        "E[D_L] of ours (Total, λ = 1) below base's (CE)"))
        ce, tot = methods["base"][0], methods["ours"][0]
        claims.append("- " + count_sentence(paired_mechanism(runs, tot, ce, "dlsm", per_class=False,
                                                               higher_is_better=False),
                                             "Held-out DLSM′ of Total below CE's"))
        claims.append("- " + count_sentence(paired_mechanism(runs, tot, ce, "acc", per_class=False,
                                                               higher_is_better=True),
                                             "Held-out accuracy of Total above CE's"))
    return lines, claims


def _header(fr: SeedRuns, big: SeedRuns | None, frontier: str, images32: str | None) -> list[str]:
    """The report's title, provenance (time, runs, commit, machine), how to read its cells, and the wall times."""
    sha = commit()
    n = len(fr.metrics)
    return [
        "# Digits: does DLSM help on real images?",
        "",
        f"Generated by `python -m dlsm.report digits` (`make reproduce-digits`) on "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from the MLflow sweeps of `{frontier}`"
        + (f" and `{images32}`" if big else "") + f"; commit `{sha or 'unknown'}`. "
        f"Machine: {machine()}.",
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
        *wall_lines(fr),
        *(wall_lines(big) if big else []),
        *([f"- Both sweeps, shared stages included: {_total_min(fr, big):.1f} min."]
          if big and fr.sweep_wall_s and big.sweep_wall_s else []),
        ""]


def _table2_section(runs: SeedRuns) -> list[str]:
    """Table 2 (sanity rows and the paper's methods) and the paired ours − base and scaling − base differences."""
    return [table2_rows(runs, (*SANITY, *PAPER)), "", "ours − base, paired over seeds:", "",
            paired_rows(runs, "ours", "base")[0], "", "scaling − base, paired over seeds:", "",
            paired_rows(runs, "scaling", "base")[0], ""]


def write_digits_report(frontier: str, images32: str | None, out: Path, notes: Path | None = None) -> Path:
    """Write ``out`` and its figures from the seed sweeps of the two experiments; returns ``out``."""
    client = mlflow_client()
    fr = load_seed_runs(client, frontier)
    if fr is None:
        raise ConfigError(f"no finished {frontier!r} run in the MLflow store; run `make reproduce-digits` (or "
                          f"`python tune/sweep.py --gin gin/{frontier}.gin --param SEED --values 0 1 2 "
                          "--share none`) first")
    big = load_seed_runs(client, images32) if images32 else None
    fig_dir = figure_folder(out)
    lines = [
        *_header(fr, big, frontier, images32),
        "## Table 2 on 8 × 8 digits (`gin/digits_frontier.gin`: `gin/digits.gin` plus the frontier's points)",
        "",
        "`real`: the real test split scored as samples (floor of FID/KID, ceiling of the rest); `uncond`: the prior "
        "score alone (α = 0); `exact`: the prior model plus the Parzen oracle's exact likelihood of the training "
        "set at α = 1 (what a perfect classifier buys with this sampler).",
        "",
        *_table2_section(fr),
    ]
    if big is not None:
        lines += ["## Table 2 on 32 × 32 digits (`gin/digits32.gin`: the CIFAR-10 networks, narrowed)", "",
                  f"{len(big.metrics)} seeds ({', '.join(map(str, big.seeds))})"
                  + ("; the seeds share one stage-1 score model (`--share stage1`) and differ in everything after "
                     "it" if big.shared_wall_s else "") + ".", "", *_table2_section(big)]
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
    lines += ["## Settings", "", f"`{frontier}`:", "", settings_table(fr, SETTINGS), ""]
    if big is not None:
        lines += [f"`{images32}`:", "", settings_table(big, SETTINGS), ""]
    if notes is not None:
        lines += [notes.read_text().rstrip(), ""]
    return write_report(client, out, lines, fig_dir, fr.sweep_id)


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
