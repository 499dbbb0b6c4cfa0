"""Seed runs of one experiment read from MLflow, and what is computed from them alone: Table 2 rows with 95 %
Student-t intervals over seeds, paired differences with verdicts (:mod:`dlsm.report.stats`), the mechanism tables,
and the sentences that check the paper's claims. Used by the digits report (:mod:`dlsm.report.digits`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dlsm.eval.images import TABLE2_COLUMNS
from dlsm.report.common import table as md_table
from dlsm.report.stats import Interval, mean_ci, paired_ci, verdict

__all__ = [
    "OURS_VS_BASE", "PAPER", "SANITY", "SeedRuns", "claim_lines", "count_sentence", "load_seed_runs",
    "mechanism_rows", "mechanism_sigmas", "mechanism_table", "paired_mechanism", "paired_rows", "settings_table",
    "table2_rows", "wall_lines",
]

SANITY = ("real", "uncond", "exact")
PAPER = ("base", "scaling", "ours")
# the paper's claims on CIFAR (Table 2, Sections 5.2-5.3): metric key -> higher is better
OURS_VS_BASE = ("fid", "is", "cas", "cw/fid", "cw/precision", "cw/recall", "cw/density", "cw/coverage")
SCALING_UP = ("precision", "density")
SCALING_DOWN = ("recall", "coverage")
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


def mechanism_table(runs: SeedRuns, rows: dict[str, list]) -> str:
    sig = mechanism_sigmas(runs)
    return md_table(["", *[f"σ = {s}" for s in sig]], [[k] + [str(c) if c is not None else "—" for c in v]
                                                      for k, v in rows.items()])


def paired_mechanism(runs: SeedRuns, a: str, b: str, stem: str, *, per_class: bool,
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


def count_sentence(results: list[tuple[str, str, Interval]], what: str) -> str:
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


# -- provenance -------------------------------------------------------------------------------------------------
def wall_lines(runs: SeedRuns) -> list[str]:
    """The sweep's and each seed run's wall time, and the mean time per stage (longest first)."""
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


def settings_table(runs: SeedRuns, keys: Sequence[str]) -> str:
    """The main bindings (a macro shown with its value) and the noise schedule as built (``schedule.*``)."""
    rows = []
    for k in keys:
        if k not in runs.params:
            continue
        v = runs.params[k]
        if v.startswith("%") and f"macro.{v[1:]}" in runs.params:
            v = f"{v} = {runs.params[f'macro.{v[1:]}']}"
        rows.append([f"`{k}`", f"`{v[:200]}`"])
    rows += [[f"`{k}`", f"`{v}`"] for k, v in sorted(runs.params.items()) if k.startswith("schedule.")]
    return md_table(["binding", "value"], rows)
