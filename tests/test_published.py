"""The published-checkpoint experiments (``gin/cifar*_published*.gin``): stage 1 and the classifiers taken from
official checkpoint files instead of trained, end to end through ``python -m dlsm.launch`` under ``gin/smoke.gin`` on
tiny CIFAR archives, with checkpoints this test writes in the official layout (the exporter, at smoke.gin's widths:
the official resnet_cond's four stages at widths 8-16, emb_dim 16 = 4 x its 4 frequencies); and every bad file as
one line before anything is trained, sampled or tracked."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import one_line, run_cases  # tests/, on sys.path
from cifar_archives import make_cifar10
from test_cifar import PRELUDE, RUNNER, SMOKE, _runs

from dlsm.nets.convnet import ConvClassifier
from dlsm.nets.ncsnpp import NCSNpp
from dlsm.train.official import export_classifier_checkpoint, export_score_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SMOKE_SCORE = {"channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (16,)}


def _score(num_res_blocks: int = 1, seed: int = 0) -> NCSNpp:
    torch.manual_seed(seed)
    return NCSNpp((3, 32, 32), **{**SMOKE_SCORE, "num_res_blocks": num_res_blocks}, fourier_scale=16.0).eval()


def _classifier(classes: int = 10, seed: int = 1) -> ConvClassifier:
    torch.manual_seed(seed)
    net = ConvClassifier((3, 32, 32), classes, channels=(8, 8, 16, 16), blocks_per_stage=1, norm="batch",
                         condition="stage", emb_dim=16)
    with torch.no_grad():  # running statistics that differ from the defaults, so loading them is seen
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Official-layout files at smoke widths, and the CIFAR archives."""
    d = tmp_path_factory.mktemp("published")
    out = {"score": d / "score" / "checkpoint.pth", "base": d / "base" / "checkpoint.pth",
           "ours": d / "ours" / "checkpoint.pth", "data": d / "data"}
    export_score_checkpoint(_score(), out["score"], ema_net=_score(seed=3), step=26)  # EMA != raw weights
    export_classifier_checkpoint(_classifier(seed=1), out["base"], step=7)
    export_classifier_checkpoint(_classifier(seed=2), out["ours"], step=8)
    make_cifar10(out["data"], per_batch=20, n_test=40, balanced=True)  # 10 per class in training, 4 in the test split
    return out


def test_stages_load_the_files_ema_weights_and_running_statistics(files):
    """train_score_model(checkpoint=...) takes the EMA weights (as the official sampling does), train_classifiers
    (checkpoints=...) each named file, in eval mode: the networks equal the ones the files were written from."""
    import functools

    from dlsm.math.losses import ce_loss, total_loss
    from dlsm.stages.base import ExperimentSpec, Run, State
    from dlsm.stages.classifier import train_classifiers
    from dlsm.stages.score import train_score_model
    from dlsm.tracking import NullTracker

    class Data:
        shape, num_classes = (3, 32, 32), 10

    classifier = functools.partial(ConvClassifier, channels=(8, 8, 16, 16), blocks_per_stage=1, norm="batch",
                                   condition="stage", emb_dim=16)
    spec = ExperimentSpec("t", 0, None, functools.partial(NCSNpp, **SMOKE_SCORE), {"": classifier}, None,
                          {"ce": ce_loss, "total": total_loss}, 1.0, None, None, ())
    run = Run(spec, NullTracker(), "parent", Path("unused"), {}, torch.device("cpu"))
    state = train_score_model(run, State(Data(), None), checkpoint=str(files["score"]))
    state = train_classifiers(run, state, checkpoints={"ce": str(files["base"]), "total": str(files["ours"])})
    ema = _score(seed=3)
    ema.time_proj.weight.copy_(_score(seed=0).time_proj.weight)  # the fixed Fourier W: not in the official EMA
    for got, want in ((state.score_model, ema), (state.classifiers[""]["ce"], _classifier(seed=1)),
                      (state.classifiers[""]["total"], _classifier(seed=2))):
        assert not got.training
        mine, theirs = got.state_dict(), want.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not any(p.requires_grad for p in state.score_model.parameters())


def _params(files: dict, **overrides: str) -> list[str]:
    macros = {"SCORE_CKPT": repr(str(files["score"])), "BASE_CKPT": repr(str(files["base"])),
              "OURS_CKPT": repr(str(files["ours"])), **overrides}
    return [f"{k} = {v}" for k, v in macros.items() if v is not None]


def _launch(cwd: Path, gin_file: str, data: Path, params: list[str], timeout: int = 400, overlay: str | None = None):
    cmd = [sys.executable, "-c", RUNNER, "--gin", str(ROOT / "gin" / gin_file)]
    cmd += ["--gin", str(ROOT / "gin" / overlay)] if overlay else []
    cmd += ["--gin", SMOKE]
    cmd += [x for p in params for x in ("--gin_param", p)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATA_ROOT": str(data)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_published_networks_sample_and_evaluate_without_training(tmp_path, files):
    """gin/cifar10_published.gin with gin/eval_official.gin: every network loaded (path, SHA-256 and step recorded),
    nothing trained, every later stage run under the official evaluation's bindings; the loaded networks are the
    exported ones (bit for bit: tests/test_official_checkpoints.py, and the stage test above)."""
    proc = _launch(tmp_path, "cifar10_published.gin", files["data"], _params(files), overlay="eval_official.gin")
    assert proc.returncode == 0, proc.stderr[-3000:]
    c, parent, kids = _runs(tmp_path, "cifar10")
    assert parent.info.status == "FINISHED"
    assert set(kids) == {"stage1-score", "stage2-ce", "stage2-total", "sampling", "evaluation", "figures"}
    for stage, key, step, net in (("stage1-score", "score", 26, "NCSNpp"), ("stage2-ce", "base", 7, "ConvClassifier"),
                                  ("stage2-total", "ours", 8, "ConvClassifier")):
        p = kids[stage].data.params
        assert p["checkpoint"] == str(files[key]) and p["checkpoint_sha256"] == _sha256(files[key])
        assert int(p["checkpoint_step"]) == step and p["network"] == net
        assert not kids[stage].data.metrics.keys() - {"wall_seconds"}  # no loss: nothing trained
    assert int(kids["stage1-score"].data.params["num_parameters"]) == _score().num_parameters()
    assert not [p for p in tmp_path.rglob("*.pt") if p.name.startswith(("score", "classifier"))]  # none trained
    assert "dlsm: stage1-score: NCSNpp with" in proc.stdout and "(official checkpoint, step 26)" in proc.stdout
    assert kids["sampling"].data.metrics and "ours/cw/fid.evaluator" in parent.data.metrics
    # the official evaluation overlay reached the run (gin/eval_official.gin after the file, smoke.gin last)
    p = parent.data.params
    assert float(p["likelihood_score_and_logits.softmax_eps"]) == 1e-8
    assert p["from_model_space.rounding"] == "'truncate'"
    assert p["image_metrics.truncate_to_real"] == "True" and p["cas/EvaluatorSettings.network"] == "'resnet50'"
    assert int(p["cas/EvaluatorSettings.n_iters"]) == 5 and 0 <= parent.data.metrics["ours/cas"] <= 1


R18 = ["ConvClassifier.channels = (64, 128, 256, 512)", "ConvClassifier.blocks_per_stage = (2, 2, 2, 2)",
       "ConvClassifier.emb_dim = 128", "ConvClassifier.num_frequencies = 32"]


def _fake_official(path: Path, names_file: str) -> Path:
    """The official names and shapes of ``names_file`` (written from the official classes), zero tensors that share
    one element of storage: a few kB even for NCSN++ deep."""
    rows = [ln.split() for ln in (DATA / names_file).read_text().splitlines() if ln and not ln.startswith("#")]
    zero = torch.zeros(1)
    model = {"module." + r[0]: zero.expand(*map(int, r[1:])) if r[1:] else zero[0] for r in rows}
    torch.save({"model": model, "step": 1}, path)
    return path


def _bad_cases(bad: Path, files: dict) -> list[tuple[list[str], str]]:
    """(gin params, the expected line's start or part) of every bad published file."""
    truncated = bad / "truncated.pth"
    truncated.write_bytes(files["score"].read_bytes()[:5000])
    torch.save({"model": {}, "fn": os.path.join}, bad / "code.pth")
    r34 = _fake_official(bad / "r34_cifar100.pth", "official_classifier_resnet34_cifar100.txt")
    score = repr(str(files["score"]))
    r18 = "resnet18_cond(num_classes=10, blocks_per_stage=(2, 2, 2, 2), nf=32, shape=(3, 32, 32))"
    return [
        (_params(files, SCORE_CKPT=None), "train_score_model.checkpoint is not set: give the macro SCORE_CKPT the "
         "checkpoint file (--gin_param \"SCORE_CKPT = '/path/to/checkpoint.pth'\"); the official score model"),
        (_params(files, SCORE_CKPT=repr(str(bad / "nope.pth"))), f"train_score_model.checkpoint = "
         f"'{bad / 'nope.pth'}': no such file; give the macro SCORE_CKPT the checkpoint file"),
        (_params(files, SCORE_CKPT=repr(str(bad))), f"train_score_model.checkpoint = '{bad}' is a directory, not a "
         f"checkpoint file; give the macro SCORE_CKPT the file"),
        (_params(files, SCORE_CKPT=repr(str(truncated))), f"checkpoint {truncated} is unreadable"),
        (_params(files, OURS_CKPT=repr(str(bad / "code.pth"))), f"checkpoint {bad / 'code.pth'} needs code to "
         f"unpickle (posixpath.join), which weights_only loading refuses"),
        (_params(files, BASE_CKPT=repr(str(r34))) + R18, f"checkpoint {r34}: official key "
         f"classifier.classifier.layer1.2.conv1.weight (64, 64, 3, 3) is not part of {r18}: the file holds "
         f"resnet34_cond(num_classes=100"),
        (_params(files, OURS_CKPT=score), f"checkpoint {files['score']}: official key sigmas (1000,) is not part of "
         f"resnet_cond(num_classes=10, blocks_per_stage=(1, 1, 1, 1), channels=(8, 8, 16, 16), nf=4, "
         f"shape=(3, 32, 32)): the file holds a score_sde NCSN++ score model, not a classifier"),
        (_params(files, BASE_CKPT=None, OURS_CKPT=None) + [f"train_classifiers.checkpoints = {{'dlsm': {score}}}"],
         "train_classifiers.checkpoints = {'dlsm': "),
    ]


def _launches(tmp: Path, files: dict) -> dict:
    """Every bad case, then gin/cifar10_published_score.gin (trains the classifiers), in one interpreter."""
    (tmp / "bad").mkdir()
    bad = _bad_cases(tmp / "bad", files)
    variant = _params(files, BASE_CKPT=None, OURS_CKPT=None) + ["experiment.stop_after = 'stage2'"]
    runs = [("cifar10_published.gin", p) for p, _ in bad] + [("cifar10_published_score.gin", variant)]
    results = run_cases([{"cwd": tmp / f"case{i}", "argv": ["--gin", str(ROOT / "gin" / g), "--gin", SMOKE,
                                                             *[x for p in params for x in ("--gin_param", p)]]}
                         for i, (g, params) in enumerate(runs)],
                        prelude=PRELUDE, env={"DATA_ROOT": str(files["data"])})
    return {"tmp": tmp, "bad": [(r, needle) for r, (_, needle) in zip(results, bad, strict=False)],
            "variant": results[-1]}


def test_bad_files_are_one_line_and_the_score_only_file_trains_the_classifiers(tmp_path, files):
    """Wrong architecture (a CIFAR-100 ResNet-34 into the CIFAR-10 ResNet-18; a score model given as a classifier; the
    4-block NCSN++ into the deep config is the same check, tests/test_official_checkpoints.py), a truncated file, a
    file that needs code to unpickle, a missing path, a directory,
    an unset macro, an unknown classifier name: each exit 2 with one line, no MLflow run, nothing written. Then
    gin/cifar10_published_score.gin: stage 1 loaded, the classifiers trained against it. One test: the launches
    share one interpreter (tests/cases.py)."""
    from mlflow.tracking import MlflowClient

    launches = _launches(tmp_path, files)
    for i, (result, needle) in enumerate(launches["bad"]):
        assert needle in one_line(result), (i, result["err"])
        case = launches["tmp"] / f"case{i}"
        assert not [p for p in case.rglob("*") if p.suffix in (".pt", ".npz")], i
        if (case / "mlruns" / "mlflow.db").exists():  # the store may exist; no run in it
            client = MlflowClient(f"sqlite:///{case / 'mlruns' / 'mlflow.db'}")
            assert not client.search_runs([e.experiment_id for e in client.search_experiments()]), i
    assert launches["variant"]["rc"] == 0, launches["variant"]["err"][-3000:]
    cwd = launches["tmp"] / f"case{len(launches['bad'])}"
    c, parent, kids = _runs(cwd, "cifar10")
    assert kids["stage1-score"].data.params["checkpoint_sha256"] == _sha256(files["score"])
    for loss in ("ce", "total"):
        assert "checkpoint" not in kids[f"stage2-{loss}"].data.params
        assert len(c.get_metric_history(kids[f"stage2-{loss}"].info.run_id, f"{loss}/loss")) >= 2  # trained


def test_export_of_an_unknown_run_is_one_line(tmp_path, monkeypatch, capsys):
    import mlflow

    from dlsm import export

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = mlflow.get_tracking_uri()
    try:
        assert export.main(["--run", "0123abcd", "--out", str(tmp_path / "out")]) == 2
    finally:
        mlflow.set_tracking_uri(before)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"dlsm: error: --run 0123abcd: no such MLflow run in {uri}"]
    assert not (tmp_path / "out").exists()


def test_every_binding_of_the_official_overlay_is_documented_with_its_source():
    """gin/eval_official.gin: each binding line appears in docs/published.md's table, with an official file named."""
    bindings = [ln.strip() for ln in (ROOT / "gin" / "eval_official.gin").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    rows = {ln.split("|")[1].strip().strip("`"): ln for ln in (ROOT / "docs" / "published.md").read_text().splitlines()
            if ln.startswith("| `")}
    assert len(bindings) == 10 and set(bindings) <= set(rows), set(bindings) - set(rows)
    assert all(".py" in rows[b].split("|")[4] for b in bindings)
