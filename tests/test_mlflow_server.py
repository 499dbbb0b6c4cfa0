"""A real ``mlflow server`` on loopback, what docs/sweeps.md tells cluster users to track to (every other test tracks
to an sqlite file): a launch and a two-trial sweep record their runs, params, metrics and artifacts there; a launch
whose server is stopped for 20 s and more and started again loses nothing (the same launch on an sqlite store is the
reference); a server gone for good (for a launch whose MLflow client gives up within seconds, during the same
outage) stops the launch in one line with its checkpoints on disk, and the relaunch resumes.

The tests share one server (its own port, sqlite store and artifact folder; artifacts are uploaded through it) in
its own process group, stopped when they end however they end; each test tracks to an experiment of its own, and
the outage starts the server again however it ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

# under pytest-xdist (--dist loadgroup) the tests that share the server and the outage run on one worker, so each
# fixture runs once; the sweep runs with the other Ray tests (tests/conftest.py), against a server of its own worker
pytestmark = pytest.mark.xdist_group("mlflow_server")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMOKE = ["--gin", str(ROOT / "gin" / "moons.gin"), "--gin", str(ROOT / "gin" / "smoke.gin")]
STAGES = {"stage1-score", "stage2-ce", "stage2-total", "sampling", "evaluation", "figures"}
SLOW = "score/train.n_iters = 60"  # stage 1 runs long enough to stop the server while it trains
OUTAGE_S = 20.0
GIVE_UP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}  # MLflow's client gives up within seconds instead of about 4 minutes
START_S = 240  # a server's start-up (imports, the store's tables) on two busy cores has taken 30-45 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on 127.0.0.1 with its own sqlite store and proxied artifact folder under ``folder``; stopped
    and started again, it keeps its port, store and artifacts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it and wait until it answers; returns the seconds that took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job workers
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.folder / 'store.db'}", "--serve-artifacts",
               "--artifacts-destination", str(self.folder / "artifacts")]
        with open(self.folder / "server.log", "a") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        t0 = time.monotonic()
        while not self.answers():
            assert self.proc.poll() is None, self.log()[-3000:]
            assert time.monotonic() - t0 < START_S, f"no answer after {START_S} s\n{self.log()[-3000:]}"
            time.sleep(0.25)
        return time.monotonic() - t0

    def answers(self) -> bool:
        try:
            return requests.get(f"{self.uri}/health", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """SIGTERM to its process group (the CLI and uvicorn's worker), SIGKILL after 15 s; the port is then closed."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
        self.proc.wait()
        self.proc = None
        assert not self.answers()

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow") / "server")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def restarted(srv: Server) -> Iterator[None]:
    """The server answers again when the block ends, however it ends (the next tests use it)."""
    try:
        yield
    finally:
        if srv.proc is None:
            srv.start()


def launch_env(uri: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(ROOT), **extra)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def start_launch(cwd: Path, env: dict[str, str], name: str, *params: str) -> subprocess.Popen:
    """``python -m dlsm.launch`` moons + smoke as experiment ``name``, in the background; its output goes to
    ``cwd/out.txt`` and ``cwd/err.txt``."""
    cwd.mkdir(exist_ok=True)
    params = (f"experiment.name = '{name}'", *params)
    cmd = [sys.executable, "-m", "dlsm.launch", *SMOKE, *[x for p in params for x in ("--gin_param", p)]]
    with open(cwd / "out.txt", "w") as out, open(cwd / "err.txt", "w") as err:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)


def finish(proc: subprocess.Popen, cwd: Path, timeout: float = 420) -> tuple[int, str, str]:
    """Wait for the launch (killed after ``timeout``); (exit code, stdout, stderr)."""
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill(proc)
    return rc, (cwd / "out.txt").read_text(), (cwd / "err.txt").read_text()


def kill(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_stage(srv: Server, name: str, stage: str, proc: subprocess.Popen, cwd: Path,
                   timeout: float = 300) -> None:
    """Until the ``stage`` child run of experiment ``name`` exists on the server."""
    c, t0 = srv.client(), time.monotonic()
    while True:
        assert proc.poll() is None, f"the launch ended before {stage} started: {(cwd / 'err.txt').read_text()[-2000:]}"
        assert time.monotonic() - t0 < timeout, f"no {stage} run after {timeout} s"
        exp = c.get_experiment_by_name(name)
        if exp and c.search_runs([exp.experiment_id], filter_string=f"tags.`dlsm.stage` = '{stage}'"):
            return
        time.sleep(0.25)


def wait_for_line(path: Path, start: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until a line of the file ``path`` starts with ``start``, or the process ends."""
    t0 = time.monotonic()
    while not any(ln.startswith(start) for ln in path.read_text().splitlines()):
        if proc.poll() is not None:
            return
        assert time.monotonic() - t0 < timeout, f"no {start!r} line after {timeout} s: {path.read_text()[-2000:]}"
        time.sleep(0.25)


def artifact_paths(c, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in c.list_artifacts(run_id, path):
        out += artifact_paths(c, run_id, a.path) if a.is_dir else [a.path]
    return out


def recorded(uri: str, name: str) -> dict[str, dict]:
    """The parent run of experiment ``name`` and its child runs in the store ``uri``, by stage ('parent'): status,
    every metric's (step, value) history, params, artifact paths; the parent's run id under 'run_id'."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(name)
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent'")
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    out = {"run_id": parent.info.run_id}
    for r in [parent, *kids]:
        out[r.data.tags.get("dlsm.stage", "parent")] = {
            "id": r.info.run_id, "status": r.info.status, "start": r.info.start_time, "end": r.info.end_time,
            "metrics": {k: sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, k))
                        for k in r.data.metrics},
            "params": dict(r.data.params),
            "artifacts": sorted(artifact_paths(c, r.info.run_id)),
        }
    return out


def counts(runs: dict) -> tuple[int, int, int]:
    """(metric steps, params, artifacts) over the parent run and its child runs."""
    rs = [r for k, r in runs.items() if k != "run_id"]
    return (sum(len(h) for r in rs for h in r["metrics"].values()), sum(len(r["params"]) for r in rs),
            sum(len(r["artifacts"]) for r in rs))


def test_launch_tracks_everything_to_a_server(tmp_path, server):
    work = tmp_path / "work"
    rc, out, err = finish(start_launch(work, launch_env(server.uri), "plain"), work)
    assert rc == 0, err[-3000:]
    runs = recorded(server.uri, "plain")
    assert set(runs) - {"run_id"} == {"parent"} | STAGES
    assert all(runs[k]["status"] == "FINISHED" for k in {"parent"} | STAGES)
    parent = runs["parent"]
    assert parent["params"]["experiment.name"] == "'plain'" and parent["params"]["device"] == "cpu"
    assert parent["metrics"]["total/ce/s7.5"] and {"config/config.gin", "config/operative_config.gin"} <= set(
        parent["artifacts"])
    s1 = runs["stage1-score"]
    assert [step for step, _ in s1["metrics"]["score/loss"]] == [10, 20]  # every logged step (smoke: 20 steps)
    assert {"checkpoints/score.pt", "plots/loss.png"} <= set(s1["artifacts"]) and "num_parameters" in s1["params"]
    for loss in ("ce", "total"):
        assert f"checkpoints/classifier-{loss}.pt" in runs[f"stage2-{loss}"]["artifacts"]
    assert any(a.startswith("samples/") for a in runs["sampling"]["artifacts"])
    # the artifacts went through the server into its folder, byte for byte; nothing was tracked in ./mlruns
    (local,) = (work / ".dlsm" / "plain").glob("*/score.pt")
    (served,) = (server.folder / "artifacts").rglob(f"{runs['stage1-score']['id']}/artifacts/checkpoints/score.pt")
    assert served.read_bytes() == local.read_bytes()
    assert not (work / "mlruns").exists()
    assert "View run" not in out  # MLflow's per-run links are off (dlsm/__init__.py)


@pytest.mark.xdist_group("ray")  # one Ray at a time on two cores (tests/conftest.py)
def test_sweep_trials_track_to_a_server(tmp_path, server):
    cmd = [sys.executable, str(ROOT / "tune" / "sweep_lambda.py"), *SMOKE, "--gin_param", "sweep.cpus_per_trial = 1",
           "--gin_param", "experiment.name = 'sweep'", "--values", "0.1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(server.uri), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = server.client()
    exp = c.get_experiment_by_name("sweep")
    (sweep_run,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'sweep'")
    assert sweep_run.info.status == "FINISHED"
    assert "results.md" in artifact_paths(c, sweep_run.info.run_id)
    trials = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
    assert [t.data.params["macro.LAM"] for t in trials] == ["0.1"]
    for t in trials:
        assert t.info.status == "FINISHED" and "total/ce/s7.5" in t.data.metrics
        kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{t.info.run_id}'")
        stage2 = [k for k in kids if k.data.tags["dlsm.stage"] == "stage2-total"]
        assert stage2 and "checkpoints/classifier-total.pt" in artifact_paths(c, stage2[0].info.run_id)
    assert not (tmp_path / "mlruns").exists()


@dataclass
class Ended:
    """A launch that ended: its folder, exit code, stdout and stderr."""

    cwd: Path
    rc: int
    out: str
    err: str


@pytest.fixture(scope="module")
def outage(server, tmp_path_factory) -> dict:
    """One outage for two launches that train stage 1: the server is stopped, the launch told to give up within
    seconds ('gone', MLflow's retries set low) gives up, and 20 s after the stop the server is started again (it
    answers after its start-up); the other launch ('kept', MLflow's default retries) goes on. 'ref' is the kept launch
    on an sqlite store, run meanwhile. Returns the three :class:`Ended` launches and the times the server stopped and
    answered again."""
    tmp = tmp_path_factory.mktemp("outage")
    envs = {"ref": launch_env(None), "kept": launch_env(server.uri),
            "gone": launch_env(server.uri, **GIVE_UP)}
    names = {"ref": "outage", "kept": "outage", "gone": "gone"}
    procs = {k: start_launch(tmp / k, envs[k], names[k], SLOW) for k in envs}
    ended: dict[str, object] = {}
    try:
        with restarted(server):
            for k in ("kept", "gone"):
                wait_for_stage(server, names[k], "stage1-score", procs[k], tmp / k)
            ended["stopped"] = time.time()
            server.stop()
            wait_for_line(tmp / "gone" / "err.txt", "dlsm: warning:", procs["gone"])  # it gave up: the server is down
            time.sleep(max(0.0, OUTAGE_S - (time.time() - ended["stopped"])))
            assert procs["kept"].poll() is None, "the launch ended during the outage"
            server.start()
            ended["back"] = time.time()
    except BaseException:
        kill(*procs.values())
        raise
    print(f"the server was down {ended['back'] - ended['stopped']:.0f} s")
    for k in ("gone", "kept", "ref"):
        ended[k] = Ended(tmp / k, *finish(procs[k], tmp / k))
    return ended


def test_a_20s_outage_of_the_server_loses_nothing(outage, server):
    """MLflow's client retries through the outage (7 times, about 4 minutes in all): the launch records what the
    same launch records in sqlite."""
    kept, ref = outage["kept"], outage["ref"]
    assert kept.rc == 0, kept.err[-3000:]
    assert ref.rc == 0, ref.err[-3000:]
    assert "dlsm: warning" not in kept.err  # the retries bridged the outage: tracking was never lost
    got = recorded(server.uri, "outage")
    want = recorded(f"sqlite:///{ref.cwd / 'mlruns' / 'mlflow.db'}", "outage")
    print(f"(metric steps, params, artifacts): server {counts(got)}, sqlite {counts(want)}")
    stopped, back = outage["stopped"] * 1000, outage["back"] * 1000
    assert [k for k, r in got.items() if k != "run_id" and r["start"] < stopped and r["end"] > back], (
        "no stage ran across the outage")
    assert set(got) == set(want)
    timing = ("time/", "wall_seconds")  # every other number is the same: same seed, same machine
    for stage in set(got) - {"run_id"}:
        g, w = got[stage], want[stage]
        assert g["status"] == w["status"] == "FINISHED", stage
        assert g["artifacts"] == w["artifacts"], stage
        assert g["params"] == w["params"], stage
        assert {k: [s for s, _ in h] for k, h in g["metrics"].items()} == {
            k: [s for s, _ in h] for k, h in w["metrics"].items()}, stage
        assert {k: h for k, h in g["metrics"].items() if not k.startswith(timing)} == {
            k: h for k, h in w["metrics"].items() if not k.startswith(timing)}, stage


def test_a_server_gone_for_good_stops_in_one_line_and_the_relaunch_resumes(outage, server):
    """The launch whose MLflow client gives up within seconds of the stop: one warning, stage 1 trains to its end
    and keeps its checkpoint (nothing more is sent, even once the server is back), the launch stops in one line; with
    the server back the same command resumes the same run and finishes it."""
    import torch

    gone = outage["gone"]
    lines = [ln for ln in gone.err.splitlines() if ln.strip()]
    assert gone.rc == 2 and "Traceback" not in gone.err, gone.err[-3000:]
    assert sum(ln.startswith("dlsm: warning:") for ln in lines) == 1, gone.err[-3000:]
    assert lines[-1].startswith(f"dlsm: error: MLFLOW_TRACKING_URI={server.uri}: Connection refused; tracking was "
                                "lost during stage1-score ("), lines[-1]
    assert lines[-1].endswith("relaunch the same command to resume"), lines[-1]
    (ckpt,) = (gone.cwd / ".dlsm" / "gone").glob("*/score.pt")  # stage 1 trained to its end
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["step"] == 60
    assert not list((gone.cwd / ".dlsm" / "gone").glob("*/classifier-*.pt"))  # and the launch stopped there

    env = launch_env(server.uri, **GIVE_UP)
    rc, out, err = finish(start_launch(gone.cwd, env, "gone", SLOW), gone.cwd)  # the same command
    assert rc == 0, err[-3000:]
    runs = recorded(server.uri, "gone")
    assert f"dlsm: resuming run {runs['run_id']}" in out
    assert set(runs) - {"run_id"} == {"parent"} | STAGES
    assert all(runs[k]["status"] == "FINISHED" for k in {"parent"} | STAGES)
    assert "checkpoints/score.pt" in runs["stage1-score"]["artifacts"]


REFUSED = (  # what MLflow 3.17 raises when its retries give up
    "API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception "
    "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch "
    "(Caused by NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=1): Failed to establish a new "
    "connection: [Errno 111] Connection refused\"))"
)


def test_lost_store_or_refused_request():
    from mlflow.exceptions import MlflowException, RestException

    from dlsm.store import is_lost_store, lost_message

    assert is_lost_store(MlflowException(REFUSED))
    assert is_lost_store(MlflowException("API request to http://h/x failed with timeout exception Read timed out."))
    assert is_lost_store(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "database is locked"}))
    assert is_lost_store(requests.exceptions.ConnectionError("reset"))
    assert not is_lost_store(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "Changing param"}))
    assert not is_lost_store(MlflowException("Run 'abc' not found"))  # MLflow's own check, not the store going away
    assert not is_lost_store(ValueError("a bug"))
    uri = "http://127.0.0.1:1"
    assert lost_message(uri, MlflowException(REFUSED)).endswith(f"{uri} (the default; set MLFLOW_TRACKING_URI to use "
                                                                "another): Connection refused")
    busy = MlflowException("API request to x failed with exception ... (Caused by ResponseError('too many 503 error "
                           "responses'))")
    assert lost_message(uri, busy).endswith(": too many 503 error responses")


def test_tracker_goes_on_without_a_lost_store_and_stops_at_the_stage_end(tmp_path, monkeypatch, capsys):
    """In process, on an sqlite store whose writes start to fail as a lost server's do."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dlsm.errors import TrackingError
    from dlsm.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    tracker, trained = Tracker("lost"), []

    def refuse(*args, **kwargs):
        raise MlflowException(REFUSED)

    def reject(*args, **kwargs):
        raise MlflowException("Changing param values is not allowed", error_code=1000)  # INVALID_PARAMETER_VALUE

    with pytest.raises(TrackingError) as lost:
        with tracker.parent("p", "h", None) as parent_id:
            tracker.log_params({"a": 1})
            with tracker.stage(parent_id, "stage1-score") as (stage_id, _):
                tracker.log_metrics({"loss": 1.0}, 1)
                monkeypatch.setattr(tracker.client, "log_batch", refuse)
                for step in (2, 3):  # training goes on
                    tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
                    trained.append(step)
                tracker.log_text("x", "a.txt")  # skipped, though this write would work
    assert trained == [2, 3]
    assert str(lost.value).endswith(": Connection refused; tracking was lost during stage1-score (4 metric values, "
                                    "1 artifacts not recorded); the checkpoints on disk are kept: relaunch the same "
                                    "command to resume")
    assert capsys.readouterr().err.count("dlsm: warning:") == 1
    assert mlflow.active_run() is None  # both runs were ended, as FAILED: a relaunch resumes them
    c = MlflowClient(tracker.uri)
    assert [c.get_run(r).info.status for r in (parent_id, stage_id)] == ["FAILED", "FAILED"]
    assert [m.step for m in c.get_metric_history(stage_id, "loss")] == [1]
    assert c.list_artifacts(stage_id) == []

    monkeypatch.setattr(tracker.client, "log_batch", reject)
    tracker.lost = None
    with pytest.raises(MlflowException, match="Changing param"), tracker.parent("q", "h2", None):
        tracker.log_metrics({"loss": 1.0}, 1)  # a request the store refuses stays an error of the code


def test_the_training_curves_read_nothing_from_a_lost_store(tmp_path, monkeypatch, capsys):
    """Stage 2's training-curve figure reads MLflow's metric histories: (step, value) lists of the ``track/`` keys
    from a live store; None (no figure, one warning, no error) once the store is lost; a refusal stays an error."""
    from mlflow.exceptions import MlflowException

    from dlsm.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    tracker = Tracker("curves")
    with tracker.parent("p", "h", None) as parent_id, tracker.stage(parent_id, "stage2-ce") as (stage_id, _):
        for step, v in ((20, 0.5), (10, 0.7)):
            tracker.log_metrics({"track/acc": v, "track/nll": 2 * v, "loss": 9.0}, step)
    assert tracker.metric_histories(stage_id, "track/") == {"track/acc": [(10, 0.7), (20, 0.5)],
                                                            "track/nll": [(10, 1.4), (20, 1.0)]}

    def refuse(*args, **kwargs):
        raise MlflowException(REFUSED)

    def missing(*args, **kwargs):
        raise MlflowException("no such run")  # the store's own answer: not lost

    monkeypatch.setattr(tracker.client, "get_run", missing)
    with pytest.raises(MlflowException, match="no such run"):
        tracker.metric_histories(stage_id, "track/")
    assert tracker.lost is None
    monkeypatch.setattr(tracker.client, "get_run", refuse)
    assert tracker.metric_histories(stage_id, "track/") is None
    assert tracker.lost is not None and capsys.readouterr().err.count("dlsm: warning:") == 1
    assert tracker.metric_histories(stage_id, "track/") is None  # no second try once lost
