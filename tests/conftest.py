"""Test-wide settings: nothing leaves loopback, no telemetry, a local MLflow store per test."""

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ[var] = "http://127.0.0.1:9"  # any stray request fails fast on loopback
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Ray starts its workers at nice 15 (its `worker_niceness`): under pytest-xdist the other worker's launches (nice 0)
# then take the cores and a sweep test's trials wait, so the Ray tests ran last and alone at the suite's end. Same
# priority for both here.
os.environ["RAY_worker_niceness"] = "0"
# Threads per process, here and in every subprocess a test starts (torch reads OMP_NUM_THREADS): 1 by default, so
# two pytest-xdist workers fill two cores without oversubscribing them; `make test-threads` runs the numerical tests
# with another count, so a constant that holds only for one thread count (one reduction order) shows up in CI.
THREADS = int(os.environ.get("DLSM_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)


import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _threads():
    """The in-process tests use tiny tensors: one intra-op thread is faster, far faster on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
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


RAY_GROUP = "ray"  # every test that starts Ray: one Ray at a time on a 2-core machine
RAY_FILES = ("test_ray_local.py", "test_sweep.py")
RAY_TESTS = ("test_tiny_frontier_sweep_and_the_report_on_it", "test_tiny_guidance_sweep_and_the_report_on_it")
SHARED_FIXTURE_FILES = (  # a module fixture (a launched experiment, a trained evaluator) these files' tests share
    "test_cli.py", "test_digits.py", "test_distributed.py", "test_eval_metrics.py", "test_evaluator.py",
    "test_image_suite.py", "test_images.py", "test_published.py", "test_sampling_scale.py",
)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the marks into the node ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) the tests that share a module fixture run on one
    worker, so the fixture runs once; every test that starts Ray runs on one worker, one after another; every other
    test goes wherever a worker is free. Without xdist the marks do nothing."""
    for item in items:
        if item.path.name in RAY_FILES or item.originalname in RAY_TESTS:
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))
        elif item.path.name in SHARED_FIXTURE_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


def pytest_configure(config):
    """pytest 9.2 names items by ``_id``, which pytest-xdist 3.8's loadgroup does not set: every xdist_group mark is
    ignored (Ray tests two at a time, module fixtures set up twice). pyproject.toml pins pytest < 9."""
    if config.getoption("dist", "no") == "loadgroup" and int(pytest.__version__.split(".")[0]) >= 9:
        pytest.exit(f"pytest {pytest.__version__} breaks pytest-xdist's --dist loadgroup (its groups are ignored); "
                    "install pytest<9, as pyproject.toml asks", returncode=3)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Stop at once if pytest-xdist's loadgroup left a group mark out of a node id (pytest 9.2 names items by ``_id``,
    which xdist 3.8 does not set): the groups would be ignored and Ray tests would run two at a time."""
    if not getattr(session.config.option, "loadgroup", False):  # set in xdist workers only
        return
    lost = [i.nodeid for i in session.items if any(i.iter_markers("xdist_group")) and "@" not in i.nodeid]
    if lost:
        pytest.exit(f"pytest-xdist's --dist loadgroup did not apply to {len(lost)} tests (first {lost[0]}); "
                    f"pytest {pytest.__version__}: see the pytest pin in pyproject.toml", returncode=3)
