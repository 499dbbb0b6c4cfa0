"""Ray Tune sweeps end to end (``tune/sweep_lambda.py``): trials as MLflow child runs, failures, locality."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlsm.sweep.results import class_mean

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "score/train.n_iters = 40", "classifier/train.n_iters = 20", "score/train.batch_size = 64",
    "classifier/train.batch_size = 64", "score/train.log_every = 10", "classifier/train.log_every = 10",
    "NUM_SCALES = 6", "STEPS_PER_SCALE = 1", "sample.n_per_class = 32", "two_moons.n = 300",
    "score_error_metrics.n_points = 32", "score_error_metrics.grid_size = 6", "classifier_metrics.n_points = 32",
    "posterior_field_figure.grid = 5", "sweep.cpus_per_trial = 1",
]


def sweep(cwd: Path, script: str, *args: str, params=TINY, timeout: int = 600):
    cmd = [sys.executable, str(ROOT / "tune" / script), "--gin", str(ROOT / "gin" / "moons.gin")]
    cmd += [x for p in params for x in ("--gin_param", p)] + list(args)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def test_class_mean():
    m = {"total/c0/sw1": 1.0, "total/c1/sw1": 3.0, "ce/c0/sw1": 10.0, "total/c0/D_L/s1": 5.0, "total/loss": 2.0}
    assert class_mean(m, "total/sw1") == 2.0
    assert class_mean(m, "total/loss") == 2.0
    assert class_mean(m, "total/c0/sw1") == 1.0
    assert class_mean(m, "total/D_L/s1") == 5.0
    assert class_mean(m, "total/precision") is None


def test_lambda_sweep_four_fractional_gpu_trials_as_mlflow_children(tmp_path):
    """A lambda sweep of 4 trials, each an MLflow child run reusing one shared stage 1; and (issue 24, item 6) GPU
    packing without a GPU: Ray started with 2 logical GPUs (``sweep.logical_gpus``) runs trials of
    ``gpus_per_trial = 0.5`` four at once (CPUs are not the limit: 0.25 each), gives each the CUDA_VISIBLE_DEVICES
    of its half GPU, and ``device.name = 'auto'`` then runs every trial on the CPU (the line it prints:
    tests/test_device.py)."""
    params = [*TINY, "sweep.cpus_per_trial = 0.25", "sweep.gpus_per_trial = 0.5", "sweep.logical_gpus = 2"]
    proc = sweep(tmp_path, "sweep_lambda.py", "--values", "0.05", "0.5", "5.0", "50.0", params=params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = client(tmp_path)
    exp = c.get_experiment_by_name("moons")
    (sweep_run,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'sweep'")
    assert sweep_run.info.status == "FINISHED"
    trials = c.search_runs([exp.experiment_id],
                           filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
    assert len(trials) == 4
    assert sorted(float(t.data.params["macro.LAM"]) for t in trials) == [0.05, 0.5, 5.0, 50.0]
    for t in trials:
        assert t.info.status == "FINISHED"
        for key in ("total/c0/D_L_grid/s7.5", "total/c1/D_L_grid/s7.5", "ce/c0/precision", "total/ce/s7.5"):
            assert math.isfinite(t.data.metrics[key]), key
    # stage 1 was trained once, in the shared run, and every trial reused it
    reused = set()
    for t in trials:
        kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{t.info.run_id}'")
        (s1,) = [k for k in kids if k.data.tags["dlsm.stage"] == "stage1-score"]
        reused.add(s1.data.params["reused_stage1_run_id"])
        assert "score/loss" not in s1.data.metrics
    (shared,) = reused
    assert c.get_run(shared).data.params["experiment.stop_after"] == "'stage1'"
    # the sweep run: results table and the metric-vs-lambda plot; the printed table is sorted by the metric
    arts = {a.path for a in c.list_artifacts(sweep_run.info.run_id)} | {
        a.path for a in c.list_artifacts(sweep_run.info.run_id, "plots")}
    assert {"results.md", "plots/metric_vs_value.png"} <= arts
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    values = [float(r.split("|")[2]) for r in rows]
    assert len(rows) == 4 and values == sorted(values)
    # GPU packing: 2 trials on each logical GPU, all 4 at once, on the CPU
    assert "'gpu': 0.5" in sweep_run.data.params["sweep.resources"]
    assert sorted(t.data.tags["dlsm.cuda_visible_devices"] for t in trials) == ["0", "0", "1", "1"]
    assert {t.data.params["device"] for t in trials} == {"cpu"}
    spans = [(float(t.data.tags["dlsm.trial_started"]), float(t.data.tags["dlsm.trial_ended"])) for t in trials]
    assert max(s for s, _ in spans) < min(e for _, e in spans), f"the four trials did not all run at once: {spans}"


def test_sweep_where_every_trial_fails_exits_non_zero(tmp_path):
    # stage 1 is fine (shared, trained in the driver); every trial's stage 2 is misconfigured; no retry (the retry of
    # a failed trial is tests/test_ray_local.py's killed-worker test)
    proc = sweep(tmp_path, "sweep_lambda.py", "--values", "0.1",
                 params=[*TINY, "classifier/train.n_iters = 0", "sweep.max_failures = 0"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("dlsm: error:")]
    assert last and "every trial of the sweep failed (1 of 1)" in last[-1], proc.stderr[-3000:]
    assert "n_iters" in last[-1], last[-1]


@pytest.mark.parametrize(("binding", "args", "needle"), [
    ("sweep.scheduler = 'bogus'", (), "sweep.scheduler"),
    ("sweep.logical_gpus = -1", (), "sweep.logical_gpus must be None or a number >= 0"),
    ("sweep.logical_gpus = 2", ("--address", "127.0.0.1:9"), "sweep.logical_gpus applies only to a Ray the sweep"),
])
def test_bad_sweep_setting_is_one_line(tmp_path, binding, args, needle):
    proc = sweep(tmp_path, "sweep_lambda.py", "--values", "0.1", *args, params=[*TINY, binding], timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize(("script", "param", "values", "share"), [
    ("sweep_alpha.py", "ALPHA", ["1.0", "2.0", "4.0", "8.0"], "stage2"),
    ("sweep_noise.py", "NUM_SCALES", ["25", "50", "100"], "stage2"),
    ("sweep_lambda.py", "LAM", ["0.03125", "0.125", "0.5", "2.0"], "stage1"),
    ("sweep.py", None, None, "stage1"),
])
def test_scripts_help_states_their_defaults(script, param, values, share):
    """Each script's --help names the defaults it really uses (its own call of ``dlsm.sweep.driver.main``)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tune" / script), "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert f"usage: python tune/{script}" in text
    assert f"(default {share})" in text
    if param is None:
        assert "--param PARAM" in text and "default" not in text.split("--param PARAM", 1)[1].split("--values")[0]
    else:
        assert f"default {param}" in text and f"default {values}" in text


def test_interrupted_sweep_resumes_without_redoing_finished_trials(tmp_path):
    import signal
    import time

    params = [*TINY, "classifier/train.n_iters = 300", "sweep.max_concurrent_trials = 1"]
    cmd = [sys.executable, str(ROOT / "tune" / "sweep_lambda.py"), "--gin", str(ROOT / "gin" / "moons.gin")]
    cmd += [x for p in params for x in ("--gin_param", p)] + ["--values", "0.01", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for the first finished trial, then Ctrl-C
        done = [p for p in (tmp_path / "ray_results").rglob("result.json") if p.stat().st_size > 0]
        if done:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err, err[-2000:]
    c = client(tmp_path)
    exp = c.get_experiment_by_name("moons")
    (interrupted,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'sweep'")
    finished_before = {t.info.run_id: (t.data.params["macro.LAM"], dict(t.data.metrics), t.info.end_time)
                       for t in c.search_runs([exp.experiment_id], filter_string=(
                           f"tags.`mlflow.parentRunId` = '{interrupted.info.run_id}' and attributes.status = "
                           "'FINISHED'"))}
    assert finished_before, "no trial had finished before the interruption"

    again = sweep(tmp_path, "sweep_lambda.py", "--values", "0.01", "0.1", "--resume", params=params)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the shared stage1 run" in again.stdout
    c = client(tmp_path)
    exp = c.get_experiment_by_name("moons")
    sweeps = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"  # the same sweep run, continued
    trials = c.search_runs([exp.experiment_id],
                           filter_string=f"tags.`mlflow.parentRunId` = '{sweeps[0].info.run_id}'")
    assert sorted(t.data.params["macro.LAM"] for t in trials) == ["0.01", "0.1"]  # none twice
    assert all(t.info.status == "FINISHED" for t in trials)
    for run_id, (lam, metrics, end_time) in finished_before.items():  # kept as they were, not re-run
        run = c.get_run(run_id)
        assert run.data.params["macro.LAM"] == lam and run.info.end_time == end_time
        assert {k: v for k, v in run.data.metrics.items() if k in metrics} == metrics

