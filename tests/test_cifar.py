"""The paper's CIFAR experiment files end to end: ``gin/cifar10.gin`` and ``gin/cifar100.gin`` under ``gin/smoke.gin``
through ``python -m dlsm.launch`` on tiny archives the test writes in the real format, and the published settings
the files declare (read back from the operative config the run logs)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from budget import FAST_FAIL_S, took  # tests/, on sys.path
from cifar_archives import make_cifar10, make_cifar100

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "gin" / "smoke.gin")
STAGES = {"stage1-score", "stage2-ce", "stage2-total", "sampling", "evaluation", "figures"}
# the stand-in archives cannot match CIFAR's md5 sums: torchvision's check becomes "the file exists"
PRELUDE = ("import torchvision.datasets.cifar as c; "
           "c.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)")
RUNNER = f"import os, sys; {PRELUDE}; from dlsm.launch import main; sys.exit(main(sys.argv[1:]))"


def launch(cwd: Path, gin_file: str, data_root: Path, *params: str, timeout: int = 400, env: dict | None = None):
    cmd = [sys.executable, "-c", RUNNER, "--gin", str(ROOT / "gin" / gin_file), "--gin", SMOKE]
    cmd += [x for p in params for x in ("--gin_param", p)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATA_ROOT": str(data_root), **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _runs(cwd: Path, name: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name(name)
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent'")
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return c, parent, {k.data.tags["dlsm.stage"]: k for k in kids}


@pytest.mark.parametrize(("gin_file", "classes"), [("cifar10.gin", 10), ("cifar100.gin", 100)])
def test_cifar_file_runs_every_stage_under_smoke(tmp_path, monkeypatch, gin_file, classes):
    data = tmp_path / "data"
    if classes == 10:
        make_cifar10(data, per_batch=20, n_test=40, balanced=True)  # 100 train images, 10 per class; 4 test
    else:  # 4 per class in both splits: the k-NN metrics (k = 3) need k + 1, the real row uses the test split
        make_cifar100(data, n_train=400, n_test=400, balanced=True)
    # smoke.gin swaps Inception (no weights here) for the evaluator network; CIFAR-100's 100 classes sample with the
    # predictor alone (half the network calls; the corrector runs in the CIFAR-10 case)
    proc = launch(tmp_path, gin_file, data, *(["predictor_corrector.n_corrector_steps = 0"] if classes == 100 else []))
    assert proc.returncode == 0, proc.stderr[-3000:]  # its time: bench/smoke_times.py (no timed asserts in tests)
    c, parent, kids = _runs(tmp_path, gin_file.removesuffix(".gin"))
    assert parent.info.status == "FINISHED" and set(kids) == STAGES

    from dlsm.nets import ConvClassifier, NCSNpp

    # the networks the file declares, at smoke widths
    score = NCSNpp((3, 32, 32), channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
    assert kids["stage1-score"].data.params["network"] == "NCSNpp"
    assert int(kids["stage1-score"].data.params["num_parameters"]) == score.num_parameters()
    clf = ConvClassifier((3, 32, 32), classes, channels=(8, 8, 16, 16), blocks_per_stage=1, norm="batch",
                         condition="stage", emb_dim=16)
    assert int(kids["stage2-total"].data.params["num_parameters"]) == clf.num_parameters()
    # the published settings smoke.gin leaves alone
    params = parent.data.params
    assert params["total_loss.reduce"] == "%DLSM_REDUCE" and params["macro.DLSM_REDUCE"] == "'mean'"
    assert float(params["macro.DLSM_WEIGHT_POWER"]) == 0.0
    assert params["experiment.sampler"] == "@predictor_corrector" and float(params["predictor_corrector.snr"]) == 0.16
    assert float(params["schedule.sigma_max"]) == 50.0 and float(params["schedule.sigma_min"]) == pytest.approx(0.01)
    sampling = kids["sampling"].info.run_id
    for m in ("base", "scaling", "ours"):
        z = np.load(c.download_artifacts(sampling, f"samples/samples-{m}.npz", str(tmp_path)))
        assert z["x"].dtype == np.uint8 and z["x"].shape == (4 * classes, 3, 32, 32)
        assert np.bincount(z["y"]).tolist() == [4] * classes
    if classes == 10:
        _exported_round_trip(tmp_path, data, c, kids, score, clf, monkeypatch)


def _exported_round_trip(cwd: Path, data: Path, c, kids: dict, score, clf, monkeypatch) -> None:
    """``python -m dlsm.export`` of the run (its ``main``, in this process): the official-layout files import back
    (strictly) to the networks the run saved, bit for bit: the score model's EMA and raw weights, each classifier's
    sampled (EMA) weights."""
    import gin
    import mlflow
    import torch
    import torchvision.datasets.cifar as cifar

    from dlsm import export
    from dlsm.train.checkpoints import load_checkpoint, load_ema_weights
    from dlsm.train.official import import_classifier_checkpoint, import_score_checkpoint

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DATA_ROOT", str(data))
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    uri = mlflow.get_tracking_uri()
    try:
        assert export.main(["--run", kids["sampling"].info.run_id, "--out", str(cwd / "official")]) == 0
    finally:
        mlflow.set_tracking_uri(uri)
        gin.clear_config()

    def same(a, b) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    ours = Path(c.download_artifacts(kids["stage1-score"].info.run_id, "checkpoints/score.pt", str(cwd)))
    official = cwd / "official" / "score" / "checkpoint.pth"
    assert import_score_checkpoint(official, score) == load_checkpoint(ours)["step"] == 20
    assert same(score, load_ema_weights(copy.deepcopy(score), ours))
    import_score_checkpoint(official, score, use_ema=False)
    raw = copy.deepcopy(score)
    raw.load_state_dict(load_checkpoint(ours)["model"])
    assert same(score, raw) and not same(score, load_ema_weights(copy.deepcopy(score), ours))
    for loss in ("ce", "total"):
        ours = Path(c.download_artifacts(kids[f"stage2-{loss}"].info.run_id, f"checkpoints/classifier-{loss}.pt",
                                         str(cwd)))
        assert import_classifier_checkpoint(cwd / "official" / loss / "checkpoint.pth", clf) == 10
        assert same(clf, load_ema_weights(copy.deepcopy(clf), ours))


def test_published_settings_of_the_cifar_files():
    """What the files declare, read through gin (the paper's Table 2 settings, official code's configs)."""
    import gin

    from dlsm import components  # noqa: F401
    from dlsm.config import parse_config

    def q(name: str):
        value = gin.query_parameter(name)
        return gin.query_parameter(str(value)) if str(value).startswith("%") else value  # a macro: its value

    gin.clear_config()
    try:
        parse_config([str(ROOT / "gin" / "cifar10.gin")], [])
        assert q("NCSNpp.num_res_blocks") == 8 and q("NCSNpp.channels") == 128
        assert q("NCSNpp.channel_mult") == (1, 2, 2, 2) and q("NCSNpp.attn_resolutions") == (16,)
        assert q("score/train.n_iters") == 950001 and q("score/train.batch_size") == 128
        assert q("score/train.warmup") == 5000 and q("score/train.ema_decay") == 0.999
        assert q("classifier/train.n_iters") == 60000 and q("classifier/train.batch_size") == 150
        assert q("classifier/train.ema_decay") == 0.0 and q("ConvClassifier.blocks_per_stage") == (2, 2, 2, 2)
        assert q("sample.n_per_class") == 5100 and q("noise_schedule.num_scales") == 1000
        # the evaluator's settings, bound once (CAS trains with them too: tests/test_image_suite.py)
        assert q("EvaluatorSettings.width") == 32 and q("EvaluatorSettings.depth") == 3
        assert q("EvaluatorSettings.n_iters") == 20000 and q("EvaluatorSettings.augment") is True
        gin.clear_config()
        parse_config([str(ROOT / "gin" / "cifar100.gin")], [])
        assert q("classifier/train.n_iters") == 60001 and q("classifier/train.warmup") == 1000
        assert q("ConvClassifier.blocks_per_stage") == (3, 4, 6, 3) and q("sample.n_per_class") == 600
        assert q("NCSNpp.num_res_blocks") == 8  # included from cifar10.gin
    finally:
        gin.clear_config()


@pytest.mark.parametrize(("gin_file", "folder"), [("cifar10.gin", "cifar-10-batches-py/"),
                                                   ("cifar100.gin", "cifar-100-python/")])
def test_cifar_file_offline_without_data_is_one_line(tmp_path, gin_file, folder):
    empty = tmp_path / "data"
    empty.mkdir()
    with took() as t:
        proc = launch(tmp_path, gin_file, empty)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dlsm: error:"), proc.stderr[-2000:]
    assert str(empty) in lines[0] and folder in lines[0] and t.wall_s < FAST_FAIL_S
    assert not list(tmp_path.rglob("*.pt"))


def test_cifar10_without_inception_weights_stops_in_seconds_before_training(tmp_path):
    """cifar10.gin binds Inception-v3 features; with the data but no weights file (nothing downloads), the run stops
    before anything trains, with one line naming the binding to set (smoke.gin's evaluator-only features undone)."""
    data = tmp_path / "data"
    make_cifar10(data, per_batch=20, n_test=40, balanced=True)
    with took() as t:
        proc = launch(tmp_path, "cifar10.gin", data, "image_features.networks = [@inception_network, "
                      "@evaluator_network]", env={"TORCH_HOME": str(tmp_path / "torch")})  # an empty hub cache
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("dlsm: error: Inception-v3 weights not found (nothing is downloaded)")
    assert "inception_network.weights_path" in lines[0] and t.wall_s < FAST_FAIL_S
    assert not list(tmp_path.rglob("*.pt"))


# ---- on a GPU (skipped without one): the CIFAR networks on CUDA, bf16, compile, device generators ------------------


needs_cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_cifar_networks_match_cpu_in_float64():
    import torch

    from dlsm.nets import ConvClassifier, NCSNpp, NCSNv2

    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    sig = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    nets = [NCSNpp((3, 32, 32), channels=32, num_res_blocks=1, init_scale=1.0), NCSNv2((3, 32, 32), ngf=16),
            ConvClassifier((3, 32, 32), 10, channels=(16, 32, 64, 128), blocks_per_stage=(2, 2, 2, 2), norm="batch",
                           condition="stage", emb_dim=128, num_frequencies=32)]
    for net in nets:
        net = net.double().eval()
        cpu = net(x, sig)
        gpu = net.to("cuda")(x.cuda(), sig.cuda())
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-8, atol=1e-8)


@needs_cuda
def test_cuda_bf16_dsm_and_dlsm_within_two_percent_of_fp32():
    """The fast path's bf16 autocast: DSM and the official DLSM' agree with fp32 on one batch within 2 %."""
    import torch

    from dlsm.math.losses import dsm_loss, total_loss
    from dlsm.nets import ConvClassifier, NCSNpp

    torch.manual_seed(0)
    dev = torch.device("cuda")
    score = NCSNpp((3, 32, 32), channels=32, num_res_blocks=1, init_scale=1.0).to(dev)
    clf = ConvClassifier((3, 32, 32), 10, channels=(16, 32, 64, 128), blocks_per_stage=(2, 2, 2, 2), norm="batch",
                         condition="stage").to(dev)
    g = torch.Generator(dev).manual_seed(0)
    x = torch.rand((32, 3, 32, 32), generator=g, device=dev)
    y = torch.randint(0, 10, (32,), generator=g, device=dev)
    sigma = 0.01 * 5000 ** torch.rand(32, generator=g, device=dev)
    noise = torch.randn(x.shape, generator=g, device=dev)
    for fn in (lambda: dsm_loss(score, x, sigma, noise),
               lambda: total_loss(clf, score.eval(), x, y, sigma, noise, lam=0.0, weight_power=0.0, reduce="mean")):
        ref = fn().float().mean()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = fn()
        assert low.dtype == torch.float32  # the losses accumulate in float32 under autocast
        assert float(low.mean()) == pytest.approx(float(ref), rel=2e-2)


@needs_cuda
def test_cuda_compiled_ncsnpp_matches_eager_and_guided_pc_is_reproducible():
    import torch

    from dlsm.math.samplers import predictor_corrector
    from dlsm.math.scores import ModelScores
    from dlsm.nets import ConvClassifier, NCSNpp

    torch.manual_seed(0)
    dev = torch.device("cuda")
    score = NCSNpp((3, 32, 32), channels=32, num_res_blocks=1, init_scale=1.0).to(dev).eval()
    x = torch.rand(8, 3, 32, 32, device=dev)
    torch.testing.assert_close(torch.compile(score)(x, 0.5), score(x, 0.5), rtol=1e-3, atol=1e-3)
    clf = ConvClassifier((3, 32, 32), 10, channels=(16, 32), norm="batch", condition="stage").to(dev)
    scores = ModelScores(score, clf, alpha=10.0)
    sigmas = torch.tensor([5.0, 1.0, 0.1])
    runs = []
    for _ in range(2):
        g = torch.Generator(dev).manual_seed(3)
        x0 = 5.0 * torch.randn((8, 3, 32, 32), generator=g, device=dev)
        runs.append(predictor_corrector(scores.posterior_fn(4), x0, sigmas, generator=g, disable=True))
    assert runs[0].is_cuda  # same generator seed, same samples (up to non-deterministic cuDNN kernels)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)
