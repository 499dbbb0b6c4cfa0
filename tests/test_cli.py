"""End to end through ``python -m dlsm.launch``: MLflow runs, params, metrics, artifacts, errors, resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MOONS = str(ROOT / "gin" / "moons.gin")
TINY = [
    "score/train.n_iters = 60",
    "classifier/train.n_iters = 40",
    "score/train.batch_size = 64",
    "classifier/train.batch_size = 64",
    "score/train.log_every = 20",
    "classifier/train.log_every = 20",
    "score/train.ckpt_every = 20",
    "classifier/train.ckpt_every = 20",
    "NUM_SCALES = 8",
    "STEPS_PER_SCALE = 2",
    "experiment.n_samples = 64",
    "two_moons.n = 400",
    "score_error_metrics.n_points = 64",
    "classifier_metrics.n_points = 64",
    "posterior_field_figure.grid = 8",
]


def launch(cwd: Path, *extra: str, gin_files=(MOONS,), params=TINY, timeout: int = 300, **kw):
    cmd = [sys.executable, "-m", "dlsm.launch"]
    for g in gin_files:
        cmd += ["--gin", g]
    for p in params:
        cmd += ["--gin_param", p]
    cmd += list(extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def runs_by_stage(c, parent_id: str) -> dict:
    exp = c.get_experiment_by_name("moons")
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags["dlsm.stage"]: r for r in kids}


def parents(c) -> list:
    exp = c.get_experiment_by_name("moons")
    return c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent'")


def artifact_paths(c, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for f in c.list_artifacts(run_id, path):
        out |= artifact_paths(c, run_id, f.path) if f.is_dir else {f.path}
    return out


def launch_and_interrupt(cwd: Path, params: list[str], wait_for: str, settle: float = 0.0):
    """Start a launch, send SIGINT once a file named ``wait_for`` appears under .dlsm; returns (rc, stderr)."""
    cmd = [sys.executable, "-m", "dlsm.launch", "--gin", MOONS] + [x for p in params for x in ("--gin_param", p)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((cwd / ".dlsm").rglob(wait_for)) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(settle)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("moons")
    proc = launch(cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_tiny_moons_run_logs_parent_and_children(tiny_run):
    cwd, proc = tiny_run
    c = client(cwd)
    (parent,) = parents(c)
    assert parent.info.status == "FINISHED"
    kids = runs_by_stage(c, parent.info.run_id)
    assert set(kids) == {"stage1-score", "stage2-ce", "stage2-total", "sampling"}
    assert all(k.info.status == "FINISHED" for k in kids.values())

    # params: the gin bindings (with macros resolved by name) and the resolved schedule
    p = parent.data.params
    assert p["total_loss.lam"] == "%LAM" and p["macro.LAM"] == "0.125"
    assert p["score/train.n_iters"] == "60"
    assert float(p["schedule.num_scales"]) == 8
    assert kids["stage2-total"].data.params["method"] == "total"

    # metrics: per-step losses in the stage runs, finite final metrics in parent and sampling run
    hist = c.get_metric_history(kids["stage1-score"].info.run_id, "score/loss")
    assert [m.step for m in hist] == [20, 40, 60]
    assert all(math.isfinite(m.value) for m in hist)
    assert len(c.get_metric_history(kids["stage2-total"].info.run_id, "total/loss")) == 2
    final = kids["sampling"].data.metrics
    for key in ("ce/c0/D_P/s7.5", "total/c1/D_L/s0.5", "oracle/c0/precision", "total/c1/recall",
                "ce/acc/s2", "total/c0/sw1"):
        assert math.isfinite(final[key]), key
    assert set(final) - {"wall_seconds"} <= set(parent.data.metrics)

    # artifacts: checkpoints (EMA included), samples, plots, configs
    assert "checkpoints/score.pt" in artifact_paths(c, kids["stage1-score"].info.run_id)
    assert "checkpoints/classifier-total.pt" in artifact_paths(c, kids["stage2-total"].info.run_id)
    sampling = artifact_paths(c, kids["sampling"].info.run_id)
    assert {"samples/samples-ce.npz", "samples/samples-oracle.npz", "plots/posterior_field_figure.png"} <= sampling
    assert {"config/config.gin", "config/operative_config.gin"} <= artifact_paths(c, parent.info.run_id)

    import numpy as np
    import torch

    ckpt = torch.load(cwd / ".dlsm" / "moons" / parent.data.tags["dlsm.config_hash"] / "score.pt",
                      weights_only=True)
    assert ckpt["step"] == 60 and "ema" in ckpt and "n_averaged" in ckpt["ema"]
    local = c.download_artifacts(kids["sampling"].info.run_id, "samples/samples-total.npz", str(cwd))
    with np.load(local) as z:
        assert z["c0"].shape == (64, 2) and np.isfinite(z["c1"]).all()
    assert "total/c0/precision" in proc.stdout


def test_operative_config_recreates_the_run(tiny_run, tmp_path):
    cwd, _ = tiny_run
    c = client(cwd)
    (parent,) = parents(c)
    op = Path(c.download_artifacts(parent.info.run_id, "config/operative_config.gin", str(tmp_path)))
    proc = launch(tmp_path, gin_files=(str(op),), params=[])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (again,) = parents(client(tmp_path))
    assert set(runs_by_stage(client(tmp_path), again.info.run_id)) == {
        "stage1-score", "stage2-ce", "stage2-total", "sampling"}
    for key in ("ce/c0/D_P/s7.5", "total/c1/sw1"):  # same seeds, same config: same numbers
        assert again.data.metrics[key] == pytest.approx(parent.data.metrics[key], rel=1e-4)


def test_reuse_finished_stage1_run(tiny_run, tmp_path):
    cwd, _ = tiny_run
    c = client(cwd)
    (parent,) = parents(c)
    proc = launch(cwd, params=TINY + [f"experiment.stage1_run_id = '{parent.info.run_id}'",
                                      "classifier/train.n_iters = 20"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    newest = max(parents(c), key=lambda r: r.info.start_time)
    kids = runs_by_stage(c, newest.info.run_id)
    assert kids["stage1-score"].data.params["reused_stage1_run_id"] == parent.info.run_id
    assert not c.get_metric_history(kids["stage1-score"].info.run_id, "score/loss")  # not retrained


BAD_INPUT = [
    (["--gin_param", "ScoreMLP.hiden = 3"], "ScoreMLP' doesn't have a parameter named 'hiden'"),
    (["--gin_param", "NoSuchThing.x = 3"], "No configurable matching 'NoSuchThing'"),
    (["--gin_param", "score/train.n_iters = 'abc'"], "score/train.n_iters = 'abc': expected int"),
    (["--gin_param", "noise_schedule.sigma_min = 'tiny'"], "noise_schedule.sigma_min = 'tiny'"),
    (["--gin", "missing.gin"], "gin file missing.gin not found"),
    (["--gin_param", "ScoreMLP.hidden = (3"], "--gin_param 'ScoreMLP.hidden = (3'"),
    (["--gin_param", "experiment.stage1_run_id = 'nope'"], "no MLflow run 'nope'"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUT, ids=[a[-1] for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, needle):
    proc = launch(tmp_path, *args, params=TINY, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dlsm: error: ") and needle in lines[0], lines[0]


def test_gin_syntax_error_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'moons.gin'\nScoreMLP.hidden = [1, 2\n")
    proc = launch(tmp_path, gin_files=(str(bad),), params=[], timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and str(bad) in lines[0], proc.stderr


def test_nan_loss_stops_the_stage_with_one_line(tmp_path):
    proc = launch(tmp_path, params=TINY + ["score/torch.optim.Adam.lr = 1e30", "score/train.n_iters = 200"])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr
    assert "score: the loss became NaN or Inf" in lines[0]
    c = client(tmp_path)
    (parent,) = parents(c)
    assert parent.info.status == "FAILED"


def test_interrupted_run_resumes_from_checkpoint(tmp_path):
    params = TINY + ["score/train.n_iters = 4000", "score/train.ckpt_every = 100", "score/train.log_every = 100"]
    rc, err = launch_and_interrupt(tmp_path, params, "score.pt", settle=1.0)
    assert rc == 130, err
    assert "relaunch the same command to resume" in err
    import torch

    (ckpt,) = list((tmp_path / ".dlsm").rglob("score.pt"))
    step_at_interrupt = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step_at_interrupt < 4000

    again = launch(tmp_path, params=params)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming run" in again.stdout
    c = client(tmp_path)
    (parent,) = parents(c)  # the same parent run, now finished
    assert parent.info.status == "FINISHED"
    hist = c.get_metric_history(runs_by_stage(c, parent.info.run_id)["stage1-score"].info.run_id, "score/loss")
    steps = sorted({m.step for m in hist})
    assert steps == list(range(100, 4001, 100))  # no step trained twice, none missing


def test_resume_fetches_a_finished_stage_checkpoint_from_mlflow(tmp_path):
    """Interrupted in stage 2 with stage 1's local checkpoint lost: stage 1 is fetched, not retrained."""
    params = TINY + ["classifier/train.n_iters = 1000", "classifier/train.ckpt_every = 100"]
    rc, err = launch_and_interrupt(tmp_path, params, "classifier-ce.pt")
    assert rc == 130, err
    (score_ckpt,) = list((tmp_path / ".dlsm").rglob("score.pt"))
    score_ckpt.unlink()

    again = launch(tmp_path, params=params)
    assert again.returncode == 0, again.stderr[-2000:]
    assert score_ckpt.exists()
    c = client(tmp_path)
    (parent,) = parents(c)
    kids = runs_by_stage(c, parent.info.run_id)
    steps = [m.step for m in c.get_metric_history(kids["stage1-score"].info.run_id, "score/loss")]
    assert steps == [20, 40, 60]  # logged once, by the first launch: not retrained


def test_branch_classifier_and_sampling_methods_via_gin_include(tmp_path):
    proc = launch(tmp_path, gin_files=(str(ROOT / "gin" / "moons_branch.gin"),),
                  params=TINY + ["classifier/train.n_iters = 20"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = client(tmp_path)
    (parent,) = parents(c)
    final = runs_by_stage(c, parent.info.run_id)["sampling"].data.metrics
    for method in ("base", "scaling", "ours", "oracle"):
        assert math.isfinite(final[f"{method}/c0/recall"]), method
    assert math.isfinite(final["scaling/c1/D_L_grid/s7.5"])
    assert parent.data.params["experiment.classifier"] == "@BranchClassifier"


def test_bad_sampling_method_fails_before_training(tmp_path):
    proc = launch(tmp_path, params=TINY + ["experiment.sampling_methods = {'b': ('dlsm', 1.0)}"], timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "sampling_methods['b']" in lines[0], proc.stderr
    assert not (tmp_path / "mlruns").exists()  # rejected before any run was started
