"""Failures on one rank of a torchrun launch (2 gloo processes, moons): a full disk while rank 0 writes a checkpoint,
and rank 0's MLflow store lost in the middle of a stage. Every rank stops at the same point with the error's exit
code, rank 0 prints the error's one line, and the relaunch resumes. The faults come from tests/faulty_launch.py.
The image path (sampling units, samples files) is in tests/test_sampling_scale.py.

In a file of their own so that pytest-xdist may run them beside the module fixtures of tests/test_distributed.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from test_distributed import _env, _launch_cmd  # tests/, on sys.path


def _faulty(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The TINY moons launch with 2 ranks through tests/faulty_launch.py, the fault named by ``env``."""
    (cwd / "exits").mkdir()
    return subprocess.run(_launch_cmd(cwd, faulty=True), cwd=cwd, text=True, capture_output=True, timeout=300,
                          env=_env(MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}", DLSM_EXITS=str(cwd / "exits"),
                                   **env))


def _stopped_together(cwd: Path, proc: subprocess.CompletedProcess, exit_code: int) -> list[str]:
    """The lines ``dlsm:`` printed by a torchrun launch that stopped on an error. Both ranks left ``dlsm.launch``
    by themselves with the error's exit code: none was left waiting for a rank that had gone (torchrun then stops
    it, or it dies in gloo with "Connection closed by peer" and a traceback); rank 0 printed the error."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    exits = {p.name: p.read_text() for p in (cwd / "exits").iterdir()}
    assert exits == {"rank0": str(exit_code), "rank1": str(exit_code)}, proc.stderr[-4000:]
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("[rank")], proc.stderr[-4000:]
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("dlsm:")]


def test_torchrun_full_disk_on_rank0_stops_every_rank_in_one_line_and_the_relaunch_resumes(tmp_path):
    """Rank 0 alone writes checkpoints; its third write of classifier-ce.pt (step 15) finds the disk full. Every
    rank stops at that step with rank 0's line (before, rank 0 printed it, waited 30 s for rank 1, which then died in
    gloo with a traceback); the checkpoint of step 10 is kept, and the same command without the fault resumes."""
    proc = _faulty(tmp_path, DLSM_FULL_RANK="0", DLSM_FULL_FILE="classifier-ce.pt", DLSM_FULL_AFTER="2")
    (rundir,) = [p for p in (tmp_path / "work" / "moons").iterdir() if p.is_dir()]
    (line,) = _stopped_together(tmp_path, proc, 5)  # DiskFullError's exit code
    assert line.startswith(f"dlsm: error: no space left on device writing classifier-ce.pt in {rundir} (needs "
                           "about "), line
    assert line.endswith("free now); free space and relaunch the same command to resume"), line
    assert torch.load(rundir / "classifier-ce.pt", weights_only=True)["step"] == 10
    assert not list(rundir.glob("*.tmp")) and not (rundir / "classifier-total.pt").exists()

    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    again = subprocess.run(_launch_cmd(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("dlsm: resuming run") == 1
    from mlflow.tracking import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("moons")
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent'")
    assert parent.info.status == "FINISHED"
    (ce,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.stage` = 'stage2-ce'")
    assert sorted(m.step for m in c.get_metric_history(ce.info.run_id, "ce/loss")) == list(range(50, 401, 50))
    assert torch.load(rundir / "classifier-ce.pt", weights_only=True)["step"] == 400


def test_torchrun_lost_store_on_rank0_stops_every_rank_at_the_stage_end_in_one_line(tmp_path):
    """Rank 0 alone tracks; its store stops answering in stage2-ce. Training goes on to the stage's end (one
    warning), then every rank stops with rank 0's line (before, rank 1 waited 30 s for the next stage and died in
    gloo with a traceback)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _faulty(tmp_path, DLSM_LOSE_STORE_IN="stage2-ce")
    warning, error = _stopped_together(tmp_path, proc, 2)  # TrackingError's exit code
    assert warning.startswith(f"dlsm: warning: MLFLOW_TRACKING_URI={uri}: Connection refused; "), warning
    assert error.startswith(f"dlsm: error: MLFLOW_TRACKING_URI={uri}: Connection refused; tracking was lost during "
                            "stage2-ce ("), error
    (rundir,) = [p for p in (tmp_path / "work" / "moons").iterdir() if p.is_dir()]
    assert torch.load(rundir / "classifier-ce.pt", weights_only=True)["step"] == 400  # trained to the stage's end
    assert not (rundir / "classifier-total.pt").exists()  # and stopped there
