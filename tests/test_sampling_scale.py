"""Sampling at scale, end to end on images (issue 24, items 1 and 2): ``gin/digits32.gin`` under ``gin/smoke.gin``.

One launch trains every stage with one process (the reference). Then, in the same MLflow store and from that
run's networks (``experiment.stage1_run_id`` / ``stage2_run_id``, another ``experiment.workdir``):
- ``torchrun`` with 2 gloo processes samples and evaluates: the ``samples-*.npz`` are byte for byte the reference's
  and so are the metrics (before issue 24 this died in ``image_metrics`` with a gloo traceback);
- a launch killed with SIGKILL in the middle of sampling and relaunched draws only the units the kill left undrawn,
  and its ``.npz`` are byte for byte the reference's; ``python -m dlsm.evaluate --run`` then evaluates the result
  (the relaunch itself stops after sampling) and finds the reference's metrics.
Every process runs one thread (OMP_NUM_THREADS=1), so float results are comparable bit for bit on one machine.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GIN = ["--gin", str(ROOT / "gin" / "digits32.gin"), "--gin", str(ROOT / "gin" / "smoke.gin")]
METHODS = ("base", "scaling", "ours")
# CAS trains a classifier per method: tested in tests/test_digits.py; a class per unit (smoke.gin packs them): 30 units
FAST = ["image_metrics.with_cas = False", "sample.classes_per_unit = 1"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1", "DLSM_TEST_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cmd(*params: str, procs: int = 1, faulty: bool = False) -> list[str]:
    """``dlsm.launch`` of digits32 + smoke with ``procs`` processes; ``faulty``: through tests/faulty_launch.py."""
    launch = [str(ROOT / "tests" / "faulty_launch.py")] if faulty else ["-m", "dlsm.launch"]
    if faulty and procs > 1:  # see tests/test_distributed.py's _launch_cmd
        launch = ["--monitor-interval", "1", *launch]
    head = [sys.executable, *launch] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), *launch]
    return head + GIN + [x for p in params for x in ("--gin_param", p)]


def _run(cwd: Path, *params: str, procs: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(_launch_cmd(*params, procs=procs), cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=600)


def _client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def _from(parent_id: str, workdir: str) -> list[str]:
    """Sampling and evaluation only, from the reference's networks, into a checkpoint folder of its own."""
    return [f"experiment.stage1_run_id = '{parent_id}'", f"experiment.stage2_run_id = '{parent_id}'",
            f"experiment.workdir = '{workdir}'"]


def _npz(cwd: Path, workdir: str) -> dict[str, bytes]:
    out = {}
    for name in METHODS:
        (path,) = (cwd / workdir).glob(f"*/*/samples-{name}.npz")
        out[name] = path.read_bytes()
    return out


def _eval_metrics(cwd: Path, parent_id: str) -> dict[str, float]:
    c = _client(cwd)
    parent = c.get_run(parent_id)
    (ev,) = c.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`dlsm.stage` = 'evaluation'"))
    return {k: v for k, v in ev.data.metrics.items() if not k.startswith(("time/", "wall"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sampling")
    proc = _run(cwd, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = _client(cwd)
    (parent,) = c.search_runs([c.get_experiment_by_name("digits32").experiment_id],
                              filter_string="tags.`dlsm.kind` = 'parent'")
    return cwd, parent.info.run_id


def test_two_processes_sample_and_evaluate_the_one_process_images(reference):
    cwd, ref_id = reference
    proc = _run(cwd, *FAST, *_from(ref_id, ".dlsm-2"), procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr
    assert _npz(cwd, ".dlsm-2") == _npz(cwd, ".dlsm")
    c = _client(cwd)
    (two,) = c.search_runs([c.get_run(ref_id).info.experiment_id], filter_string=(
        "tags.`dlsm.kind` = 'parent' and params.`experiment.workdir` = \"'.dlsm-2'\""))
    ref, got = _eval_metrics(cwd, ref_id), _eval_metrics(cwd, two.info.run_id)
    assert "ours/fid.evaluator" in ref and got == ref
    # every unit of the 30 (3 methods x 10 classes) was drawn once, its file in the shared folder
    assert len(list((cwd / ".dlsm-2").glob("*/*/sampling/*/*.pt"))) == 30


def test_a_killed_sampling_stage_resumes_with_the_uninterrupted_images(reference):
    cwd, ref_id = reference
    params = [*FAST, *_from(ref_id, ".dlsm-k"), "experiment.stages = [@train_score_model, @train_classifiers, @sample]"]
    proc = subprocess.Popen(_launch_cmd(*params), cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    units = []
    while len(units) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        units = list((cwd / ".dlsm-k").glob("*/*/sampling/*/*.pt"))
    os.kill(proc.pid, signal.SIGKILL)  # kill -9: no handler runs, no file is closed cleanly
    proc.wait(timeout=30)
    before = {p: p.stat().st_mtime_ns for p in (cwd / ".dlsm-k").glob("*/*/sampling/*/*.pt")}
    assert 3 <= len(before) < 30, f"the kill should land in sampling: {len(before)} of 30 units on disk"
    assert not list((cwd / ".dlsm-k").glob("*/*/samples-*.npz"))

    again = _run(cwd, *params)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(before)} of 30 units are drawn" in again.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # the finished units were not drawn again
    assert len(list((cwd / ".dlsm-k").glob("*/*/sampling/*/*.pt"))) == 30
    assert _npz(cwd, ".dlsm-k") == _npz(cwd, ".dlsm")

    c = _client(cwd)
    parents = c.search_runs([c.get_run(ref_id).info.experiment_id], filter_string=(
        "tags.`dlsm.kind` = 'parent' and params.`experiment.workdir` = \"'.dlsm-k'\""))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the relaunch resumed the killed run
    ev = subprocess.run([sys.executable, "-m", "dlsm.evaluate", "--run", parents[0].info.run_id, "--gin_param",
                         FAST[0]], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    (re,) = c.search_runs([c.get_run(ref_id).info.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}' and tags.`dlsm.stage` = 're-evaluation'"))
    ref = _eval_metrics(cwd, ref_id)
    for key in ("ours/fid.evaluator", "base/precision.evaluator", "scaling/sample_acc"):
        assert re.data.metrics[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


def _stopped_together(proc: subprocess.CompletedProcess, exits: Path, code: int) -> list[str]:
    """The ``dlsm:`` lines of a 2-process launch that stopped on an error: both ranks left ``dlsm.launch`` by
    themselves with the error's exit code (tests/faulty_launch.py wrote it into ``exits``), none with a traceback."""
    assert proc.returncode != 0
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"rank0": str(code), "rank1": str(code)}, (
        proc.stderr[-3000:])
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("[rank")], proc.stderr[-3000:]
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("dlsm:")]


def test_a_full_disk_or_a_lost_store_on_one_rank_stops_both_in_one_line_and_the_relaunch_resumes(reference, tmp_path):
    """2 processes sample apart; rank 1's disk fills up at its 4th unit. Rank 0 draws its 15 units (kept), then
    both stop with rank 1's error, printed once by rank 0 (before, rank 1 left alone and rank 0 died in gloo with a
    traceback at the end of sampling, with no word of the disk). Relaunched, the 12 missing units are drawn, and
    rank 0's disk fills up while it writes the second ``.npz``: both stop again in one line. Relaunched again, rank
    0's MLflow store is lost during sampling: the samples are written, then both stop at the stage's end with rank
    0's line. The same command without a fault then writes images that are the one-process reference's, byte for
    byte."""
    cwd, ref_id = reference
    params = [*FAST, *_from(ref_id, ".dlsm-f"), "experiment.stages = [@train_score_model, @train_classifiers, @sample]"]
    outcomes = [tmp_path / "units", tmp_path / "npz", tmp_path / "store"]
    faults = [{"DLSM_FULL_RANK": "1", "DLSM_FULL_FILE": "c*-b*.pt", "DLSM_FULL_AFTER": "3"},
              {"DLSM_FULL_RANK": "0", "DLSM_FULL_FILE": "samples-*.npz", "DLSM_FULL_AFTER": "1"},
              {"DLSM_LOSE_STORE_IN": "sampling"}]
    runs = []
    for exits, fault in zip(outcomes, faults, strict=True):
        exits.mkdir()
        runs.append(subprocess.run(_launch_cmd(*params, procs=2, faulty=True), cwd=cwd, capture_output=True, text=True,
                                   env={**_env(), **fault, "DLSM_EXITS": str(exits)}, timeout=600))
    (rundir,) = [p for p in (cwd / ".dlsm-f" / "digits32").iterdir() if p.is_dir()]  # beside it: <hash>.lock
    folder = re.escape(str(rundir.relative_to(cwd)))  # as experiment.workdir gives it
    (line,) = _stopped_together(runs[0], outcomes[0], 5)  # DiskFullError's exit code
    assert re.fullmatch(rf"dlsm: error: no space left on device writing c\d-b0\.pt in {folder}/sampling/"
                        r"(base|scaling|ours) \(needs about [\d.]+ MB free, [\d.]+ MB free now\); free space and "
                        r"relaunch the same command to resume", line), line
    (line,) = _stopped_together(runs[1], outcomes[1], 5)
    assert re.fullmatch(rf"dlsm: error: no space left on device writing samples-\w+\.npz in {folder} \(needs about "
                        r"[\d.]+ MB free, [\d.]+ MB free now\); free space and relaunch the same command to resume",
                        line), line
    assert "15 of 15 units of rank 0 are drawn" in runs[1].stdout  # kept from the first launch
    warning, line = _stopped_together(runs[2], outcomes[2], 2)  # TrackingError's exit code
    assert warning.startswith("dlsm: warning: ") and "Connection refused" in warning, warning
    assert re.fullmatch(r"dlsm: error: .*: Connection refused; tracking was lost during sampling \(.+ not recorded\); "
                        r"the checkpoints on disk are kept: relaunch the same command to resume", line), line
    assert len(list(rundir.glob("sampling/*/*.pt"))) == 30 and not list(rundir.rglob("*.tmp"))
    assert len(list(rundir.glob("samples-*.npz"))) == 3  # written before the stage's end

    again = subprocess.run(_launch_cmd(*params, procs=2), cwd=cwd, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "15 of 15 units of rank 0 are drawn" in again.stdout
    assert _npz(cwd, ".dlsm-f") == _npz(cwd, ".dlsm")
