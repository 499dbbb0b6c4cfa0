"""Images end to end: ``gin/digits.gin`` under ``gin/smoke.gin`` through ``python -m dlsm.launch`` (every child
run, the uint8 samples, the grids), and the image experiment's bad input (one line, nothing half-written)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from budget import FAST_FAIL_S  # tests/, on sys.path
from cases import one_line, run_cases

ROOT = Path(__file__).resolve().parent.parent
DIGITS, SMOKE = str(ROOT / "gin" / "digits.gin"), str(ROOT / "gin" / "smoke.gin")
STAGES = {"stage1-score", "stage2-ce", "stage2-total", "sampling", "evaluation", "figures"}


def launch(cwd: Path, *params: str, env: dict | None = None, timeout: int = 300):
    cmd = [sys.executable, "-m", "dlsm.launch", "--gin", DIGITS, "--gin", SMOKE]
    cmd += [x for p in params for x in ("--gin_param", p)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def artifacts(c, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for f in c.list_artifacts(run_id, path):
        out |= artifacts(c, run_id, f.path) if f.is_dir else {f.path}
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("digits")
    proc = launch(cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]  # its time: bench/smoke_times.py (no timed asserts in tests)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("digits")
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent'")
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return cwd, c, parent, {k.data.tags["dlsm.stage"]: k for k in kids}


def test_digits_smoke_runs_every_stage_as_a_child_run(digits_run):
    _, c, parent, kids = digits_run
    assert parent.info.status == "FINISHED" and set(kids) == STAGES
    assert all(k.info.status == "FINISHED" for k in kids.values())
    assert parent.data.params["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    # the networks' sizes are logged with the stage that trains them (smoke widths: ScoreUNet channels 8)
    from dlsm.nets import ConvClassifier, ScoreUNet

    unet = ScoreUNet((1, 8, 8), channels=8, channel_mult=(1, 2), num_res_blocks=1)
    assert int(kids["stage1-score"].data.params["num_parameters"]) == unet.num_parameters()
    clf = ConvClassifier((1, 8, 8), 10, channels=(8, 8, 16, 16), norm="group", emb_dim=16)  # smoke.gin widths
    assert int(kids["stage2-total"].data.params["num_parameters"]) == clf.num_parameters()
    # stage 1 logged sample-grid snapshots from its EMA model every score/train.snapshot_every = 10 steps
    snapshots = {"images/snapshot-0000010.png", "images/snapshot-0000020.png"}
    assert snapshots <= artifacts(c, kids["stage1-score"].info.run_id)
    final = kids["evaluation"].data.metrics
    for key in ("ce/acc/s0.5", "total/ce/s1", "ours/c3/precision", "base/c0/sw1", "scaling/c9/recall"):
        assert math.isfinite(final[key]), key


def test_digits_samples_are_uint8_images_with_labels_and_grids(digits_run, tmp_path):
    _, c, _, kids = digits_run
    from PIL import Image

    sampling = kids["sampling"].info.run_id
    arts = artifacts(c, sampling)
    assert {f"samples/samples-{m}.npz" for m in ("base", "scaling", "ours")} <= arts
    assert {"images/grid-base.png", "images/grid-scaling.png", "images/grid-ours.png", "images/figure3.png"} <= arts
    for m in ("base", "scaling", "ours"):
        z = np.load(c.download_artifacts(sampling, f"samples/samples-{m}.npz", str(tmp_path)))
        assert z["x"].dtype == np.uint8 and z["x"].shape == (40, 1, 8, 8)  # smoke: 4 per class, 10 classes
        assert np.bincount(z["y"]).tolist() == [4] * 10
        assert z["x"].std() > 0  # not a constant image
    for name in ("images/grid-ours.png", "images/figure3.png"):
        with Image.open(c.download_artifacts(sampling, name, str(tmp_path))) as im:
            im.load()
            lo, hi = im.convert("L").getextrema()
            assert im.format == "PNG" and im.size[0] >= 200 and hi - lo > 50


def test_same_noise_gives_base_and_scaling_the_same_start(digits_run, tmp_path):
    """sample.same_noise: base and scaling share every random number; with alpha 1 vs 10 they still differ."""
    _, c, _, kids = digits_run
    sampling = kids["sampling"].info.run_id
    base, scaling = (np.load(c.download_artifacts(sampling, f"samples/samples-{m}.npz", str(tmp_path)))["x"]
                     for m in ("base", "scaling"))
    assert not np.array_equal(base, scaling)


def test_digits_table2_metrics_tables_and_figure4_are_logged(digits_run, tmp_path):
    """image_metrics (gin/digits.gin): the paper's Table 2 names with the feature network after a dot, the real row,
    CAS and sample accuracy; the markdown table in the evaluation run and beside the samples; Figure 4."""
    _, c, parent, kids = digits_run
    m = kids["evaluation"].data.metrics
    for method in ("real", "base", "scaling", "ours"):
        for key in ("fid.evaluator", "kid.evaluator", "is.evaluator", "precision.evaluator", "coverage.evaluator",
                    "cw/fid.evaluator", "cw/recall.evaluator", "cw/density.evaluator", "cas", "sample_acc"):
            assert math.isfinite(m[f"{method}/{key}"]), (method, key)
    assert 0.0 <= m["ours/sample_acc"] <= 1.0
    assert m["real/sample_acc"] == pytest.approx(m["evaluator/test_acc"], abs=1 / 360)  # one test image at most
    assert parent.data.metrics["ours/fid.evaluator"] == m["ours/fid.evaluator"]  # also on the parent run
    ev_arts, sampling_arts = artifacts(c, kids["evaluation"].info.run_id), artifacts(c, kids["sampling"].info.run_id)
    assert {"tables/table2.evaluator.md", "plots/figure4.evaluator.png", "tables/per_class.evaluator.json"} <= ev_arts
    assert "tables/table2.evaluator.md" in sampling_arts
    table = Path(c.download_artifacts(kids["sampling"].info.run_id, "tables/table2.evaluator.md", str(tmp_path)))
    rows = [ln for ln in table.read_text().splitlines() if ln.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["method", "real", "base", "scaling", "ours"]
    assert f"{m['ours/fid.evaluator']:.4g}" in rows[-1]


def test_dlsm_evaluate_recomputes_the_streamed_metrics_from_the_saved_samples(digits_run):
    """python -m dlsm.evaluate --run PARENT: the same numbers from the uint8 samples as streamed while sampling;
    --run SAMPLING_RUN with another k: a new re-evaluation run with that k; an unknown run: one line. The three
    commands run in one interpreter (tests/cases.py), one after another."""
    cwd, c, parent, kids = digits_run
    argvs = [["--run", parent.info.run_id],
             ["--run", kids["sampling"].info.run_id, "--gin_param", "image_metrics.k = 1",
              "--gin_param", "image_metrics.with_cas = False"],
             ["--run", "0123456789abcdef"]]
    first, second, unknown = run_cases([{"cwd": cwd, "module": "dlsm.evaluate", "argv": a} for a in argvs])
    assert first["rc"] == 0 and second["rc"] == 0, (first["err"][-3000:], second["err"][-3000:])
    streamed = kids["evaluation"].data.metrics
    runs = c.search_runs([parent.info.experiment_id], filter_string="tags.`dlsm.stage` = 're-evaluation'",
                         order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    again = runs[0].data.metrics
    for key in ("ours/fid.evaluator", "base/precision.evaluator", "scaling/cw/coverage.evaluator", "ours/cas",
                "base/sample_acc", "real/recall.evaluator"):
        assert again[key] == pytest.approx(streamed[key], rel=1e-4, abs=1e-6), key
    run = runs[1]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and "ours/cas" not in run.data.metrics
    assert "k = 1" in Path(c.download_artifacts(run.info.run_id, "tables/table2.evaluator.md", str(cwd))).read_text()
    assert "--run 0123456789abcdef: no such MLflow run" in one_line(unknown)


def test_sanity_rows_unconditional_and_exact_likelihood(tmp_path):
    """Issue 15's sanity rows through the launcher: 'uncond' (alpha = 0: the prior score alone) and 'exact' (the
    prior model plus the Parzen oracle's exact likelihood, stage exact_likelihood) are sampled and scored like base
    and ours, and sit in Table 2."""
    methods = "{'uncond': ('ce', 0.0), 'base': ('ce', 1.0), 'ours': ('total', 1.0)}"
    proc = launch(tmp_path, f"experiment.sampling_methods = {methods}",
                  "experiment.stages = [@train_score_model, @train_classifiers, @exact_likelihood, @sample, @evaluate]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("digits")
    (ev,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.stage` = 'evaluation'")
    for method in ("uncond", "base", "ours", "exact"):
        assert math.isfinite(ev.data.metrics[f"{method}/fid.evaluator"]), method
        assert 0.0 <= ev.data.metrics[f"{method}/sample_acc"] <= 1.0
    table = Path(c.download_artifacts(ev.info.run_id, "tables/table2.evaluator.md", str(tmp_path))).read_text()
    rows = [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ")]
    assert rows == ["method", "real", "uncond", "base", "ours", "exact"]


def test_frontier_file_runs_under_smoke_with_every_point(tmp_path):
    """gin/digits_frontier.gin + smoke.gin: four classifiers (CE, Total at lambda 0.125, 1, 8), every (classifier,
    alpha) point, 'uncond' and 'exact' sampled and scored in one launch."""
    import gin

    cmd = [sys.executable, "-m", "dlsm.launch", "--gin", str(ROOT / "gin" / "digits_frontier.gin"), "--gin", SMOKE]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    from dlsm import components  # noqa: F401
    from dlsm.config import parse_config

    gin.clear_config()
    try:
        parse_config([str(ROOT / "gin" / "digits_frontier.gin")], [])
        methods = gin.query_parameter("experiment.sampling_methods")
        losses = gin.query_parameter("experiment.classifier_losses")
    finally:
        gin.clear_config()
    alphas = {methods[m][1] for m in methods if m not in ("uncond", "scaling")}  # scaling: %SCALING_ALPHA (10)
    assert len(methods) == 21 and alphas == {1.0, 2.0, 3.0, 5.0, 10.0}
    assert sorted(losses) == ["ce", "total", "total_lam0.125", "total_lam8"]
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("digits_frontier")
    (ev,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.stage` = 'evaluation'")
    for method in [*methods, "exact", "real"]:
        assert math.isfinite(ev.data.metrics[f"{method}/cw/fid.evaluator"]), method
    assert c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.stage` = 'stage2-total_lam8'")
    # the mechanism: each alpha = 1 classifier's score errors against the Parzen oracle (a reference, not sampled)
    # and every classifier's held-out DLSM' per sigma
    assert not any(k.startswith("oracle/") for k in ev.data.metrics)
    for name in ("base", "total_lam0.125_a1", "ours", "total_lam8_a1", "exact"):
        assert math.isfinite(ev.data.metrics[f"{name}/c9/D_L/s0.05"]), name
    assert ev.data.metrics["exact/c3/D_L/s1"] == 0.0  # its likelihood term is the oracle's
    assert "total_a3/c0/D_L/s1" not in ev.data.metrics  # score_error_metrics.methods: alpha = 1 points only
    for clf in losses:
        assert math.isfinite(ev.data.metrics[f"{clf}/heldout/dlsm/s2"]), clf
    # a point run per sampled method, carrying lambda, alpha and seed
    points = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'point'")
    assert sorted(p.data.params["method"] for p in points) == sorted([*methods, "exact"])
    lams = {p.data.params["method"]: p.data.params.get("lam") for p in points}
    assert lams["total_lam0.125_a5"] == "0.125" and lams["total_a2"] == "1.0" and lams["ce_a3"] is None


def _nothing_written(cwd: Path) -> None:
    assert not list(cwd.rglob("*.pt")) and not list(cwd.rglob("*.npz"))
    db = cwd / "mlruns" / "mlflow.db"
    if db.exists():
        from mlflow.tracking import MlflowClient

        c = MlflowClient(f"sqlite:///{db}")
        exps = [e.experiment_id for e in c.search_experiments()]
        assert not c.search_runs(exps)  # no MLflow run was started


# one-line errors of image launches, every case in one new interpreter (tests/cases.py: its start-up paid once)
ONE_LINE = {
    "cifar-offline": (["experiment.dataset = @cifar10"], "cifar-10-batches-py/"),
    "unet-depth": (["digits.size = 12", "ScoreUNet.channel_mult = (1, 2, 2, 2)"], "ScoreUNet"),  # 12 % 8 != 0
    "batch": (["score/train.batch_size = 5000"],
              "score/train.batch_size = 5000 is larger than the data (1437 examples)"),
    "macro": (["DATA_ROOT_MISSING = 1"], "no binding uses %DATA_ROOT_MISSING"),
    "cuda": (["DEVICE = 'cuda'"], "device = 'cuda' but no CUDA GPU is visible"),
}


def test_image_launch_errors_are_one_line_and_write_nothing(tmp_path):
    """CIFAR offline (the line names the folder and the layout), a U-Net too deep for 12x12, a batch larger than the
    data, an unused macro, CUDA without a GPU: one line each, nothing written, no MLflow run. One test: the cases
    share one interpreter (a module fixture would be set up again wherever xdist interleaves other modules)."""
    empty = tmp_path / "data"
    empty.mkdir()
    names = [n for n in ONE_LINE if n != "cuda" or not torch.cuda.is_available()]  # with a GPU it would run
    results = run_cases([{"cwd": tmp_path / name, "argv": ["--gin", DIGITS, "--gin", SMOKE, *[
        x for p in ONE_LINE[name][0] for x in ("--gin_param", p)]], "env": {"DATA_ROOT": str(empty)}}
        for name in names])
    for name, result in zip(names, results, strict=True):
        line = one_line(result)
        assert ONE_LINE[name][1] in line, (name, line)
        _nothing_written(tmp_path / name)
    assert str(empty) in one_line(results[0]) and results[0]["wall_s"] < FAST_FAIL_S
