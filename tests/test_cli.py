"""End to end through ``python -m dlsm.launch``: MLflow runs, params, metrics, artifacts, errors, resume."""

from __future__ import annotations

import math
import os
import re
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
    "sample.n_per_class = 64",
    "two_moons.n = 400",
    "score_error_metrics.n_points = 64",
    "classifier_metrics.n_points = 64",
    "posterior_field_figure.grid = 8",
]


def launch(cwd: Path, *extra: str, gin_files=(MOONS,), params=TINY, timeout: int = 300, env: dict | None = None,
           **kw):
    cmd = [sys.executable, "-m", "dlsm.launch"]
    for g in gin_files:
        cmd += ["--gin", g]
    for p in params:
        cmd += ["--gin_param", p]
    cmd += list(extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
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
    assert set(kids) == {"stage1-score", "stage2-ce", "stage2-total", "sampling", "evaluation", "figures"}
    assert all(k.info.status == "FINISHED" for k in kids.values())

    # params: the gin bindings (with macros resolved by name) and the resolved schedule
    p = parent.data.params
    assert p["total_loss.lam"] == "%LAM" and p["macro.LAM"] == "0.125"
    assert p["score/train.n_iters"] == "60"
    assert float(p["schedule.num_scales"]) == 8
    assert kids["stage2-total"].data.params["method"] == "total"

    # metrics: per-step losses in the stage runs, finite final metrics in parent and evaluation run
    hist = c.get_metric_history(kids["stage1-score"].info.run_id, "score/loss")
    assert [m.step for m in hist] == [20, 40, 60]
    assert all(math.isfinite(m.value) for m in hist)
    assert len(c.get_metric_history(kids["stage2-total"].info.run_id, "total/loss")) == 2
    final = kids["evaluation"].data.metrics
    for key in ("ce/c0/D_P/s7.5", "total/c1/D_L/s0.5", "oracle/c0/precision", "total/c1/recall",
                "ce/acc/s2", "total/c0/sw1"):
        assert math.isfinite(final[key]), key
    assert set(final) - {"wall_seconds"} <= set(parent.data.metrics)

    # artifacts: checkpoints (EMA included), samples, plots, configs
    assert "checkpoints/score.pt" in artifact_paths(c, kids["stage1-score"].info.run_id)
    assert "checkpoints/classifier-total.pt" in artifact_paths(c, kids["stage2-total"].info.run_id)
    sampling = artifact_paths(c, kids["sampling"].info.run_id)
    assert {"samples/samples-ce.npz", "samples/samples-oracle.npz"} <= sampling
    assert "plots/posterior_field_figure.png" in artifact_paths(c, kids["figures"].info.run_id)
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


def test_tiny_run_artifacts_have_the_right_content(tiny_run, tmp_path):
    """Open every kind of artifact and check what is in it, not only that it exists."""
    import gin
    import numpy as np
    import torch
    from PIL import Image

    from dlsm import components  # noqa: F401  (registers the configurables config.gin names)
    from dlsm.config import bindings_as_params, parse_config
    from dlsm.data.points import two_moons
    from dlsm.nets.mlp import ClassifierMLP
    from dlsm.train.loop import load_checkpoint

    cwd, _ = tiny_run
    c = client(cwd)
    (parent,) = parents(c)
    kids = runs_by_stage(c, parent.info.run_id)

    # config.gin parses back (through the launcher's own parser) to exactly the bindings logged as params
    cfg = Path(c.download_artifacts(parent.info.run_id, "config/config.gin", str(tmp_path)))
    try:
        parse_config([str(cfg)], [])
        back = bindings_as_params()
    finally:
        gin.clear_config()
    params = parent.data.params
    assert back == {k: params[k] for k in back}
    assert set(params) - set(back) == {f"schedule.{k}" for k in ("eps", "n_steps_each", "num_scales",
                                                                  "sigma_max", "sigma_min")} | {"device"}
    assert params["device"] == "cpu"  # gin/moons.gin pins the CPU
    assert back["score/train.n_iters"] == "60" and back["macro.NUM_SCALES"] == "8"

    # samples: one (n_samples, 2) float32 array per class label, finite; the oracle's lie on their own moon
    data = two_moons(400)
    for m in ("ce", "total", "oracle"):
        local = c.download_artifacts(kids["sampling"].info.run_id, f"samples/samples-{m}.npz", str(tmp_path))
        with np.load(local) as z:
            assert sorted(z.files) == ["c0", "c1"], m
            arrays = {k: z[k] for k in z.files}
        for label, x in arrays.items():
            assert x.shape == (64, 2) and x.dtype == np.float32 and np.isfinite(x).all(), (m, label)
        if m == "oracle":  # Parzen-exact score at sigma_L = 0.01: every sample next to a point of its class
            for cls in (0, 1):
                d = torch.cdist(torch.from_numpy(arrays[f"c{cls}"]), data.x)
                own, other = d[:, data.y == cls].min(1).values, d[:, data.y != cls].min(1).values
                assert bool((own < other).all()) and float(own.max()) < 1.0, cls

    # figures: valid PNGs of a useful size that are not blank
    for run_id, name in ((kids["figures"].info.run_id, "plots/posterior_field_figure.png"),
                         (kids["stage1-score"].info.run_id, "plots/loss.png")):
        with Image.open(c.download_artifacts(run_id, name, str(tmp_path))) as im:
            im.load()
            assert im.format == "PNG" and im.width >= 300 and im.height >= 200, name
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100, name

    # checkpoints: the stage's state with all its parts, loadable into the network it trained
    local = c.download_artifacts(kids["stage2-total"].info.run_id, "checkpoints/classifier-total.pt", str(tmp_path))
    state = load_checkpoint(local)
    assert set(state) == {"step", "model", "ema", "optimizer", "generator", "device", "base_lrs", "warmup"}
    assert state["step"] == 40 and state["device"] == "cpu" and state["warmup"] == 0
    net = ClassifierMLP(2, 2, hidden=128, depth=3, sigma_data=14.0)
    net.load_state_dict(state["model"], strict=True)
    assert int(state["ema"]["n_averaged"]) == 40
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    assert ema.keys() == state["model"].keys()
    assert not torch.equal(ema["net.out.weight"], state["model"]["net.out.weight"])


def test_help_names_the_real_options_and_defaults(monkeypatch):
    from dlsm.launch import build_parser
    from dlsm.report import moons
    from dlsm.report.__main__ import main as report_main

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dlsm.launch", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for opt in ("usage: python -m dlsm.launch", "--gin FILE", "--gin_param BINDING", "--fresh", "--traceback",
                "gin file (repeatable)", "e.g. 'total_loss.lam = 0.5' (repeatable)"):
        assert opt in text, opt
    # the documented defaults: no files, no bindings, resume rather than start over, one-line errors
    parser = build_parser()
    ns = parser.parse_args([])
    assert (ns.gin, ns.gin_param, ns.fresh, ns.traceback) == ([], [], False, False)
    ns = parser.parse_args(["--gin", "a.gin", "--gin", "b.gin", "--gin_param", "X = 1", "--fresh"])
    assert (ns.gin, ns.gin_param, ns.fresh) == (["a.gin", "b.gin"], ["X = 1"], True)

    proc = subprocess.run([sys.executable, "-m", "dlsm.report", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for opt in ("usage: python -m dlsm.report", "--table1", "--ablation", "--notes", "--out"):
        assert opt in proc.stdout, opt
    # the module docstring's defaults are what main() passes on
    calls = []
    monkeypatch.setattr(moons, "write_report", lambda *a: calls.append(a) or a[2])
    assert report_main([]) == 0
    assert calls == [("moons_table1", "moons_ablation", Path("docs/results/moons.md"), None)]


def test_operative_config_recreates_the_run(tiny_run, tmp_path):
    cwd, _ = tiny_run
    c = client(cwd)
    (parent,) = parents(c)
    op = Path(c.download_artifacts(parent.info.run_id, "config/operative_config.gin", str(tmp_path)))
    proc = launch(tmp_path, gin_files=(str(op),), params=[])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (again,) = parents(client(tmp_path))
    assert set(runs_by_stage(client(tmp_path), again.info.run_id)) == {
        "stage1-score", "stage2-ce", "stage2-total", "sampling", "evaluation", "figures"}
    for key in ("ce/c0/D_P/s7.5", "total/c1/sw1"):  # same seeds, same config: same numbers
        assert again.data.metrics[key] == pytest.approx(parent.data.metrics[key], rel=1e-4)


def test_reuse_finished_stage1_run(tiny_run, tmp_path):
    cwd, _ = tiny_run
    c = client(cwd)
    (parent,) = parents(c)
    tmp = tmp_path / "tmp"  # the launch's temporary folder: the downloaded checkpoint must not stay there
    tmp.mkdir()
    proc = launch(cwd, params=TINY + [f"experiment.stage1_run_id = '{parent.info.run_id}'",
                                      "classifier/train.n_iters = 20"], env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(tmp.glob("dlsm-ckpt-*"))
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
def test_bad_input_is_one_line_and_nonzero(tmp_path, monkeypatch, capsys, args, needle):
    """The first case (and the store case) through ``python -m dlsm.launch``; the other parse-time cases call
    ``dlsm.launch.main`` in this process (the same code after the imports, without a new interpreter's ~8 s)."""
    if args == BAD_INPUT[0][0] or "stage1_run_id" in args[-1]:
        proc = launch(tmp_path, *args, params=TINY, timeout=120)
        rc, err = proc.returncode, proc.stderr
    else:
        from dlsm.launch import main

        monkeypatch.chdir(tmp_path)
        rc = main([x for p in TINY for x in ("--gin_param", p)] + ["--gin", MOONS, *args])
        err = capsys.readouterr().err
        assert not (tmp_path / "mlruns").exists()  # stopped before tracking
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
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

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    again = launch(tmp_path, params=params, env={"TMPDIR": str(tmp)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert score_ckpt.exists()
    assert not list(tmp.glob("dlsm-ckpt-*"))  # the download's temporary folder is gone
    c = client(tmp_path)
    (parent,) = parents(c)
    kids = runs_by_stage(c, parent.info.run_id)
    steps = [m.step for m in c.get_metric_history(kids["stage1-score"].info.run_id, "score/loss")]
    assert steps == [20, 40, 60]  # logged once, by the first launch: not retrained


TINY_PAPER = TINY + [
    "classifier/train.n_iters = 20",
    "BURN_IN = 3",
    "EVAL_SIGMAS = (0.5, 7.5)",
    "posterior_field_figure.grid = 6",
]


TINY_ABLATION = TINY_PAPER + [
    "N_SEEDS = 2", "classifier/train.eval_every = 10", "classifier/train.n_iters = 20",
    "LikelihoodScoreTracker.n_points = 32", "LikelihoodScoreTracker.grid_size = 5",
    "experiment.classifier = {'branch': @BranchClassifier}",
]


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory) -> Path:
    """A tiny gin/moons_table1.gin and gin/moons_ablation.gin run in one folder (one MLflow store)."""
    cwd = tmp_path_factory.mktemp("paper")
    for name, params in (("moons_table1", TINY_PAPER), ("moons_ablation", TINY_ABLATION)):
        proc = launch(cwd, gin_files=(str(ROOT / "gin" / f"{name}.gin"),), params=params)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd


def test_tiny_table1_has_every_method_class_and_metric_finite(paper_runs):
    tmp_path = paper_runs
    c = client(tmp_path)
    exp = c.get_experiment_by_name("moons_table1")
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent'")
    kids = runs_by_stage_in(c, exp, parent.info.run_id)
    assert {"stage1-score", "posterior_sm-c0", "posterior_sm-c1", "stage2-ce-mlp", "stage2-total-mlp",
            "stage2-ce-branch", "stage2-total-branch", "sampling", "evaluation", "figures"} <= set(kids)
    final = kids["evaluation"].data.metrics
    methods = [f"{m}-{s}" for m in ("base", "scaling", "ours") for s in ("mlp", "branch")] + ["posterior_sm"]
    for m in methods:
        for cls in (0, 1):
            for metric in ("D_P/s0.5", "D_L/s7.5", "D_P_grid/s7.5", "D_L_grid/s0.5", "precision", "recall", "sw1"):
                key = f"{m}/c{cls}/{metric}"
                assert key in final and math.isfinite(final[key]), key
    for cls in (0, 1):
        for m in ("oracle", "data"):
            assert all(math.isfinite(final[f"{m}/c{cls}/{k}"]) for k in ("precision", "recall", "sw1"))
    # scaling is base with alpha = SCALING_ALPHA: its likelihood term is exactly alpha times base's,
    # so alpha_star (least-squares scale onto the oracle) is base's divided by alpha
    for s in ("mlp", "branch"):
        assert final[f"scaling-{s}/c0/alpha_star_grid/s7.5"] == pytest.approx(
            final[f"base-{s}/c0/alpha_star_grid/s7.5"] / 2.0, rel=1e-6)
    arts = artifact_paths(c, kids["figures"].info.run_id)
    assert {"plots/posterior_field_figure-mlp.png", "plots/posterior_field_figure-branch.png"} <= arts
    assert "@posterior_sm" in parent.data.params["experiment.stages"]


def runs_by_stage_in(c, exp, parent_id: str) -> dict:
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags["dlsm.stage"]: r for r in kids}


def test_tiny_ablation_logs_training_curves_per_seed(paper_runs):
    c = client(paper_runs)
    exp = c.get_experiment_by_name("moons_ablation")
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent'")
    kids = runs_by_stage_in(c, exp, parent.info.run_id)
    for loss in ("ce", "dlsm", "total"):
        for seed in (0, 1):
            run = kids[f"stage2-{loss}-branch-seed{seed}"]
            for key in ("track/D_L/s7.5", "track/D_L_grid/s7.5", "track/ce/s7.5"):
                hist = c.get_metric_history(run.info.run_id, key)
                assert sorted(m.step for m in hist) == [0, 10, 20], (loss, seed, key)
                assert all(math.isfinite(m.value) for m in hist)
    # different seeds train different classifiers; step 0 is the same initialisation per seed for every loss
    h = {(loss, seed): c.get_metric_history(kids[f"stage2-{loss}-branch-seed{seed}"].info.run_id, "track/ce/s7.5")
         for loss in ("ce", "total") for seed in (0, 1)}
    first = {k: min(v, key=lambda m: m.step).value for k, v in h.items()}
    assert first["ce", 0] == pytest.approx(first["total", 0]) and first["ce", 0] != first["ce", 1]
    assert "plots/training_curves-branch.png" in artifact_paths(c, parent.info.run_id)
    assert "sampling" not in kids and "evaluation" in kids  # the ablation's stage list has no sampling


def test_report_is_generated_from_the_runs(paper_runs):
    out = paper_runs / "docs" / "moons.md"
    notes = paper_runs / "notes.md"
    notes.write_text("## Discussion\nhand-written")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dlsm.report", "--out", str(out), "--notes", str(notes)],
                          cwd=paper_runs, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    c = client(paper_runs)
    exp = c.get_experiment_by_name("moons_table1")
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent'")
    final = runs_by_stage_in(c, exp, parent.info.run_id)["evaluation"].data.metrics
    # the table carries the run's numbers, formatted to 3 significant digits
    assert f"| {final['oracle/c0/precision']:.3g} |" in text
    assert f"{final['base-mlp/c1/D_L_grid/s7.5']:.3g}" in text
    for heading in ("## Table 1", "### Classifier shape `mlp`", "### Classifier shape `branch`", "## Figure 1",
                    "## Figure 5", "#### Classifier shape `branch`", "## The paper's claims", "## Settings",
                    "## Discussion"):
        assert heading in text, heading
    for png in ("figure1-mlp.png", "figure1-branch.png", "figure5-branch.png"):
        assert (out.parent / "moons" / png).stat().st_size > 1000, png
        assert f"](moons/{png})" in text
    assert "(a) base" in text and "(e) oracle" in text
    # each claim's verdict is the one these numbers give, recounted here from the sampling run's metrics
    for shape in ("mlp", "branch"):
        for stem in ("D_L", "D_P"):
            pairs = [(v, final[k.replace(f"ours-{shape}/", f"base-{shape}/", 1)]) for k, v in final.items()
                     if re.match(rf"ours-{shape}/c[01]/{stem}(_grid)?/s", k)]
            wins, n = sum(a < b for a, b in pairs), len(pairs)
            verdict = "agrees" if wins == n else "mostly agrees" if 2 * wins > n else "does not agree"
            (line,) = [ln for ln in text.splitlines() if f"*{shape}*, E[{stem}] ours (Total) < base (CE)" in ln]
            assert n == 8 and f"**{wins} of {n}** (class × σ × point set) comparisons: **{verdict}**" in line


def test_report_without_runs_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dlsm.report", "--out", str(tmp_path / "r.md")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "no finished 'moons_table1' run" in lines[0], proc.stderr


def test_bad_sampling_method_fails_before_training(tmp_path):
    proc = launch(tmp_path, params=TINY + ["experiment.sampling_methods = {'b': ('dlsm', 1.0)}"], timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "sampling_methods['b']" in lines[0], proc.stderr
    assert not (tmp_path / "mlruns").exists()  # rejected before any run was started
