"""Ray Tune sweeps of one gin binding (lambda, alpha, a noise setting) over a dlsm experiment.

    python tune/sweep.py --param LAM --values 0.03 0.125 0.5 [--gin FILE ...] [--gin_param B ...]
                         [--share stage1|stage2|none] [--address ADDRESS] [--resume] [--fresh]

The driver parses the gin files, trains the shared stages once (``experiment.stop_after``) and then
runs one Ray Tune trial per value. Each trial is a worker process that parses the same gin files and
bindings itself (gin state is per process), adds the swept value and
``experiment.stage1_run_id`` / ``stage2_run_id`` of the shared run, and runs the rest of the
experiment as a child MLflow run of the sweep's parent run. At the end the driver prints the results
sorted by the metric and logs a plot of the metric against the swept value.

Settings that are not about *what* to sweep are gin bindings of :func:`sweep` (resources,
scheduler, retries, metric), so a gin file can declare them too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import gin

from dlsm.errors import ConfigError, DlsmError, print_error
from dlsm.sweep.cluster import connect, preflight
from dlsm.sweep.results import SweepResult, class_mean, collect, metric_plot, table_text
from dlsm.sweep.settings import SHARE, SweepSettings, sweep
from dlsm.sweep.trial import binding, run_trial

__all__ = ["SweepResult", "SweepSettings", "class_mean", "run_sweep", "sweep"]

def _format_value(v: str) -> object:
    """A --values entry as a Python literal for gin (numbers stay numbers, 'auto' a string)."""
    try:
        return int(v) if v.lstrip("-").isdigit() else float(v)
    except ValueError:
        return v


def _check_values(gin_files: Sequence[str], gin_params: Sequence[str], param: str,
                  values: Sequence[str]) -> tuple[list[object], SweepSettings, object]:
    """Parse the config once per swept value with every check on (types, ranges, ``experiment()``, ``sweep()``),
    before anything trains; returns the parsed values and the first value's sweep settings and experiment spec."""
    import re

    from dlsm.config import call_configurable, parse_config
    from dlsm.experiment import experiment

    parsed = [_format_value(v) for v in values]
    again = [raw for i, (raw, v) in enumerate(zip(values, parsed, strict=True)) if v in parsed[:i]]
    if again:
        raise ConfigError(f"--values: {again[0]} is given twice; each value is one trial")
    parse_config(list(gin_files), list(gin_params), check=False)  # the files and bindings themselves
    labels = [f"--gin_param {b!r}" for b in gin_params]
    for raw, v in reversed(list(zip(values, parsed, strict=True))):  # the first value is parsed last, and kept
        try:
            parse_config(list(gin_files), [*gin_params, binding(param, v)],
                         labels=[*labels, f"--param {param} --values {raw}"])
            settings = call_configurable(sweep)
            spec = call_configurable(experiment)
        except ConfigError as err:
            about_value = re.search(rf"(?<![\w/.%]){re.escape(param)}(?!\w)", str(err))
            if str(err).startswith("--param") or not about_value:
                raise
            raise ConfigError(f"--values {raw}: {err}") from None
    return parsed, settings, spec


def _check_before_training(spec, settings: SweepSettings, sweep_name: str, *, address: str | None,
                           resume: bool) -> None:
    """What fails in one line before stage 1 trains: the MLflow store, the workdir, reused run ids, ``--resume``
    without an interrupted sweep, logical GPUs asked of a cluster, and the Ray cluster or its token."""
    from dlsm.experiment import check_workdir
    from dlsm.tracking import Tracker, check_tracking_uri, default_tracking_uri

    check_tracking_uri()
    check_workdir(spec.workdir)
    for key, source in (("experiment.stage1_run_id", spec.stage1_run_id),
                        ("experiment.stage2_run_id", spec.stage2_run_id)):
        if source:
            Tracker(spec.name).check_source_run(source, key)
    if resume and _unfinished_sweep(Tracker(spec.name), sweep_name) is None:
        raise ConfigError(f"--resume: no interrupted sweep {sweep_name} in {default_tracking_uri()}; "
                          "run without --resume to start it")
    if settings.logical_gpus is not None and address is not None:
        raise ConfigError("sweep.logical_gpus applies only to a Ray the sweep starts itself; a cluster given with "
                          "--address announces its own GPUs (ray start --num-gpus)")
    preflight(address, dashboard=settings.dashboard)


def _shared_stages(gin_files: Sequence[str], gin_params: Sequence[str], param: str, first: object, share: str,
                   fresh: bool, name: str) -> list[str]:
    """Train the shared stages once in the driver (or reuse a finished run of the same shared config); returns the
    bindings that point every trial at that run."""
    from dlsm.config import config_hash, parse_config
    from dlsm.experiment import experiment, run_experiment, rundir_lock
    from dlsm.tracking import Tracker

    if share == "none":
        return []
    gin.clear_config()
    parse_config(list(gin_files), [*gin_params, binding(param, first), f"experiment.stop_after = '{share}'"])
    spec = experiment()
    with rundir_lock(spec, config_hash(), wait=True):  # another sweep trains the same shared stages: wait, reuse them
        base_id = None if fresh else _finished_run(Tracker(name), config_hash())  # same shared config: reuse it
        if base_id is None:
            base_id = run_experiment(spec, fresh=fresh, run_name=f"{name}-shared-{share}").run_id
        else:
            print(f"dlsm: reusing the shared {share} run {base_id}")
    shared = [f"experiment.stage1_run_id = '{base_id}'"]
    return shared + ([f"experiment.stage2_run_id = '{base_id}'"] if share == "stage2" else [])


def _tuner(trainable, parsed: list[object], settings: SweepSettings, *, resume: bool, sweep_name: str,
           storage_path: str):
    """Ray Tune's Tuner for the grid of values (restored from ``storage_path`` when resuming)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    exp_dir = str(Path(storage_path) / sweep_name)
    if resume and tune.Tuner.can_restore(exp_dir):
        return tune.Tuner.restore(exp_dir, trainable, resume_errored=True)
    scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=settings.grace_period)
                 if settings.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable, param_space={"value": tune.grid_search(parsed)},
        tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, scheduler=scheduler,
                                    max_concurrent_trials=settings.max_concurrent_trials or None),
        run_config=tune.RunConfig(name=sweep_name, storage_path=storage_path, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=settings.max_failures)),
    )


def _finish(tracker, out: SweepResult, n_values: int, param: str, settings: SweepSettings) -> None:
    """Log the results of a finished grid to the sweep's run; an interrupted grid (Tune returns the partial grid on
    Ctrl-C) is a KeyboardInterrupt."""
    stopped = [r for r in out.rows if r["status"] == "stopped early"]
    if len(out.rows) < n_values or (settings.scheduler == "grid" and stopped):
        print(table_text(out.rows, param, settings.metric))
        raise KeyboardInterrupt
    _close_stopped_runs(tracker, [r["run_id"] for r in stopped])
    ok = [r for r in out.rows if r["status"] == "ok" and math.isfinite(r["metric"])]
    if ok:
        tracker.log_figure(metric_plot(ok, param, settings.metric), "plots/metric_vs_value.png")
        best = ok[0]
        tracker.log_metrics({f"best/{settings.metric}": best["metric"], "best/value": float(best["value"])
                             if isinstance(best["value"], (int, float)) else math.nan})
    tracker.log_text(table_text(out.rows, param, settings.metric), "results.md")


def run_sweep(
    gin_files: Sequence[str],
    gin_params: Sequence[str],
    *,
    param: str,
    values: Sequence[str],
    share: str = "stage1",
    address: str | None = None,
    resume: bool = False,
    fresh: bool = False,
    storage: str = "ray_results",
) -> SweepResult:
    """Run the sweep; see the module docstring. Returns the per-trial results (sorted by the metric)."""
    if share not in SHARE:
        raise ConfigError(f"--share must be one of {SHARE}, got {share!r}")
    if not values:
        raise ConfigError("give at least one value to sweep (--values)")
    from dlsm import components  # noqa: F401
    from dlsm.tracking import Tracker, default_tracking_uri

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    parsed, settings, spec = _check_values(gin_files, gin_params, param, values)
    sweep_name = f"{spec.name}-sweep-{param.replace('/', '_').replace('.', '_')}"
    _check_before_training(spec, settings, sweep_name, address=address, resume=resume)
    cwd = Path.cwd()
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": default_tracking_uri()}  # for the trials

    t0 = time.perf_counter()
    shared = _shared_stages(gin_files, gin_params, param, parsed[0], share, fresh, spec.name)
    if share != "none":
        timings["shared_stages_s"] = time.perf_counter() - t0

    tracker = Tracker(spec.name)
    t0 = time.perf_counter()
    # the environment is set before Ray is imported (Ray reads it at import)
    conn = connect(address, dashboard=settings.dashboard, extra_env=env, checked=True, num_gpus=settings.logical_gpus)
    if conn.dashboard_url:
        print(f"dlsm: Ray dashboard at http://{conn.dashboard_url}")
    env = {**conn.env, **env}

    import ray
    from ray import tune

    timings["ray_init_s"] = time.perf_counter() - t0
    try:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        resources = {"cpu": settings.cpus_per_trial}
        if gpus > 0:
            resources["gpu"] = min(settings.gpus_per_trial, gpus)
        storage_path = str((cwd / storage).resolve())

        with tracker.parent(sweep_name, f"sweep:{sweep_name}", _unfinished_sweep(tracker, sweep_name) if resume
                            else None, kind="sweep") as sweep_run_id:
            tracker.log_params({"sweep.param": param, "sweep.values": list(parsed), "sweep.share": share,
                                "sweep.metric": settings.metric, "sweep.scheduler": settings.scheduler,
                                "sweep.resources": resources, **{f"sweep.shared.{i}": b for i, b in enumerate(shared)}})
            setup = {
                "param": param, "gin_files": [str(Path(f).resolve()) for f in gin_files],
                "gin_params": list(gin_params), "shared_bindings": shared, "metric": settings.metric,
                "report_every": settings.report_every, "sweep_run_id": sweep_run_id, "env": env, "cwd": str(cwd),
                "threads": settings.cpus_per_trial,
            }
            trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)
            tuner = _tuner(trainable, parsed, settings, resume=resume, sweep_name=sweep_name,
                           storage_path=storage_path)
            t0 = time.perf_counter()
            grid = tuner.fit()
            timings["tune_fit_s"] = time.perf_counter() - t0
            out = collect(grid, settings)
            out.run_id = sweep_run_id
            _finish(tracker, out, len(parsed), param, settings)
            timings["total_s"] = time.perf_counter() - t_start
            out.timings = timings
            tracker.log_metrics({f"time/{k}": v for k, v in timings.items()} | {"failed_trials": out.failed})
            if out.failed == len(out.rows):
                raise _AllFailed(out)
    finally:
        ray.shutdown()
    return out


class _AllFailed(DlsmError):
    exit_code = 1

    def __init__(self, result: SweepResult) -> None:
        errors = [r["error"] for r in result.rows if r.get("error")]
        super().__init__(f"every trial of the sweep failed ({result.failed} of {len(result.rows)}); first error: "
                         f"{errors[0] if errors else 'unknown'}")
        self.result = result


def _finished_run(tracker, chash: str) -> str | None:
    """The latest FINISHED run of exactly this gin configuration, if any."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`dlsm.config_hash` = '{chash}' and tags.`dlsm.kind` = 'parent' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _close_stopped_runs(tracker, run_ids: list[str]) -> None:
    """A trial stopped by the scheduler dies with its MLflow runs still RUNNING: mark them KILLED."""
    for run_id in filter(None, run_ids):
        kids = tracker.client.search_runs([tracker.experiment_id],
                                          filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
        for run in [tracker.client.get_run(run_id), *kids]:
            if run.info.status in ("RUNNING", "FAILED"):
                tracker.client.set_terminated(run.info.run_id, "KILLED")


def _unfinished_sweep(tracker, sweep_name: str) -> str | None:
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`dlsm.config_hash` = 'sweep:{sweep_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None


def main(argv: Sequence[str] | None = None, *, param: str | None = None, values: Sequence[str] = (),
         share: str = "stage1", default_params: Sequence[str] = (), prog: str = "tune/sweep.py") -> int:
    """Command line shared by the scripts in ``tune/``; they only change the defaults."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog=f"python {prog}", description=__doc__.splitlines()[0])
    p.add_argument("--gin", action="append", default=[], metavar="FILE",
                   help="gin file, relative to the current folder (default: the project's gin/moons.gin)")
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING", help="a gin binding (repeatable)")
    p.add_argument("--param", default=param, required=param is None,
                   help="the binding to sweep (a %%MACRO or configurable.parameter)"
                   + (f"; default {param}" if param else ""))
    p.add_argument("--values", nargs="+", default=list(values), required=not values,
                   help=f"values to sweep{f'; default {list(values)}' if values else ''}")
    p.add_argument("--share", choices=SHARE, default=share,
                   help=f"stages trained once and shared by every trial (default {share})")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted sweep of the same name")
    p.add_argument("--fresh", action="store_true", help="retrain the shared stages even if a finished run of the same "
                   "configuration exists")
    p.add_argument("--storage", default="ray_results", help="Ray Tune's results folder (default ./ray_results)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors")
    args = p.parse_args(argv)
    from dlsm.config import GIN_DIR

    default_gin = [str(GIN_DIR / "moons.gin")]  # found wherever the script runs from
    try:
        res = run_sweep(args.gin or default_gin, [*default_params, *args.gin_param], param=args.param,
                        values=args.values, share=args.share, address=args.address, resume=args.resume,
                        fresh=args.fresh, storage=args.storage)
    except _AllFailed as err:
        print(table_text(err.result.rows, args.param, sweep().metric))
        return print_error(err)
    except DlsmError as err:
        if args.traceback:
            raise
        return print_error(err)
    except KeyboardInterrupt:
        print("dlsm: interrupted; rerun with --resume to continue the sweep", file=sys.stderr)
        return 130
    print(table_text(res.rows, args.param, sweep().metric))
    print(f"MLflow sweep run {res.run_id}; {res.failed} of {len(res.rows)} trials failed; "
          + ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items()))
    return 0
