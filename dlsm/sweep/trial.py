"""One Ray Tune trial of a sweep, run in a Ray worker process: parse gin there (gin state is per
process), run the rest of the experiment as a child MLflow run of the sweep, report to Tune."""

from __future__ import annotations

import math
import os
import time

import gin

from dlsm.sweep.results import class_mean

__all__ = ["binding", "run_trial"]


def binding(param: str, value: object) -> str:
    """``param = value`` as a gin binding (``value`` as a Python literal)."""
    return f"{param} = {value!r}"


def run_trial(trial_config: dict, setup: dict) -> None:
    """One Ray Tune trial: parse gin here (per process), run the experiment, report metrics.

    ``trial_config`` is Tune's (the swept value); ``setup`` is what every trial shares."""
    config = {**setup, **trial_config}
    os.environ.update(config["env"])
    os.chdir(config["cwd"])
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(config["threads"])))

    from dlsm import components  # noqa: F401
    from dlsm.config import parse_config
    from dlsm.experiment import experiment, run_experiment

    gin.clear_config()
    value = config["value"]
    params = [*config["gin_params"], binding(config["param"], value), *config["shared_bindings"]]
    parse_config(config["gin_files"], params)
    spec = experiment()
    metric, every = config["metric"], config["report_every"]
    count: dict[str, object] = {"n": 0, "last": None}

    def on_metrics(stage: str, metrics: dict[str, float], step: int) -> None:
        # stage-2 training metrics as they are logged, for schedulers such as ASHA
        if not stage.startswith("stage2-"):
            return
        loss = stage.removeprefix("stage2-").split("-")[0]
        named = {f"{loss}/{k.removeprefix(loss + '/')}": v for k, v in metrics.items()}
        if metric in named:
            count["n"] = int(count["n"]) + 1
            count["last"] = named[metric]
            if int(count["n"]) % every == 0:
                import mlflow

                run_id = mlflow.active_run().data.tags.get("mlflow.parentRunId", "")
                tune.report({metric: named[metric], "step": step, "value": value, "mlflow_run_id": run_id})

    t0, t0_wall = time.perf_counter(), time.time()
    done = _finished_trial(spec.name, config["sweep_run_id"])
    if done is not None:  # finished before an interruption, but Tune had not recorded it: report it again
        result = done
    else:
        result = run_experiment(spec, parent_run_id=config["sweep_run_id"], run_name=f"{config['param']}={value}",
                                on_metrics=on_metrics)
    _tag_cluster(result.run_id, started=t0_wall)
    score = class_mean(result.metrics, metric)
    if score is None:  # a training metric: its last value
        score = count["last"]
    # only the sweep's own columns go to Tune; every metric of the trial is in its MLflow run
    tune.report({metric: score if score is not None else math.nan, "value": value,
                 "trial_compute_s": time.perf_counter() - t0, "mlflow_run_id": result.run_id})


def _tag_cluster(run_id: str, *, started: float) -> None:
    """Record on the trial's MLflow run which Ray cluster (GCS address) and node ran it, the GPUs Ray gave it
    (``CUDA_VISIBLE_DEVICES`` as Ray set it, ``-`` when unset) and when it ran (wall-clock seconds since the epoch)."""
    import ray
    from mlflow.tracking import MlflowClient

    ctx = ray.get_runtime_context()
    client = MlflowClient()
    client.set_tag(run_id, "dlsm.ray_cluster", ctx.gcs_address)
    client.set_tag(run_id, "dlsm.ray_node", ctx.get_node_id())
    client.set_tag(run_id, "dlsm.cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
    client.set_tag(run_id, "dlsm.trial_started", f"{started:.3f}")
    client.set_tag(run_id, "dlsm.trial_ended", f"{time.time():.3f}")


def _finished_trial(experiment_name: str, sweep_run_id: str):
    """This trial's run under the sweep if it already FINISHED (same gin configuration), else None."""
    from dlsm.config import config_hash
    from dlsm.experiment import ExperimentResult
    from dlsm.tracking import Tracker

    tracker = Tracker(experiment_name)
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`dlsm.config_hash` = '{config_hash()}' and tags.`mlflow.parentRunId` = "
                      f"'{sweep_run_id}' and attributes.status = 'FINISHED'", max_results=1)
    return ExperimentResult(runs[0].info.run_id, dict(runs[0].data.metrics)) if runs else None
