"""The moons report (DLSM paper Table 1, Figures 1 and 5) generated from MLflow runs.

    python -m dlsm.report [--table1 moons_table1] [--ablation moons_ablation] [--notes FILE]
                          [--out docs/results/moons.md]

Reads the latest finished parent run of each experiment from the tracking store (``./mlruns`` or
``MLFLOW_TRACKING_URI``), copies its figures next to the report, and writes markdown: the settings,
this machine's wall times, Table 1 per classifier shape, the score errors at every evaluated sigma,
the Figure-5 numbers, and a check of each of the paper's claims computed from those numbers.
Nothing in the report is typed by hand except the optional ``--notes`` file, appended verbatim.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
from pathlib import Path

import numpy as np

from dlsm.errors import ConfigError
from dlsm.report.common import client as mlflow_client
from dlsm.report.common import commit, machine, run_report
from dlsm.report.common import table as md_table
from dlsm.report.plots import PAPER_LABELS, curve_band, paper_order
from dlsm.stages.base import method_key

__all__ = ["main", "write_report"]

SETTINGS = (
    "SEED", "SIGMA_MIN", "SIGMA_MAX", "NUM_SCALES", "STEPS_PER_SCALE", "LANGEVIN_EPS", "LAM", "SCALING_ALPHA",
    "DLSM_WEIGHT", "BURN_IN", "SIGMA_DATA", "EVAL_SIGMAS", "N_SEEDS", "TRACK_SIGMAS",
    "schedule.sigma_max", "schedule.sigma_min", "schedule.num_scales", "schedule.eps", "schedule.n_steps_each",
    "experiment.classifier", "experiment.classifier_losses", "experiment.sampling_methods", "experiment.sampler",
    "sample.n_per_class", "two_moons.n", "two_moons.scale", "dsm_loss.weight_power", "total_loss.lam",
    "total_loss.weight_power", "dlsm_loss.weight_power", "ce_loss.weight_power", "score/train.n_iters",
    "score/train.batch_size", "score/torch.optim.Adam.lr", "classifier/train.n_iters",
    "classifier/train.batch_size", "classifier/torch.optim.Adam.lr", "classifier/train.ema_decay",
    "classifier/train.eval_every", "ScoreMLP.hidden", "ScoreMLP.depth", "ClassifierMLP.hidden",
    "ClassifierMLP.depth", "BranchClassifier.x_widths", "BranchClassifier.sigma_widths",
    "sample_metrics.k", "score_error_metrics.n_points",
)


class _Run:
    """A finished parent run with its children, metrics and params."""

    def __init__(self, client, experiment: str) -> None:
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ConfigError(f"no finished {experiment!r} run in the MLflow store; run "
                              f"`python -m dlsm.launch --gin gin/{experiment}.gin` first")
        self.client, self.run = client, runs[0]
        self.params, self.metrics = self.run.data.params, self.run.data.metrics
        kids = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{self.run.info.run_id}'")
        self.children = {r.data.tags["dlsm.stage"]: r for r in kids}
        self.wall_s = (self.run.info.end_time - self.run.info.start_time) / 1000

    def shapes(self) -> list[str]:
        spec = self.params.get("experiment.classifier", "")
        found = re.findall(r"'(\w+)'\s*:", spec)
        return found or [""]

    def copy_artifact(self, run_id: str, path: str, dst: Path) -> Path | None:
        import mlflow

        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        tracking_uri=self.client.tracking_uri)
        except Exception:
            return None
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, dst)
        return dst

    def history(self, stage: str, key: str) -> list[tuple[int, float]]:
        run = self.children.get(stage)
        if run is None:
            return []
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run.info.run_id, key))


def _fmt(v: float | None) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _sigmas(metrics: dict[str, float], stem: str) -> list[str]:
    found = {k.rsplit("/s", 1)[1] for k in metrics if f"/{stem}/s" in k}
    return sorted(found, key=float)


def _settings(run: _Run) -> str:
    rows = []
    for k in SETTINGS:
        v = run.params.get(k, run.params.get(f"macro.{k}"))
        if v is not None:
            rows.append([f"`{k}`", f"`{v}`"])
    return md_table(["binding", "value"], rows)


def _wall(run: _Run, label: str) -> list[str]:
    parts = [f"{k.removeprefix('time/').removesuffix('_s')} {v:.0f} s"
             for k, v in sorted(run.metrics.items()) if k.startswith("time/")]
    return [f"- **{label}**: {run.wall_s / 60:.1f} min in all (run `{run.run.info.run_id}`); " + ", ".join(parts)]


def _table1(run: _Run, shape: str, sigma: str) -> tuple[str, list[str]]:
    m = run.metrics
    names = [n for n in ("base", "scaling", "ours") if f"{method_key(n, shape)}/c0/recall" in m
             or f"{method_key(n, shape)}/c0/D_P/s{sigma}" in m]
    names = paper_order(names + [n for n in ("posterior_sm", "oracle", "data") if f"{n}/c0/recall" in m
                                 or f"{n}/c0/D_P/s{sigma}" in m])
    cols = [("D_P", f"E[D_P] σ={sigma}"), ("D_L", f"E[D_L] σ={sigma}"), ("D_P_grid", "E[D_P] grid"),
            ("D_L_grid", "E[D_L] grid"), ("precision", "precision"), ("recall", "recall"), ("sw1", "SW1")]
    header = ["method", "class"] + [c[1] for c in cols]
    rows = []
    for n in names:
        key = n if n in ("posterior_sm", "oracle", "data") else method_key(n, shape)
        for c in (0, 1):
            vals = []
            for stem, _ in cols:
                k = f"{key}/c{c}/{stem}" + ("" if stem in ("precision", "recall", "sw1") else f"/s{sigma}")
                vals.append(_fmt(m.get(k)))
            label = PAPER_LABELS.get(n, "exact samples of p_σL(x|y) (mean of draws)" if n == "data" else n)
            rows.append([label if c == 0 else "", f"c{c + 1}"] + vals)
    return md_table(header, rows), names


def _per_sigma(run: _Run, shape: str, stem: str) -> str:
    m = run.metrics
    sigmas = _sigmas(m, stem)
    names = [n for n in paper_order(["base", "scaling", "ours", "posterior_sm"])
             if f"{n if n == 'posterior_sm' else method_key(n, shape)}/c0/{stem}/s{sigmas[0]}" in m] if sigmas else []
    rows = []
    for n in names:
        key = n if n == "posterior_sm" else method_key(n, shape)
        vals = [np.mean([m[f"{key}/c{c}/{stem}/s{s}"] for c in (0, 1)]) for s in sigmas]
        rows.append([PAPER_LABELS.get(n, n)] + [_fmt(v) for v in vals])
    return md_table(["method"] + [f"σ={s}" for s in sigmas], rows)


def _ce_table(run: _Run, shape: str) -> str:
    m = run.metrics
    sigmas = sorted({k.rsplit("/s", 1)[1] for k in m if "/ce/s" in k and "track" not in k}, key=float)
    losses = sorted({k.split("/")[0].removesuffix(f"-{shape}") for k in m if "/ce/s" in k
                     and k.split("/")[0].endswith(f"-{shape}" if shape else "")})
    rows = []
    for loss in losses:
        key = method_key(loss, shape)
        if f"{key}/ce/s{sigmas[0]}" in m:
            rows.append([loss] + [f"{_fmt(m[f'{key}/ce/s{s}'])} / {_fmt(m.get(f'{key}/acc/s{s}'))}" for s in sigmas])
    return md_table(["classifier loss"] + [f"CE / acc σ={s}" for s in sigmas], rows)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _count(pairs: list[tuple[str, float, float]]) -> tuple[int, int, list[str]]:
    """(wins of the first value being lower, total, the keys where it was not)."""
    losses = [k for k, a, b in pairs if not a < b]
    return len(pairs) - len(losses), len(pairs), losses


def _claims_table1(run: _Run) -> list[str]:
    m, out = run.metrics, []
    for shape in run.shapes():
        ours, base, scaling = method_key("ours", shape), method_key("base", shape), method_key("scaling", shape)
        for stem in ("D_L", "D_P"):
            pat = re.compile(rf"^{re.escape(ours)}/c\d/{stem}(_grid)?/s")
            pairs = [(k.removeprefix(f"{ours}/"), v, m[k.replace(ours, base, 1)]) for k, v in m.items() if pat.match(k)]
            w, n, lost = _count(pairs)
            verdict = "agrees" if w == n else ("mostly agrees" if w > n / 2 else "does not agree")
            detail = f"; not lower at: {', '.join(sorted(lost))}" if lost else ""
            out.append(f"- *{shape or 'classifier'}*, E[{stem}] ours (Total) < base (CE) in **{w} of {n}** "
                       f"(class × σ × point set) comparisons: **{verdict}**{detail}.")
        if f"{scaling}/c0/recall" in m:
            pat = re.compile(rf"^{re.escape(scaling)}/c\d/D_P(_grid)?/s")
            dp = [(k, m[k.replace(scaling, base, 1)], v) for k, v in m.items() if pat.match(k)]
            w, n, _ = _count(dp)
            rec = [(m[f"{scaling}/c{c}/recall"], m[f"{base}/c{c}/recall"]) for c in (0, 1)]
            sw = [(m[f"{scaling}/c{c}/sw1"], m[f"{base}/c{c}/sw1"]) for c in (0, 1)]
            pairs_txt = ", ".join(f"c{c + 1} {a:.4f} vs {b:.4f}" for c, (a, b) in enumerate(rec))
            sw_txt = ", ".join(f"c{c + 1} {_fmt(a)} vs {_fmt(b)}" for c, (a, b) in enumerate(sw))
            rec_word = "**lower**" if all(a < b for a, b in rec) else "**not lower** in both classes"
            sw_word = "**higher** (worse)" if all(a > b for a, b in sw) else "**not higher** in both classes"
            out.append(
                f"- *{shape or 'classifier'}*, scaling raises E[D_P] over base in **{w} of {n}** comparisons; "
                f"recall scaling vs base: {pairs_txt} — {rec_word}; SW1 scaling vs base: {sw_txt} — {sw_word}."
            )
    if "oracle/c0/precision" in m:
        nan = float("nan")
        o = [(m[f"oracle/c{c}/precision"], m[f"oracle/c{c}/recall"], m[f"oracle/c{c}/sw1"],
              m.get(f"data/c{c}/sw1_lo", nan), m.get(f"data/c{c}/sw1_hi", nan)) for c in (0, 1)]
        pr_ok = all(p > 0.95 and r > 0.95 for p, r, _, _, _ in o)
        sw_ok = [s <= hi for _, _, s, _, hi in o]
        if not pr_ok:
            verdict = "**fails**: precision or recall ≤ 0.95"
        elif all(sw_ok):
            verdict = "**passes**: precision and recall > 0.95, SW1 within the exact samples' range"
        else:
            verdict = ("precision and recall **pass** (> 0.95); SW1 is **above** the exact samples' range for "
                       + ", ".join(f"c{c + 1}" for c, ok in enumerate(sw_ok) if not ok))
        out.append("- Sampler and metric check (the oracle row): " + "; ".join(
            f"c{c + 1} precision {p:.4f}, recall {r:.4f}, SW1 {_fmt(s)} (exact samples of the target: "
            f"{_fmt(lo)}–{_fmt(hi)})" for c, (p, r, s, lo, hi) in enumerate(o)) + f" — {verdict}.")
    return out


def _curves(run: _Run, shape: str, key: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """loss -> (steps, mean, 95 % half-width, n seeds) of a tracked metric."""
    out = {}
    stems = sorted({s.rsplit("-seed", 1)[0] for s in run.children if s.startswith("stage2-")})
    for stem in stems:
        loss = stem.removeprefix("stage2-").removesuffix(f"-{shape}" if shape else "")
        if shape and not stem.endswith(f"-{shape}"):
            continue
        hs = [run.history(s, key) for s in sorted(run.children) if s.rsplit("-seed", 1)[0] == stem]
        hs = [h for h in hs if h]
        if not hs:
            continue
        out[loss] = (*curve_band(hs), len(hs))
    return out


def _figure5_text(run: _Run) -> list[str]:
    keys = sorted({k for s, r in run.children.items() if s.startswith("stage2-") for k in r.data.metrics
                   if k.startswith("track/")})
    lines: list[str] = []
    for shape in run.shapes():
        rows, claims = [], []
        for key in keys:
            curves = _curves(run, shape, key)
            for loss, (steps, mean, half, n) in curves.items():
                i_min = int(np.argmin(mean))
                rows.append([f"`{key}`", loss, str(n), f"{_fmt(mean[0])}", f"{_fmt(mean[i_min])} @ {steps[i_min]}",
                             f"{_fmt(mean[-1])} ± {_fmt(half[-1])}", f"{_fmt(mean[-1] - mean[i_min])}"])
            if "/D_L" in key and {"ce", "total"} <= set(curves):
                ce_up = curves["ce"][1][-1] > curves["ce"][1][0]
                claims.append(f"- *{shape}*, `{key}`: with CE alone the score error "
                              f"{'**rises**' if ce_up else '**does not rise**'} over training "
                              f"({_fmt(curves['ce'][1][0])} → {_fmt(curves['ce'][1][-1])}); "
                              + "; ".join(f"{lo} {_fmt(curves[lo][1][0])} → {_fmt(curves[lo][1][-1])}"
                                          for lo in ("dlsm", "total") if lo in curves)
                              + f". Final error Total < CE: **{_yes(curves['total'][1][-1] < curves['ce'][1][-1])}**.")
            if "/ce/" in key and {"dlsm", "total"} <= set(curves):
                rise = {lo: curves[lo][1][-1] - curves[lo][1].min() for lo in ("ce", "dlsm", "total") if lo in curves}
                spread = {lo: curves[lo][2][-1] for lo in rise}
                stable = rise["total"] <= rise["dlsm"] and spread["total"] <= spread["dlsm"]
                claims.append(f"- *{shape}*, `{key}`: rise of the mean CE above its minimum by the end: "
                              + ", ".join(f"{lo} {_fmt(v)}" for lo, v in rise.items())
                              + "; final 95 % half-width over seeds: "
                              + ", ".join(f"{lo} {_fmt(v)}" for lo, v in spread.items())
                              + f". Total more stable than DLSM' alone (both smaller): **{_yes(stable)}**.")
        lines += [f"#### Classifier shape `{shape}`", "",
                  md_table(["metric", "loss", "seeds", "at step 0", "min (mean) @ step", "final mean ± 95 % CI",
                          "final − min"], rows), "", *claims, ""]
    return lines


def write_report(table1: str, ablation: str, out: Path, notes: Path | None = None) -> Path:
    """Write the markdown report and its figures (``<out stem>/*.png``); returns ``out``."""
    client = mlflow_client()
    t1, ab = _Run(client, table1), _Run(client, ablation)
    fig_dir = out.parent / out.stem
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    figures_run = t1.children["figures"].info.run_id
    sha = commit()
    lines = [
        "# Moons: DLSM paper Table 1, Figure 1 and Figure 5",
        "",
        f"Generated by `python -m dlsm.report` (`make reproduce-moons`) on "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from MLflow runs `{t1.run.info.run_id}` "
        f"({table1}) and `{ab.run.info.run_id}` ({ablation}); commit `{sha or 'unknown'}`.",
        f"Machine: {machine()}.",
        "",
        "E[D_P] and E[D_L] are the mean Euclidean distances of a method's posterior and likelihood score to the "
        "Parzen oracle's, over x̃ ~ p_σ(x̃|y) (the class's data plus σ-noise) or over the fixed 35 × 35 grid on "
        "[−40, 40] × [−25, 25]; the likelihood term of a method is posterior − prior (α-scaled for scaling). "
        "Precision and recall are k-NN (k = 5, Kynkäänniemi et al. 2019) against the class's clean data; "
        "SW1 is the sliced Wasserstein-1 distance to it. The last row scores exact samples of the "
        "sampler's target p_σL(x|y) (class data plus σ_L-noise, as many points as each method drew; mean over "
        "draws): the floor of each sample metric at this sample size.",
        "",
        "## Wall time on this machine",
        "",
        *_wall(t1, table1),
        *_wall(ab, ablation),
        "",
        "## Table 1",
        "",
    ]
    for shape in t1.shapes():
        sigma = "7.5" if "7.5" in _sigmas(t1.metrics, "D_P") else (_sigmas(t1.metrics, "D_P") or ["?"])[-1]
        table, _ = _table1(t1, shape, sigma)
        lines += [f"### Classifier shape `{shape or 'classifier'}` (σ = {sigma}, the toy code's evaluation σ)", "",
                  table, "", "E[D_L] at every evaluated σ (mean over both classes), over x̃ ~ p_σ(x̃|y):", "",
                  _per_sigma(t1, shape, "D_L"), "", "… and over the grid:", "", _per_sigma(t1, shape, "D_L_grid"), "",
                  "E[D_P] over the grid:", "", _per_sigma(t1, shape, "D_P_grid"), "",
                  "α* (least-squares scale that best maps the likelihood term onto the oracle's; "
                  "> 1: too weak), over the grid:", "", _per_sigma(t1, shape, "alpha_star_grid"), "",
                  "Classifier cross-entropy / accuracy on x̃ ~ p_σ(x̃, y):", "", _ce_table(t1, shape), ""]
    lines += ["## Figure 1", ""]
    for shape in t1.shapes():
        name = f"posterior_field_figure-{shape}.png" if shape else "posterior_field_figure.png"
        if t1.copy_artifact(figures_run, f"plots/{name}", fig_dir / f"figure1-{shape or 'classifier'}.png"):
            lines += [f"Classifier shape `{shape}`; rows: posterior-score field of c1, of c2 (σ = 7.5), samples.", "",
                      f"![Figure 1, {shape}]({fig_dir.name}/figure1-{shape or 'classifier'}.png)", ""]
    lines += ["## Figure 5 (ablation: CE, DLSM' alone, Total)", "",
              "Curves are evaluated on the weights being trained (not the EMA) every "
              f"{ab.params.get('classifier/train.eval_every', '?')} steps; mean and 95 % Student-t interval over "
              f"{ab.params.get('macro.N_SEEDS', ab.params.get('train_classifiers.seeds', '?'))} seeds of stage 2 "
              "(stage 1 is shared).", ""]
    for shape in ab.shapes():
        name = f"training_curves-{shape}.png" if shape else "training_curves.png"
        if ab.copy_artifact(ab.run.info.run_id, f"plots/{name}", fig_dir / f"figure5-{shape or 'classifier'}.png"):
            lines += [f"![Figure 5, {shape}]({fig_dir.name}/figure5-{shape or 'classifier'}.png)", ""]
    lines += _figure5_text(ab)
    lines += ["## The paper's claims, checked against these numbers", "", *_claims_table1(t1), ""]
    lines += ["## Settings", "", f"`{table1}`:", "", _settings(t1), "", f"`{ablation}` (differences from the above "
              "are its losses, seeds and tracking):", "", _settings(ab), ""]
    if notes is not None:
        lines += [notes.read_text().rstrip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlsm.report", description=__doc__.splitlines()[0])
    p.add_argument("--table1", default="moons_table1", help="MLflow experiment of the Table-1 run")
    p.add_argument("--ablation", default="moons_ablation", help="MLflow experiment of the Figure-5 run")
    p.add_argument("--notes", type=Path, default=None, help="markdown appended verbatim (hand-written discussion)")
    p.add_argument("--out", type=Path, default=Path("docs/results/moons.md"))
    args = p.parse_args(argv)
    return run_report(args.notes, lambda: write_report(args.table1, args.ablation, args.out, args.notes))

