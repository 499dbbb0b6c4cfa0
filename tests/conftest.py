"""Test-wide settings: nothing leaves loopback, no telemetry, a local MLflow store per test."""

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ[var] = "http://127.0.0.1:9"  # any stray request fails fast on loopback
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
os.environ.pop("MLFLOW_TRACKING_URI", None)


import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The in-process tests use tiny tensors: one intra-op thread is faster, far faster on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process tests must not leak environment into later subprocess tests: MLflow's
    ``set_tracking_uri`` / ``set_experiment`` export MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection or DNS look-up raises and is recorded (tests of offline behaviour)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts
