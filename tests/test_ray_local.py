"""Ray as the project starts it: loopback only (every process traced with strace), joining an existing
``ray start --head`` cluster with token authentication, and a trial whose worker is killed mid-run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from budget import FAST_FAIL_S, took  # tests/, on sys.path

from dlsm.sweep.cluster import LOCAL_ENV, is_loopback_address, ray_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ["sweep.cpus_per_trial = 1"]  # on top of gin/smoke.gin: the sweep scripts take it like launch does
PROXY_PORT = 9  # tests/conftest.py points every proxy at 127.0.0.1:9: a connect there is an HTTP request elsewhere


def sweep_cmd(*args: str, params: Iterable[str] = TINY) -> list[str]:
    cmd = [sys.executable, str(ROOT / "tune" / "sweep_lambda.py"), "--gin", str(ROOT / "gin" / "moons.gin"),
           "--gin", str(ROOT / "gin" / "smoke.gin")]
    return cmd + [x for p in params for x in ("--gin_param", p)] + list(args)


def client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def trial_runs(cwd: Path) -> list:
    c = client(cwd)
    exp = c.get_experiment_by_name("moons")
    (sweep_run,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'sweep'")
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")


# -- the strace guard ---------------------------------------------------------------------------
_CALL = re.compile(r"^(\d+)\s+(connect|bind|listen|sendto|sendmsg)\((\d+)(.*)$")
_V4 = re.compile(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)')
_V6 = re.compile(r'sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6, "([^"]+)"')
_EXEC = re.compile(r'^(\d+)\s+execve\("([^"]+)"')


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


def network_violations(trace: str) -> tuple[list[str], int, set[str]]:
    """(violations, loopback connects, programs run) of an ``strace -f`` log.

    A violation is a connect or sendto to a non-loopback IP address, a connect to the dead proxy port
    (an HTTP request for a non-loopback host), or a listen on a socket bound to a non-loopback or
    wildcard address."""
    bad: list[str] = []  # "pid call ip:port"
    n_loop, programs, bound = 0, set(), {}
    for line in trace.splitlines():
        if m := _EXEC.match(line):
            programs.add(Path(m.group(2)).name)
            continue
        m = _CALL.match(line)
        if not m:
            continue
        pid, call, fd, rest = m.groups()
        addr = _V4.search(rest) or _V6.search(rest)
        if call == "listen":
            ip, port = bound.get((pid, fd), ("127.0.0.1", 0))
            if not _loopback(ip):
                bad.append(f"{pid} listen {ip}:{port}")
            continue
        if addr is None:
            continue  # AF_UNIX, AF_NETLINK, or a sendto on a connected socket
        port, ip = int(addr.group(1)), addr.group(2)
        if call == "bind":
            bound[(pid, fd)] = (ip, port)
        elif not _loopback(ip):
            bad.append(f"{pid} {call} {ip}:{port}")
        elif port == PROXY_PORT and call == "connect":
            bad.append(f"{pid} proxy {ip}:{port}")  # an HTTP request for a non-loopback host
        elif call == "connect":
            n_loop += 1
    return bad, n_loop, programs


def test_network_violations_known_answers():
    trace = "\n".join([
        '10 execve("/venv/bin/raylet", ["raylet"], 0x1 /* 3 vars */) = 0',
        '10 connect(3, {sa_family=AF_INET, sin_port=htons(6379), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '10 connect(4, {sa_family=AF_UNIX, sun_path="/tmp/ray/s"}, 110) = 0',
        '11 connect(5, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("8.8.8.8")}, 16) = 0',
        '11 connect(6, {sa_family=AF_INET6, sin6_port=htons(80), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "::ffff:192.0.2.2", &sin6_addr), sin6_scope_id=0}, 28) = -1 EINPROGRESS',
        '12 bind(7, {sa_family=AF_INET6, sin6_port=htons(0), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "::", &sin6_addr), sin6_scope_id=0}, 28) = 0',
        '12 listen(7, 128) = 0',
        '12 bind(8, {sa_family=AF_INET, sin_port=htons(0), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '12 listen(8, 128) = 0',
        '13 sendto(9, "x", 1, 0, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.0.53")}, 16) = 1',
        '13 sendto(9, "x", 1, 0, NULL, 0) = 1',
        '14 connect(3, {sa_family=AF_INET, sin_port=htons(9), sin_addr=inet_addr("127.0.0.1")}, 16) = -1',
    ])
    bad, n_loop, programs = network_violations(trace)
    assert n_loop == 1 and programs == {"raylet"}
    assert bad == ["11 connect 8.8.8.8:53", "11 connect ::ffff:192.0.2.2:80", "12 listen :::0",
                   "13 sendto 10.0.0.53:53", "14 proxy 127.0.0.1:9"]


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _strace_works(), reason="needs strace (.ci/run installs it)")
def test_default_sweep_stays_on_loopback(tmp_path):
    trace = tmp_path / "trace.txt"
    cmd = ["strace", "-f", "-qq", "-e", "trace=connect,bind,listen,sendto,sendmsg,execve", "-o", str(trace),
           *sweep_cmd("--values", "0.1")]  # one trial: a trial worker is traced like the rest
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # the project must set what it needs
    env.update(PYTHONPATH=str(ROOT), RAY_worker_niceness="0")  # scheduling only (tests/conftest.py)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad, n_loop, programs = network_violations(trace.read_text())
    assert not bad, "\n".join(bad[:20])
    assert {"raylet", "gcs_server"} <= programs, programs  # Ray's processes were traced, not just the driver
    assert n_loop > 20, n_loop
    assert "dashboard.py" not in trace.read_text()  # no dashboard process unless sweep.dashboard = True
    assert len([t for t in trial_runs(tmp_path) if t.info.status == "FINISHED"]) == 1


def test_ray_env_keeps_ray_home_and_loopback_detection():
    local, remote = ray_env(local=True), ray_env(local=False)
    # values Ray's source compares with: usage_lib ("0"), ray_constants.env_bool ("0" is false)
    assert local["RAY_USAGE_STATS_ENABLED"] == "0" and local["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert is_loopback_address(local["RAY_USAGE_STATS_REPORT_URL"].split("//")[1].rstrip("/"))
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in remote  # a remote cluster must see this node's real IP
    assert set(LOCAL_ENV) - set(remote) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    assert [is_loopback_address(a) for a in ("127.0.0.1:6379", "localhost:1", "[::1]:6379", "ray://127.0.0.2:1",
                                             "192.0.2.7:6379", "10.1.2.3:80")] == [True, True, True, True,
                                                                                  False, False]


# -- an existing cluster ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    """A loopback Ray head node started with ``ray start --head --block`` (token authentication on, its
    token in Ray's default place, ``$HOME/.ray/auth_token``), in its own process group."""
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, **LOCAL_ENV, "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port = _free_port()
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 90
    while "Ray runtime started" not in (tmp_path / "head.log").read_text():
        assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-2000:]
        time.sleep(0.5)
    yield {"address": f"127.0.0.1:{port}", "home": home, "log": tmp_path / "head.log"}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_sweep_joins_an_existing_cluster_by_address(tmp_path, head_node):
    assert "Token authentication is enabled" in head_node["log"].read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(head_node["home"]))  # the head's machine: token in its default place
    address = head_node["address"]
    proc = subprocess.run(sweep_cmd("--values", "0.1", "--address", address), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trial,) = trial_runs(tmp_path)
    assert trial.info.status == "FINISHED" and trial.data.tags["dlsm.ray_cluster"] == address  # ran on that cluster

    # another machine, no token yet: one line, within seconds, naming where the token comes from
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with took() as t:
        proc = subprocess.run(sweep_cmd("--values", "0.1", "--address", address), cwd=elsewhere,
                              env={**env, "HOME": str(elsewhere)}, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"dlsm: error: --address {address}: the Ray cluster requires its authentication")
    assert "~/.ray/auth_token" in lines[0] and "RAY_AUTH_TOKEN_PATH" in lines[0]
    assert t.wall_s < FAST_FAIL_S and not list(elsewhere.rglob("*.pt"))  # nothing trained before the check


def test_unreachable_address_is_one_line_within_seconds(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with took() as t:
        proc = subprocess.run(sweep_cmd("--values", "0.1", "--address", f"127.0.0.1:{_free_port()}"), cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "cannot reach the Ray cluster" in lines[0], proc.stderr
    assert t.wall_s < FAST_FAIL_S


# -- faults ------------------------------------------------------------------------------------------
def _trial_worker_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "ray::ImplicitFunc"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_trial_whose_worker_is_killed_is_retried_and_the_sweep_finishes(tmp_path):
    params = [*TINY, "classifier/train.n_iters = 600", "classifier/train.ckpt_every = 20",
              "classifier/train.log_every = 200", "sweep.max_concurrent_trials = 1", "sweep.max_failures = 1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = _trial_worker_pids()
    proc = subprocess.Popen(sweep_cmd("--values", "0.1", params=params), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, victim = time.time() + 300, None
    while time.time() < deadline and victim is None:  # the first trial's worker, once stage 2 has a checkpoint
        if list((tmp_path / ".dlsm").rglob("classifier*.pt")) and (pids := _trial_worker_pids() - before):
            victim = min(pids)
        time.sleep(0.3)
    assert victim is not None, "no trial worker with a stage-2 checkpoint appeared"
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "0 of 1 trials failed" in out, out[-2000:]
    (trial,) = trial_runs(tmp_path)  # the killed trial's retry went on in the same run: not doubled
    assert trial.data.params["macro.LAM"] == "0.1" and trial.info.status == "FINISHED"


def test_dashboard_without_its_packages_is_one_line(tmp_path):
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is None:
        pytest.skip("ray[default] is installed here: the dashboard can start")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(sweep_cmd("--values", "0.1", params=[*TINY, "sweep.dashboard = True"]), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "sweep.dashboard = True needs Ray's dashboard packages" in lines[0] and "ray[default]" in lines[0]
    assert not list(tmp_path.rglob("*.pt"))  # before any stage is trained


def test_connect_starts_a_new_loopback_instance_never_a_found_one(monkeypatch):
    """``ray.init(address=None)`` joins a ``ray start`` cluster recorded in /tmp/ray (even a stale one): the
    project's local Ray must always be a new instance, on loopback, without the API-server process."""
    import ray
    from ray._private import node

    from dlsm.sweep import cluster

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        api = node.Node.start_api_server  # what a head node would call while ray.init runs
        fake = type("N", (), {})()
        api(fake, include_dashboard=False, raise_on_failure=False)
        seen["webui"] = fake._webui_url
        return type("Ctx", (), {"dashboard_url": None})()

    from ray._private import ray_constants

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("R", (), {"gcs_address": "127.0.0.1:1"})())
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    saved = dict(os.environ)
    try:
        for var in [*LOCAL_ENV, "RAY_ADDRESS", "RAY_AUTH_MODE"]:
            os.environ.pop(var, None)
        conn = cluster.connect(None)
        env_after = dict(os.environ)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert seen["address"] == "local" and seen["_node_ip_address"] == "127.0.0.1"
    assert seen["include_dashboard"] is False and seen["webui"] is None  # no API-server process was started
    assert node.Node.start_api_server is not None and "start_api_server" in node.Node.__dict__
    assert conn.local and all(env_after[k] == v for k, v in LOCAL_ENV.items())
    assert ray_constants.ENABLE_RAY_CLUSTER is False  # Ray had been imported before: its constant is set too
    assert seen["runtime_env"]["env_vars"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
