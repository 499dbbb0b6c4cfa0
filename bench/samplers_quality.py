"""Quality against cost: the PC sampler and the guided Heun (EDM) sampler on `gin/digits32.gin`'s networks.

    python bench/samplers_quality.py                       # the issue's grid: several hours on 2 CPU cores
    python bench/samplers_quality.py --pc 25 50 100 --heun 5 9 18 --stochastic 9   # make reproduce-samplers
    python bench/samplers_quality.py --run RUN_ID ...      # the networks of a finished digits32 run in --workdir

Stage 1 and stage 2 are trained once (``experiment.stop_after = 'stage2'``), then every sampler setting is a launch
that reuses them (``experiment.stage1_run_id`` / ``stage2_run_id``) and evaluates base, scaling and ours with the
evaluator network (class-wise FID and recall, sample accuracy; no CAS). Seed ``--seeds[0]`` draws the whole curve
(PC at ``--pc`` levels, 2 evaluations a level; Heun at ``--heun`` steps, 2N - 1 evaluations; one stochastic Heun);
the other seeds redraw PC's best setting and every deterministic Heun setting, so that the chosen points carry 95 %
Student-t intervals. A seed changes the sampler's noise only here: the networks are fixed and the evaluator's seed is
pinned (``EvaluatorSettings.seed = 0``). ``--jobs`` launches run at once, each on ``--threads`` threads.
Writes ``--out`` (markdown) and a figure beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
METHODS = ("base", "scaling", "ours")
METRICS = (("cw/fid.evaluator", "CW-FID ↓", False), ("cw/recall.evaluator", "CW-R ↑", True),
           ("sample_acc", "acc ↑", True))
# EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) with their ImageNet-64 settings (Table 5: S_churn 80 over
# 256 steps, i.e. gamma = 0.31 a step; S_tmin 0.05, S_tmax 50, S_noise 1.003), S_churn scaled to keep gamma at 35 steps
SAVING = threading.Lock()
STOCHASTIC = {"s_churn": 11.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}


@dataclass
class Point:
    """One sampler setting: its label, network evaluations per sample and its gin bindings."""

    name: str
    nfe: int
    params: list[str]
    kind: str
    results: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> printed metrics


def points(pc_levels: list[int], heun_steps: list[int], stochastic_steps: int) -> list[Point]:
    pcs = [Point(f"PC {n}", 2 * n, [f"NUM_LEVELS = {n}"], "pc") for n in pc_levels]
    heuns = [Point(f"Heun {n}", 2 * n - 1, ["experiment.sampler = @heun_sampler", f"heun_sampler.n_steps = {n}"],
                   "heun") for n in heun_steps]
    churn = [f"heun_sampler.{k} = {v}" for k, v in STOCHASTIC.items()]
    stoch = Point(f"Heun {stochastic_steps} stochastic", 2 * stochastic_steps - 1,
                  ["experiment.sampler = @heun_sampler", f"heun_sampler.n_steps = {stochastic_steps}", *churn],
                  "stochastic")
    return [*pcs, *heuns, stoch]


def launch(cwd: Path, params: list[str], threads: int) -> dict[str, float]:
    """One ``dlsm.launch`` of digits32 with ``params``; the metrics and timings it prints (4 significant digits)."""
    cmd = [sys.executable, "-m", "dlsm.launch", "--gin", str(ROOT / "gin" / "digits32.gin")]
    cmd += [x for p in params for x in ("--gin_param", p)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MLFLOW_DISABLE_TELEMETRY": "true"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"launch failed ({' '.join(params)}):\n{proc.stderr[-3000:]}")
    out = {"launch_s": time.perf_counter() - t0}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


def train(cwd: Path, common: list[str], threads: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    launch(cwd, [*common, "experiment.stop_after = 'stage2'"], threads)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("digits32").experiment_id],
                         filter_string="tags.`dlsm.kind` = 'parent'", order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id, time.perf_counter() - t0


def run_all(cwd: Path, jobs: list[tuple[Point, int]], common: list[str], args, pts: list[Point], *,
            first_alone: bool = True) -> None:
    """Every (point, seed) launch, ``args.jobs`` at once; with ``first_alone`` the first runs by itself before the
    others (it trains and caches the evaluator that every later launch loads)."""
    def one(job: tuple[Point, int]) -> None:
        point, seed = job
        if seed in point.results:  # from an earlier, interrupted measurement (results.json)
            return
        point.results[seed] = launch(cwd, [*common, *point.params, f"SEED = {seed}"], args.threads)
        with SAVING:
            save(cwd, pts)
        r = point.results[seed]
        print(f"  {point.name:<22} seed {seed}: sampling {r.get('time/sampling_s', float('nan')):7.1f} s, "
              + ", ".join(f"{m} CW-FID {r.get(f'{m}/cw/fid.evaluator', float('nan')):.3g}" for m in METHODS),
              flush=True)

    if first_alone and jobs:
        one(jobs[0])
        jobs = jobs[1:]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, jobs))


def save(cwd: Path, pts: list[Point]) -> None:
    """Every finished launch's numbers in ``results.json``, so that an interrupted measurement resumes."""
    done = {p.name: {str(k): v for k, v in p.results.items()} for p in pts}
    tmp = cwd / "results.json.tmp"
    tmp.write_text(json.dumps(done, indent=1))
    tmp.replace(cwd / "results.json")


def load(cwd: Path, pts: list[Point]) -> None:
    path = cwd / "results.json"
    if path.exists():
        done = json.loads(path.read_text())
        for p in pts:
            p.results.update({int(k): v for k, v in done.get(p.name, {}).items()})


def mean_fid(point: Point, seed: int) -> float:
    return sum(point.results[seed][f"{m}/cw/fid.evaluator"] for m in METHODS) / len(METHODS)


def cell(point: Point, method: str, key: str, seeds: list[int]) -> str:
    from dlsm.report.stats import mean_ci

    return str(mean_ci([point.results[s][f"{method}/{key}"] for s in seeds]))


def reaches(heun: Point, pc: Point, seeds: list[int]) -> list[str]:
    """Where Heun falls short of PC: the (method, metric) pairs whose paired 95 % interval of Heun - PC lies wholly
    on the worse side of 0 (same seed: the same networks, other noise)."""
    from dlsm.report.stats import paired_ci, verdict

    worse = []
    for m in METHODS:
        for key, label, up in METRICS:
            diff = paired_ci([heun.results[s][f"{m}/{key}"] for s in seeds],
                             [pc.results[s][f"{m}/{key}"] for s in seeds])
            if verdict(diff, higher_is_better=up) == "does not":
                worse.append(f"{m} {label.split()[0]} ({diff})")
    return worse


def figure(pts: list[Point], seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, (key, label, _up) in zip(axes, METRICS, strict=True):
        for m, colour in zip(METHODS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
            for kind, style in (("pc", "o-"), ("heun", "s--")):
                sel = [p for p in pts if p.kind == kind and seed in p.results]
                ax.plot([p.nfe for p in sel], [p.results[seed][f"{m}/{key}"] for p in sel], style, color=colour,
                        label=f"{m} {'PC' if kind == 'pc' else 'Heun'}")
            for p in pts:
                if p.kind == "stochastic" and seed in p.results:
                    ax.plot([p.nfe], [p.results[seed][f"{m}/{key}"]], "*", color=colour, markersize=11)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"digits32, seed {seed}: PC (circles), Heun (squares), stochastic Heun (stars)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(pts: list[Point], args, *, run_id: str, train_s: float, total_s: float, fig: Path) -> str:
    seed0, seeds = args.seeds[0], args.seeds
    pcs = [p for p in pts if p.kind == "pc"]
    best = min(pcs, key=lambda p: mean_fid(p, seed0))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    head = ["| sampler | NFE | sampling (s) | " + " | ".join(f"{m} {lab}" for m in METHODS for _k, lab, _u in METRICS)
            + " |", "|---|---|---|" + "---|" * (len(METHODS) * len(METRICS))]
    curve = [f"| {p.name} | {p.nfe} | {p.results[seed0]['time/sampling_s']:.0f} | "
             + " | ".join(f"{p.results[seed0][f'{m}/{k}']:.4g}" for m in METHODS for k, _l, _u in METRICS) + " |"
             for p in pts]
    chosen = [p for p in pts if all(s in p.results for s in seeds)]
    many = [f"| {p.name} | {p.nfe} | " + " | ".join(cell(p, m, k, seeds) for m in METHODS for k, _l, _u in METRICS)
            + " |" for p in chosen]
    lines = []
    for p in sorted((p for p in chosen if p.kind == "heun"), key=lambda p: p.nfe):
        worse = reaches(p, best, seeds)
        lines.append(f"- **{p.name}** ({p.nfe} evaluations, {p.nfe / best.nfe:.1%} of {best.name}'s {best.nfe}): "
                     + ("within the intervals of " + best.name + " on every method and metric" if not worse else
                        "worse than " + best.name + " on " + "; ".join(worse)))
    return "\n".join([
        "# Samplers: quality against network evaluations on digits32", "",
        f"Generated by `python bench/samplers_quality.py {shlex.join(sys.argv[1:])}` on "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit `{commit.strip()}`. Machine: {os.cpu_count()} "
        f"CPU cores ({platform.machine()}), no GPU; {args.jobs} launches at once, {args.threads} thread(s) each.", "",
        f"The networks of `gin/digits32.gin` (NCSN++ by DSM, ResNet-18 layout by CE and by Total at a quarter width), "
        f"trained once (run `{run_id}`, {train_s / 60:.1f} min), then sampled with each setting: "
        f"{args.per_class} samples per class and method, the 10 classes of a method in one batch "
        "(`sample.classes_per_unit = 10`). Metrics on the evaluator network's features (no Inception offline), k = 5. "
        "NFE: score evaluations per sample (each one guided: a score-network call plus a classifier gradient); PC "
        "makes 2 a level (corrector, predictor), Heun 2N − 1 for N steps. The whole measurement took "
        f"{total_s / 60:.1f} min.", "",
        f"## The curve, seed {seed0}", "", *head, *curve, "",
        f"![quality against evaluations]({fig.parent.name}/{fig.name})", "",
        f"## The chosen points, seeds {', '.join(map(str, seeds))} (mean ± 95 % Student-t half-width)", "",
        "A seed changes the sampler's noise only; the networks and the evaluator are the same for every seed.", "",
        "| sampler | NFE | " + " | ".join(f"{m} {lab}" for m in METHODS for _k, lab, _u in METRICS) + " |",
        "|---|---|" + "---|" * (len(METHODS) * len(METRICS)), *many, "",
        f"PC's best setting at seed {seed0} (lowest CW-FID averaged over the three methods): **{best.name}**. "
        f"Each Heun setting against it, paired over the seeds (worse: the 95 % interval of Heun − {best.name} lies "
        "wholly on the worse side of 0):", "", *lines, "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a finished digits32 run in ./mlruns of --workdir whose networks to reuse")
    p.add_argument("--workdir", default=".dlsm/bench-samplers", help="MLflow store and checkpoints (kept)")
    p.add_argument("--per-class", type=int, default=10, help="samples per class and method (digits32.gin: 20)")
    p.add_argument("--pc", type=int, nargs="+", default=[100, 200, 500], help="PC levels")
    p.add_argument("--heun", type=int, nargs="+", default=[18, 35, 50], help="Heun steps")
    p.add_argument("--stochastic", type=int, default=35, help="steps of the one stochastic Heun setting")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="launches at once")
    p.add_argument("--threads", type=int, default=1, help="threads per launch")
    p.add_argument("--train-threads", type=int, default=2, help="threads of the one training launch")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "samplers.md"))
    p.add_argument("--train-params", nargs="*", default=[], help="gin bindings for every launch (e.g. shorter "
                   "training for a check of this script)")
    p.add_argument("--notes", help="a markdown file appended to --out (what was cut, the conclusions)")
    p.add_argument("--report-only", action="store_true", help="write --out from results.json, launching nothing "
                   "(the seeds after the first count for the points that have them all)")
    p.add_argument("--train-s", type=float, default=0.0, help="with --report-only: the training's wall seconds")
    p.add_argument("--total-s", type=float, default=float("nan"), help="with --report-only: the measurement's")
    args = p.parse_args()
    cwd = Path(args.workdir).resolve()
    cwd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = ["experiment.workdir = 'ckpt'", "EvaluatorSettings.seed = 0"]
    if args.report_only:
        args.run = args.run or "(not given: pass --run)"
    run_id, train_s = ((args.run, args.train_s) if args.run else
                       train(cwd, [*base, *args.train_params], args.train_threads))
    print(f"networks: run {run_id} ({train_s:.0f} s)", flush=True)
    common = [*base, *args.train_params, f"experiment.stage1_run_id = '{run_id}'",
              f"experiment.stage2_run_id = '{run_id}'", f"N_PER_CLASS = {args.per_class}",
              "sample.classes_per_unit = 10", "experiment.stages = [@train_score_model, @train_classifiers, @sample, "
              "@evaluate]", "evaluate.suites = [@image_metrics]", "image_metrics.with_cas = False",
              "image_metrics.real_row = False", "sample.stream_features = False"]  # sampling's wall: the sampler alone
    pts = points(args.pc, args.heun, args.stochastic)
    load(cwd, pts)
    if not args.report_only:
        run_all(cwd, [(q, args.seeds[0]) for q in pts], common, args, pts)
    best = min((q for q in pts if q.kind == "pc"), key=lambda q: mean_fid(q, args.seeds[0]))
    again = [best, *(q for q in pts if q.kind == "heun")]
    if not args.report_only:
        run_all(cwd, [(q, s) for s in args.seeds[1:] for q in again], common, args, pts, first_alone=False)
    out = Path(args.out)
    fig = out.parent / "samplers" / "quality_nfe.png"
    figure(pts, args.seeds[0], fig)
    total_s = args.total_s if args.report_only else time.perf_counter() - t0
    text = report(pts, args, run_id=run_id, train_s=train_s, total_s=total_s, fig=fig)
    if args.notes:
        text += "\n" + Path(args.notes).read_text()
    out.write_text(text)
    print(f"wrote {out} and {fig} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
