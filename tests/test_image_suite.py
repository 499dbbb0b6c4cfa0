"""The image metric suite (dlsm.eval.images): Table 2 on known answers (a perfect sampler, a class-blind one),
streamed features against one pass, the real-data feature cache, Table 2's markdown, Figure 4, and bad input."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import gin
import pytest
import torch

from dlsm.data.images import digits, to_model_space
from dlsm.errors import CheckpointError, ConfigError, DataError, print_error
from dlsm.eval.evaluator import EvaluatorSettings, features_and_logits, load_or_train_evaluator
from dlsm.eval.fid import fid_from_features, kid_from_features
from dlsm.eval.images import (
    FeatureStream,
    check_samples,
    evaluator_network,
    figure4,
    image_metrics,
    preflight,
    reference_features,
    table2_markdown,
)
from dlsm.eval.points import Evaluation
from dlsm.eval.prdc import prdc
from dlsm.math.schedules import noise_schedule

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = EvaluatorSettings(seed=0, n_iters=150, batch_size=64, lr=2e-3, augment=False, width=16, depth=1)


@pytest.fixture(scope="module")
def splits():
    return digits(split="train"), digits(split="test")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def net(splits, cache):
    train, test = splits
    return evaluator_network(train, test, device=torch.device("cpu"), cache_dir=cache, settings=SETTINGS)


def _per_class(data, u: torch.Tensor, y: torch.Tensor) -> dict[int, torch.Tensor]:
    return {c: to_model_space(u[y == c], centered=data.centered) for c in range(data.num_classes)}


def _evaluation(splits, net, samples, tmp_path, stream=None) -> Evaluation:
    train, test = splits
    return Evaluation(train, noise_schedule(train), {}, samples=samples, seed=3, test_data=lambda: test,
                      cache_dir=tmp_path, stream=stream, feature_nets=lambda: [net])


def test_a_perfect_sampler_scores_as_the_training_set(splits, net, cache, tmp_path):
    """Samples = the training images with their labels: FID 0, P = R = C = 1, and the evaluator's accuracy on them
    as counted independently; the real row (test split) is computed against the same training features."""
    train, test = splits
    ev = _evaluation(splits, net, {"ours": _per_class(train, train.x_uint8, train.y)}, tmp_path)
    m = image_metrics(ev, k=5, with_cas=False)
    assert abs(m["ours/fid.evaluator"]) < 1e-6 and abs(m["ours/cw/fid.evaluator"]) < 1e-6
    for key in ("precision", "recall", "coverage", "cw/precision", "cw/recall", "cw/coverage"):
        assert m[f"ours/{key}.evaluator"] == 1.0, key
    train_net, _, _ = load_or_train_evaluator(train, test, SETTINGS, cache_dir=cache)  # the cached evaluator
    f, logits = features_and_logits(train_net, train.x)
    assert m["ours/sample_acc"] == pytest.approx((logits.argmax(1) == train.y).double().mean().item(), abs=1e-12)
    tf, _ = features_and_logits(train_net, test.x)
    assert m["real/fid.evaluator"] == pytest.approx(fid_from_features(f, tf), rel=1e-6)
    assert m["real/precision.evaluator"] == pytest.approx(prdc(f, tf, k=5)["precision"])
    assert m["evaluator/test_acc"] > 0.95 and m["real/sample_acc"] == pytest.approx(m["evaluator/test_acc"])


def test_a_class_blind_sampler_has_chance_sample_accuracy_and_worse_classwise_scores(splits, net, tmp_path):
    """Samples of class c drawn from class (c + 1) mod 10: sample accuracy near 0, overall P/R unchanged
    (same set), class-wise precision far below the overall one."""
    train, _ = splits
    shifted = (train.y + 1) % 10
    ev = _evaluation(splits, net, {"base": _per_class(train, train.x_uint8, shifted)}, tmp_path)
    m = image_metrics(ev, k=5, with_cas=False, real_row=False)
    assert m["base/sample_acc"] < 0.05 and m["base/precision.evaluator"] == 1.0
    assert m["base/cw/precision.evaluator"] < 0.5 and m["base/cw/fid.evaluator"] > 10 * m["base/fid.evaluator"] + 1
    assert "real/fid.evaluator" not in m


def test_streamed_features_equal_one_pass(splits, net, tmp_path):
    train, _ = splits
    stream = FeatureStream([net])
    idx = torch.arange(200)
    u, y = train.x_uint8[idx], train.y[idx]
    for i in range(0, 200, 37):  # uneven batches, as a sampler's last batch
        stream.add("ours", u[i : i + 37], y[i : i + 37])
    f, logits, labels = stream.get("evaluator", "ours")
    f1, l1 = net.extract(u)
    torch.testing.assert_close(f, f1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, l1, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, y) and stream.get("evaluator", "base") is None


def test_the_suite_uses_the_stream_when_it_has_the_method(splits, net, tmp_path):
    """A stream holding other features than the samples' own changes the result: the suite reads the stream."""
    train, _ = splits
    samples = {"ours": _per_class(train, train.x_uint8, train.y)}
    stream = FeatureStream([net])
    stream.add("ours", torch.flip(train.x_uint8, dims=[2]), train.y)  # upside-down digits
    plain = image_metrics(_evaluation(splits, net, samples, tmp_path), with_cas=False, real_row=False)
    streamed = image_metrics(_evaluation(splits, net, samples, tmp_path, stream), with_cas=False, real_row=False)
    assert plain["ours/fid.evaluator"] < 1e-6 < streamed["ours/fid.evaluator"]


def test_reference_features_are_cached_and_a_damaged_cache_is_one_line(splits, net, tmp_path, capsys):
    train, _ = splits
    f, logits = reference_features(net, train, tmp_path)
    (path,) = tmp_path.glob("features-*.pt")
    assert net.key in path.name and "digits" in path.name

    def boom(u):
        raise AssertionError("recomputed although cached")

    cached = type(net)(net.name, net.key, boom, net.class_logits)
    f2, l2 = reference_features(cached, train, tmp_path)
    assert torch.equal(f, f2) and torch.equal(logits, l2)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        reference_features(cached, train, tmp_path)
    print_error(err.value)
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and str(path) in line and "delete it" in line


def test_table2_markdown_lays_out_methods_and_columns():
    metrics = {"real/fid.evaluator": 0.5, "ours/fid.evaluator": 12.345678, "ours/cw/precision.evaluator": 0.75,
               "ours/cas": 0.9, "base/fid.evaluator": 20.0, "ours/sample_acc": 0.97}
    md = table2_markdown(metrics, ["real", "base", "ours"], "evaluator", k=5)
    lines = md.splitlines()
    head = next(ln for ln in lines if ln.startswith("| method"))
    assert head == "| method | FID ↓ | CW-P ↑ | CAS ↑ | acc ↑ |"
    assert "| ours | 12.35 | 0.75 | 0.9 | 0.97 |" in lines and "| base | 20 | — | — | — |" in lines
    assert lines.index("| real | 0.5 | — | — | — |") < lines.index("| base | 20 | — | — | — |")
    assert "k = 5" in lines[0]


def test_figure4_bars_are_the_sorted_per_class_differences():
    per_class = {"ours": {c: {"precision": 0.1 * c, "recall": 0.5, "density": 1.0, "coverage": 0.2} for c in range(4)},
                 "base": {c: {"precision": 0.3, "recall": 0.5 - 0.1 * c, "density": 1.0, "coverage": 0.4}
                          for c in range(4)}}
    fig = figure4(per_class, "evaluator")
    heights = [[round(p.get_height(), 12) for p in ax.patches] for ax in fig.axes]
    assert heights[0] == [0.0, -0.1, -0.2, -0.3]  # ours - base precision per class: -0.3, -0.2, -0.1, 0.0, sorted
    assert heights[1] == [0.3, 0.2, 0.1, 0.0]  # recall: 0.5 - (0.5 - 0.1 c) = 0.1 c, sorted down
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["3", "2", "1", "0"]
    assert heights[3] == [-0.2] * 4


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64), "need uint8 pixels"),
        (torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), "does not match"),
        (torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), "does not match"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), "one integer label"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.full((4,), 10), "must lie in"),
    ],
)
def test_bad_samples_are_one_line_data_errors(splits, images, labels, match, capsys):
    with pytest.raises(DataError, match=match) as err:
        check_samples("ours", images, labels, splits[0])
    print_error(err.value)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_fewer_samples_than_k_plus_one_in_a_class_is_one_line(splits, net, tmp_path, capsys):
    train, _ = splits
    few = {c: to_model_space(train.x_uint8[train.y == c][:3], centered=False) for c in range(10)}
    with pytest.raises(ConfigError, match=r"class 0: .*k=5 .*fewer samples than k\+1") as err:
        image_metrics(_evaluation(splits, net, {"ours": few}, tmp_path), k=5, with_cas=False, real_row=False)
    print_error(err.value)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_inception_bound_without_weights_fails_in_preflight_naming_the_binding(tmp_path, monkeypatch):
    from dlsm import components  # noqa: F401

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    gin.clear_config()
    try:
        gin.parse_config("image_features.networks = [@inception_network, @evaluator_network]")
        with pytest.raises(ConfigError, match="inception_network.weights_path"):
            preflight()
        missing = tmp_path / "nowhere.pth"
        gin.parse_config(f"inception_network.weights_path = '{missing}'")
        with pytest.raises(ConfigError, match=f"inception_network.weights_path={missing} does not exist"):
            preflight()
        gin.clear_config()
        gin.parse_config("image_features.networks = [@evaluator_network]")
        preflight()  # the evaluator needs no file
    finally:
        gin.clear_config()


def test_kid_and_is_are_finite_and_is_bounded_by_the_class_count(splits, net, tmp_path):
    train, _ = splits
    ev = _evaluation(splits, net, {"ours": _per_class(train, train.x_uint8, train.y)}, tmp_path)
    m = image_metrics(ev, k=5, with_cas=False, real_row=False, kid_subset_size=100)
    assert 1.0 <= m["ours/is.evaluator"] <= 10.0 + 1e-9
    f, _ = reference_features(net, train, tmp_path)
    by_class = torch.cat([f[train.y == c] for c in range(10)])  # the suite's order of the samples
    assert m["ours/kid.evaluator"] == pytest.approx(kid_from_features(f, by_class, subset_size=100, seed=3)[0],
                                                    rel=1e-5, abs=1e-9)
    ones = f[train.y == 1]  # one class against all ten: far from zero
    assert abs(m["ours/kid.evaluator"]) < 0.05 * kid_from_features(f, ones, subset_size=100, seed=3)[0]


def test_cas_of_the_real_training_set_is_the_ceiling_row(splits, net, tmp_path):
    train, _ = splits
    ev = _evaluation(splits, net, {}, tmp_path)
    gin.clear_config()
    try:
        gin.parse_config("cas/EvaluatorSettings.n_iters = 150")  # CAS alone
        m = image_metrics(ev, k=5, with_cas=True)
    finally:
        gin.clear_config()
    assert m["real/cas"] > 0.9


def test_cas_trains_the_evaluators_network_with_the_experiments_seed(splits, net, tmp_path, monkeypatch):
    """gin/cifar10.gin binds the evaluator's settings once (width 32, depth 3, ...): CAS trains with the same ones,
    seeded by the experiment (ev.seed = 3, the evaluator's seed stays 0), and cas/EvaluatorSettings.* changes CAS
    alone."""
    from dlsm import components  # noqa: F401
    from dlsm.config import parse_config
    from dlsm.eval import images as suite

    seen: list[EvaluatorSettings] = []

    def spy(images, labels, test, settings, *, device):
        seen.append(settings)
        return 0.5

    monkeypatch.setattr(suite, "cas", spy)
    train, _ = splits
    ev = _evaluation(splits, net, {"ours": _per_class(train, train.x_uint8, train.y)}, tmp_path)
    files = [str(ROOT / "gin" / "cifar10.gin")]  # nothing trains here: no need for gin/smoke.gin
    try:
        parse_config(files, [])
        evaluator = EvaluatorSettings()
        assert (evaluator.width, evaluator.depth, evaluator.batch_size, evaluator.n_iters) == (32, 3, 128, 20000)
        m = image_metrics(ev, k=3, with_cas=True)
        assert [(s.width, s.depth) for s in seen] == [(32, 3), (32, 3)]  # ours, then the real row
        assert seen == [replace(evaluator, seed=3)] * 2 and m["ours/cas"] == m["real/cas"] == 0.5
        seen.clear()
        parse_config(files, ["cas/EvaluatorSettings.width = 8"])
        image_metrics(ev, k=3, with_cas=True, real_row=False)
        assert seen == [replace(evaluator, seed=3, width=8)] and EvaluatorSettings() == evaluator
    finally:
        gin.clear_config()


def test_official_subsets_are_the_first_n_in_class_order_and_each_class_first_n_c():
    """Known answer: 10 samples of 3 classes drawn interleaved, a training set with 2, 3, 1 per class (6 in all)."""
    from dlsm.eval.images import _official_subsets

    fy = torch.tensor([2, 0, 1, 0, 1, 2, 0, 1, 1, 0])
    ff = torch.arange(10, dtype=torch.float64)[:, None]  # each row names its index
    ry = torch.tensor([0, 1, 2, 1, 0, 1])
    (of, olog, oy), (cf, cy) = _official_subsets(6, ry, ff, -ff, fy, 3)
    assert of[:, 0].tolist() == [1, 3, 6, 9, 2, 4] and oy.tolist() == [0, 0, 0, 0, 1, 1]  # class 0's 4, class 1's 2
    assert torch.equal(olog, -of)
    assert cf[:, 0].tolist() == [1, 3, 2, 4, 7, 0] and cy.tolist() == [0, 0, 1, 1, 1, 2]


def test_truncate_to_real_scores_the_official_subsets():
    """_scores(truncate=True) equals the metrics computed directly on the hand-picked subsets; sample accuracy counts
    every sample."""
    from types import SimpleNamespace

    from dlsm.eval.images import _scores

    g = torch.Generator().manual_seed(0)
    ry = torch.arange(3).repeat_interleave(torch.tensor([12, 10, 14]))  # 36 real
    rf = torch.randn(36, 4, generator=g, dtype=torch.float64) + ry[:, None]
    fy = torch.randint(0, 3, (60,), generator=g)
    fy[:48] = torch.arange(3).repeat(16)  # at least 16 per class, interleaved
    ff = torch.randn(60, 4, generator=g, dtype=torch.float64) + fy[:, None]
    flog = torch.randn(60, 3, generator=g, dtype=torch.float64)
    net = SimpleNamespace(class_logits=True)
    out, per_class = _scores((rf, None, ry), (ff, flog, fy), net, 3, k=3, kid_subset_size=10, seed=0, truncate=True)
    order = [i for c in range(3) for i in range(60) if int(fy[i]) == c]  # class order, drawing order within
    first = torch.tensor(order[:36])
    assert out["fid"] == pytest.approx(fid_from_features(rf, ff[first]), rel=1e-9)
    assert out["precision"] == pytest.approx(prdc(rf, ff[first], k=3)["precision"], rel=1e-12)
    per_c = [[i for i in order if int(fy[i]) == c][: int((ry == c).sum())] for c in range(3)]
    for c in range(3):
        assert per_class[c]["fid"] == pytest.approx(fid_from_features(rf[ry == c], ff[per_c[c]]), rel=1e-9)
    assert out["cw/fid"] == pytest.approx(sum(per_class[c]["fid"] for c in range(3)) / 3, rel=1e-12)
    assert out["sample_acc"] == pytest.approx(float((flog.argmax(1) == fy).double().mean()))  # all 60
    full, _ = _scores((rf, None, ry), (ff, flog, fy), net, 3, k=3, kid_subset_size=10, seed=0)
    assert full["fid"] != pytest.approx(out["fid"], rel=1e-6)  # the subsets change the numbers


def test_official_cas_protocol_trains_torchvisions_resnet50_at_a_constant_learning_rate(splits, monkeypatch):
    """cas/EvaluatorSettings.network = 'resnet50', lr_schedule = 'constant' (gin/eval_official.gin): torchvision's
    ResNet-50 from scratch with a 7x7 stride-2 stem on the data's channels (models/classifier_cas.py), Adam at the
    given rate at every step (the cosine default decays it); the feature evaluator refuses it in one line."""
    import torchvision

    from dlsm.eval import evaluator as ev_mod
    from dlsm.eval.evaluator import evaluator_cache_key, train_evaluator

    train, test = splits
    rates: list[list[float]] = []
    step = torch.optim.Adam.step

    def spy(self, *a, **kw):
        rates[-1].append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    small = train.subset(torch.arange(64))
    for schedule in ("constant", "cosine"):
        rates.append([])
        s = EvaluatorSettings(n_iters=4, batch_size=8, lr=2e-4, network="resnet50", lr_schedule=schedule)
        model, acc = train_evaluator(small, test.subset(torch.arange(50)), s)
        assert isinstance(model, torchvision.models.ResNet) and 0.0 <= acc <= 1.0
        assert tuple(model.conv1.weight.shape) == (64, 1, 7, 7) and model.conv1.stride == (2, 2)
        assert model.fc.out_features == 10 and not model.training
    assert rates[0] == [2e-4] * 4
    assert rates[1] == pytest.approx([2e-4 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])
    key = evaluator_cache_key(small, test, EvaluatorSettings(network="resnet50"))
    assert key["network"] == "resnet50" and "lr_schedule" not in key  # a later field, keyed when not its default
    with pytest.raises(ConfigError, match="has no feature layer for the metrics: bind it for CAS alone"):
        ev_mod.load_or_train_evaluator(small, test, EvaluatorSettings(network="resnet50"), cache_dir=Path("x"))
