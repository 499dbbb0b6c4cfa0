"""Bad input of every kind prints exactly one line (``dlsm: error: ...``) and exits non-zero, before
anything trains and (for sweeps) before Ray starts. Parse-time cases run ``dlsm.launch.main`` and
``dlsm.sweep.driver.main`` in this process; MLflow-store cases run ``python -m dlsm.launch`` and must fail fast."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from budget import FAST_FAIL_S, took  # tests/, on sys.path
from cases import run_cases

from dlsm import launch
from dlsm.errors import ConfigError
from dlsm.sweep import driver as sweep_cli

ROOT = Path(__file__).resolve().parent.parent
MOONS = str(ROOT / "gin" / "moons.gin")
# small enough that a case which wrongly passes every check ends in seconds instead of hanging the suite
TINY = [
    "score/train.n_iters = 4", "classifier/train.n_iters = 4", "score/train.batch_size = 16",
    "classifier/train.batch_size = 16", "NUM_SCALES = 3", "STEPS_PER_SCALE = 1", "sample.n_per_class = 8",
    "two_moons.n = 64", "score_error_metrics.n_points = 8", "classifier_metrics.n_points = 8",
    "posterior_field_figure.grid = 3", "figures.plots = []",
]


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("dlsm: error: "), lines[0]
    return lines[0].removeprefix("dlsm: error: ")


def launch_main(capsys, *bindings: str, gin: str = MOONS) -> tuple[int, str]:
    argv = ["--gin", gin] + [x for b in [*TINY, *bindings] for x in ("--gin_param", b)]
    rc = launch.main(argv)
    return rc, capsys.readouterr().err


PARSE_TIME = [
    (["LAM = 'big'"], "LAM = 'big': total_loss.lam expects float"),
    (["ALPHA = %B", "B = 'x'"], "B = 'x': experiment.alpha expects float"),  # a macro through a macro
    (["experiment.alpha = 1.0", "experiment.sampling_methods = {'ours': ('total', %ALPHA)}", "ALPHA = 'x'"],
     "ALPHA = 'x': experiment.sampling_methods['ours'][1] expects float"),  # a macro inside a dict and a tuple
    (["EVAL_SIGMAS = (0.5, %S)", "S = 'q'"], "S = 'q': score_error_metrics.sigmas[1] expects float"),
    (["SEED = 1.5"], "SEED = 1.5: experiment.seed expects int"),
    (["score/train.n_iters = 'abc'"], "score/train.n_iters = 'abc': expected int"),
    (["LAM = -0.5"], "LAM = -0.5: total_loss.lam must be a finite number >= 0"),
    (["LAM = 1e999"], "LAM = inf: total_loss.lam must be a finite number >= 0"),
    (["total_loss.lam = -1"], "total_loss.lam = -1: must be a finite number >= 0"),
    (["ALPHA = -1.0"], "ALPHA = -1.0: experiment.alpha must be a finite number >= 0"),
    (["experiment.sampling_methods = {'ours': ('total', -2.0)}"],
     "experiment.sampling_methods = {'ours': ('total', -2.0)}: the alpha of 'ours' must be a finite number >= 0"),
    (["experiment.alpha = 1.0", "experiment.sampling_methods = {'ours': ('total', %ALPHA)}", "ALPHA = -2.0"],
     "experiment.sampling_methods = {'ours': ('total', %ALPHA)} with ALPHA = -2.0: the alpha of 'ours' must be"),
    (["experiment.alpha = %LAMM"],
     "%LAMM is not defined (used by experiment.alpha); did you mean %LAM? define it, e.g. --gin_param 'LAMM = ...'"),
    (["LAMM = 0.5"], "--gin_param 'LAMM = 0.5': no binding uses %LAMM; did you mean LAM?"),
    (["ALPHA = %B", "B = %ALPHA"], "macros refer to each other in a cycle: %ALPHA -> %B -> %ALPHA"),
    (["score/torch.optim.Adam.lr = -1e-3"], "score/torch.optim.Adam.lr = -0.001: must be a finite number >= 0"),
    (["LANGEVIN_EPS = -1.0"], "LANGEVIN_EPS = -1.0: noise_schedule.eps must be a finite number > 0"),
    (["two_moons.n = 0"], "two_moons.n = 0: must be >= 1"),
    (["ScoreMLP.hiden = 3"], "--gin_param 'ScoreMLP.hiden = 3': Configurable 'ScoreMLP' doesn't have a parameter"),
    (["sample.n_per_class = 0"],
     "sample.n_per_class = 0: must be a positive integer, a dict {class: positive integer}, or None"),
    (["EvaluatorSettings.n_iters = 'abc'"], "EvaluatorSettings.n_iters = 'abc': expected int"),  # a class's fields
    (["evaluator_network.n_iters = 'abc'"], "EvaluatorSettings.n_iters = 'abc': expected int"),  # renamed binding
    (["cas/EvaluatorSettings.width = 0"], "cas/EvaluatorSettings.width = 0: must be an integer >= 1"),
    (["image_metrics.cas_n_iters = 0"], "cas/EvaluatorSettings.n_iters = 0: must be an integer >= 1"),
    (["EvaluatorSettings.batch_size = 1"], "EvaluatorSettings.batch_size = 1: must be an integer >= 2 (for BatchNorm)"),
]


@pytest.mark.parametrize("bindings,expected", PARSE_TIME, ids=[e[:40] for _, e in PARSE_TIME])
def test_bad_binding_is_one_line(tmp_path, monkeypatch, capsys, bindings, expected):
    monkeypatch.chdir(tmp_path)
    rc, err = launch_main(capsys, *bindings)
    assert rc == 2
    assert one_error_line(err).startswith(expected)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / ".dlsm").exists()  # failed before tracking


def test_good_macros_in_nested_values_pass_the_checks():
    from dlsm import components  # noqa: F401
    from dlsm.config import parse_config

    parse_config([MOONS], ["experiment.alpha = 1.0", "experiment.sampling_methods = {'ours': ('total', %A)}",
                           "A = %B", "B = 2", "EVAL_SIGMAS = (0.5, %S)", "S = 7.5", "LAM = 0"])
    for f in ("moons.gin", "moons_table1.gin", "moons_ablation.gin"):  # the shipped files stay valid
        parse_config([str(ROOT / "gin" / f)], [])


def test_configs_saved_before_a_rename_parse_and_mean_the_same(tmp_path):
    """Renamed bindings (dlsm.config.RENAMED_BINDINGS) in a saved operative config and on the command line are read
    under their new names; other statements and line numbers are left as they were."""
    import gin

    from dlsm import components  # noqa: F401
    from dlsm.config import parse_config
    from dlsm.eval.evaluator import EvaluatorSettings

    def cas_settings() -> EvaluatorSettings:
        with gin.config_scope("cas"):
            return EvaluatorSettings()

    try:
        for saved in ("operative_config_ba2b850_moons.gin", "operative_config_ba2b850_digits_smoke.gin"):
            parse_config([str(ROOT / "tests" / "data" / saved)], [])
        # evaluator_network.n_iters = 5 and image_metrics.cas_n_iters = 5 (cas_augment = False), the rest defaults
        assert EvaluatorSettings() == EvaluatorSettings(seed=0, n_iters=5, batch_size=64, lr=2e-3, augment=False,
                                                        width=16, depth=1)
        assert cas_settings().n_iters == 5 and not cas_settings().augment
        parse_config([MOONS], ["evaluator_network.width = 32", "s/image_metrics.cas_n_iters = 7",
                               "image_metrics.cas_augment = True"])
        assert EvaluatorSettings().width == 32
        assert cas_settings() == EvaluatorSettings(seed=0, n_iters=200, batch_size=64, lr=2e-3, augment=True, width=32,
                                                   depth=1)
        with gin.config_scope("s"):  # a scope in front of the old binding stays in front of the new one
            assert cas_settings().n_iters == 7 and EvaluatorSettings().n_iters == 200
        old = tmp_path / "old.gin"  # a renamed binding before an error: the error keeps its line
        old.write_text("# saved\nevaluator_network.width = 8  # evaluator_network.depth = 2\nScoreMLP.hiden = 3\n")
        with pytest.raises(ConfigError, match=f"^{re.escape(str(old))}:3: Configurable 'ScoreMLP' doesn't have a "):
            parse_config([str(old)], [])
        old.write_text("image_metrics:\n    cas_n_iters = 3\n")  # a block is not rewritten: gin's error says how
        with pytest.raises(ConfigError, match=r"named 'cas_n_iters'. \(renamed: bind cas/EvaluatorSettings.n_iters\)"):
            parse_config([str(old)], [])
    finally:
        gin.clear_config()


def test_bad_gin_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    binary = tmp_path / "binary.gin"
    binary.write_bytes(b"\xff\xfe LAM = 1\n")
    empty = tmp_path / "empty.gin"
    empty.write_text("# nothing\n")
    cases = [
        (str(ROOT / "gin"), f"--gin {ROOT / 'gin'} is a folder; give a .gin file, e.g. {ROOT / 'gin'}/moons"),
        (str(binary), f"{binary}: not a text gin file (invalid start byte at byte 0)"),
        ("missing.gin", "gin file missing.gin not found; check the path given to --gin"),
    ]
    for gin, expected in cases:
        assert launch.main(["--gin", gin]) == 2
        assert one_error_line(capsys.readouterr().err).startswith(expected), gin
    assert launch.main(["--gin", str(empty)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "Required bindings for `experiment` not provided in config: ['dataset', 'score_model', 'classifier']; "
        "bind them in the gin file or with --gin_param")


def test_traceback_flag_shows_the_error_itself(tmp_path, monkeypatch):
    from dlsm.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="LAM = 'big': total_loss.lam expects float"):
        launch.main(["--gin", MOONS, "--gin_param", "LAM = 'big'", "--traceback"])


def test_workdir_and_reused_run_ids_fail_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    cases = [
        ("experiment.workdir = 'afile'",
         "experiment.workdir = 'afile': cannot create or write this folder (a file is in the way)"),
        ("experiment.stage1_run_id = 'nope'",
         f"experiment.stage1_run_id: no MLflow run 'nope' in sqlite:///{tmp_path}/mlruns/mlflow.db"),
        ("experiment.stage2_run_id = 'nope'",
         f"experiment.stage2_run_id: no MLflow run 'nope' in sqlite:///{tmp_path}/mlruns/mlflow.db"),
    ]
    for binding, expected in cases:
        rc, err = launch_main(capsys, binding)
        assert rc == 2 and one_error_line(err).startswith(expected), err
    assert not list(tmp_path.rglob("*.pt"))  # nothing trained


def tracking_cases(tmp: Path) -> list[tuple[str, str]]:
    (tmp / "afile").write_text("")
    (tmp / "notes.db").write_text("not a database\n")
    return [
        ("sqlite:////proc/nope/m.db", "MLFLOW_TRACKING_URI=sqlite:////proc/nope/m.db: cannot create the folder "
                                      "/proc/nope for the database (No such file or directory)"),
        (f"sqlite:///{tmp}/afile/m.db", f"MLFLOW_TRACKING_URI=sqlite:///{tmp}/afile/m.db: cannot create the folder "
                                        f"{tmp}/afile for the database (File exists)"),
        ("sqlite:////sys/m.db", "MLFLOW_TRACKING_URI=sqlite:////sys/m.db: cannot write in /sys ("),  # even as root
        (f"sqlite:///{tmp}/notes.db", f"MLFLOW_TRACKING_URI=sqlite:///{tmp}/notes.db: {tmp}/notes.db is not an "
                                      "SQLite database"),
        ("http://127.0.0.1:9/", "MLFLOW_TRACKING_URI=http://127.0.0.1:9/: cannot reach the MLflow server "
                                "(Connection refused); start it (mlflow server) or unset MLFLOW_TRACKING_URI"),
        ("foo://bar", "MLFLOW_TRACKING_URI=foo://bar: MLflow cannot track to a foo:// URI"),
    ]


def test_unusable_tracking_store_is_one_fast_line(tmp_path):
    """Each store through ``dlsm.launch.main`` in a new interpreter (tests/cases.py: its start-up paid once): one
    line, and fast (no MLflow retries: the http case once took minutes)."""
    cases = tracking_cases(tmp_path)
    argv = ["--gin", MOONS] + [x for b in TINY for x in ("--gin_param", b)]
    results = run_cases([{"cwd": tmp_path / f"case{i}", "argv": argv, "env": {"MLFLOW_TRACKING_URI": uri}}
                         for i, (uri, _) in enumerate(cases)])
    for (uri, expected), result in zip(cases, results, strict=True):
        assert one_error_line(result["err"]).startswith(expected) and result["rc"] == 2, uri
        assert result["wall_s"] < FAST_FAIL_S, (uri, result["wall_s"])


def sweep_main(capsys, argv: list[str], **defaults) -> tuple[int, str, str]:
    rc = sweep_cli.main(argv, **defaults)
    out = capsys.readouterr()
    return rc, out.out, out.err


LAMBDA = {"param": "LAM", "values": ["0.1"], "share": "stage1", "prog": "tune/sweep_lambda.py"}
SWEEP_CASES = [
    (["--values", "0.1", "abc"], LAMBDA, "--values abc: LAM = 'abc': total_loss.lam expects float"),
    (["--values", "0.1", "-1"], LAMBDA, "--values -1: LAM = -1: total_loss.lam must be a finite number >= 0"),
    (["--values", "0.1", "0.10"], LAMBDA, "--values: 0.10 is given twice; each value is one trial"),
    (["--values", "1", "-1"], {"param": "ALPHA", "share": "stage2"},
     "--values -1: ALPHA = -1: experiment.alpha must be a finite number >= 0"),
    (["--param", "LAMM", "--values", "0.1"], {}, "--param LAMM --values 0.1: no binding uses %LAMM; did you mean LAM?"),
    (["--param", "total_loss.lamm", "--values", "0.1"], {},
     "--param total_loss.lamm --values 0.1: Configurable 'total_loss' doesn't have a parameter named 'lamm'"),
    (["--param", "sample.n_per_class", "--values", "8", "0"], {},  # every value is checked
     "--values 0: sample.n_per_class = 0: must be a positive integer, a dict {class: positive integer}, or None"),
    (["--param", "train_classifiers.seeds", "--values", "1", "0"], {},
     "--values 0: train_classifiers.seeds = 0: must be >= 1"),
    (["--values", "0.1", "--gin_param", "sweep.mode = 'best'"], LAMBDA, "sweep.mode must be 'min' or 'max'"),
]


@pytest.mark.parametrize("argv,defaults,expected", SWEEP_CASES, ids=[e[:30] for _, _, e in SWEEP_CASES])
def test_bad_sweep_input_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys, argv, defaults, expected):
    monkeypatch.chdir(tmp_path)  # no --gin: the project's gin/moons.gin is found from any folder
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored after the test
    rc, out, err = sweep_main(capsys, argv, **defaults)
    assert rc == 2
    assert one_error_line(err).startswith(expected)
    assert not out and not list(tmp_path.iterdir())  # no ray_results, no MLflow store, no checkpoints


def test_sweep_resume_with_nothing_to_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, _, err = sweep_main(capsys, ["--values", "0.1", "--resume"], **LAMBDA)
    assert rc == 2
    assert one_error_line(err) == (f"--resume: no interrupted sweep moons-sweep-LAM in sqlite:///{tmp_path}/mlruns/"
                                   "mlflow.db; run without --resume to start it")
    assert not (tmp_path / "ray_results").exists() and not list(tmp_path.rglob("*.pt"))


def test_sweep_script_from_another_folder(tmp_path):
    """The default gin file is the project's, wherever the script runs; the tracking store is checked
    (one fast line) before the shared stage trains or Ray starts."""
    cmd = [sys.executable, str(ROOT / "tune" / "sweep_lambda.py"), "--values", "0.1", "0.5"]
    cmd += [x for b in TINY for x in ("--gin_param", b)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9/"}
    with took() as t:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert t.wall_s < FAST_FAIL_S
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert one_error_line(proc.stderr).startswith("MLFLOW_TRACKING_URI=http://127.0.0.1:9/: cannot reach the MLflow")
    assert "Ray" not in proc.stdout + proc.stderr and not list(tmp_path.iterdir())


@pytest.fixture
def http_server():
    """A loopback HTTP server whose /health answers with the status the test sets."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        status = 200
        paths: list[str] = []

        def do_GET(self):  # noqa: N802
            Handler.paths.append(self.path)
            self.send_response(Handler.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Handler
    server.shutdown()
    server.server_close()


def test_http_probe_passes_a_live_server_and_fails_fast_otherwise(http_server, monkeypatch):
    import socket

    from dlsm import store, tracking
    from dlsm.errors import TrackingError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "set")  # messages then name MLFLOW_TRACKING_URI
    url, handler = http_server
    assert tracking.check_tracking_uri(url + "/") == url + "/"  # through NO_PROXY, not the test's dead proxy
    assert handler.paths == ["/health"]
    handler.status = 404  # a server that is not MLflow's still answers: MLflow itself reports what is wrong
    tracking.check_tracking_uri(url + "/x")
    handler.status = 503
    with pytest.raises(TrackingError, match=rf"^MLFLOW_TRACKING_URI={url}/y: the MLflow server answered HTTP 503"):
        tracking.check_tracking_uri(url + "/y")

    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    monkeypatch.setattr(store, "PROBE_TIMEOUT_S", 0.5)
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match="did not answer within 0.5 s"):
        tracking.check_tracking_uri(f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert time.perf_counter() - t0 < 3
    silent.close()
