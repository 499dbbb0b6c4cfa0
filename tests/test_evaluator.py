"""The project's evaluator classifier (dlsm.eval.evaluator) and the Classification Accuracy Score (dlsm.eval.cas),
on scikit-learn's digits: accuracies against known answers, features against a float64 recomputation, the cache,
determinism, and CAS's ceiling and floor (Ravuri & Vinyals 2019)."""

from __future__ import annotations

import inspect
import time
from dataclasses import fields, replace

import gin
import pytest
import torch

import dlsm.eval.evaluator as ev
from dlsm.data.images import digits
from dlsm.errors import CheckpointError, ConfigError, DataError
from dlsm.eval.cas import cas
from dlsm.eval.evaluator import (
    EvaluatorNet,
    EvaluatorSettings,
    evaluator_cache_key,
    evaluator_cache_path,
    features_and_logits,
    load_or_train_evaluator,
    random_crop,
    sample_accuracy,
    train_evaluator,
)
from dlsm.train.checkpoints import save_checkpoint

# Cheaper than the defaults (200 steps): about 1.5 s per training on one core at 8x8.
SETTINGS = EvaluatorSettings(seed=0, n_iters=150, batch_size=64, lr=2e-3, augment=False, width=16, depth=1)


@pytest.fixture(scope="module")
def data():
    return digits(split="train"), digits(split="test")


@pytest.fixture(scope="module")
def trained(data):
    train, test = data
    return train_evaluator(train, test, SETTINGS)


def _weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluator_is_accurate_on_the_digits_test_split(trained, data):
    net, acc = trained
    _, test = data
    assert not net.training and acc > 0.95
    with torch.no_grad():  # independent count: one forward pass over the whole split
        preds = net(test.x).argmax(dim=1)
    assert acc == (preds == test.y).sum().item() / len(test)


def test_sample_accuracy_known_answers(trained, data):
    net, acc = trained
    _, test = data
    # real test images with their true labels: exactly the evaluator's test accuracy
    assert sample_accuracy(net, test.x, test.y, batch_size=64) == pytest.approx(acc, abs=1e-12)
    # labels shifted by one class: the evaluator almost never predicts the shifted class
    with torch.no_grad():
        preds = net(test.x).argmax(dim=1)
    shifted = (test.y + 1) % 10
    low = sample_accuracy(net, test.x, shifted)
    assert low == pytest.approx((preds == shifted).double().mean().item(), abs=1e-12) and low < 0.05


def test_features_shape_head_and_streaming(trained, data):
    net, _ = trained
    _, test = data
    x = test.x
    feats, logits = features_and_logits(net, x, batch_size=1000)
    assert net.feature_dim == 4 * SETTINGS.width == 64
    assert feats.shape == (len(test), 64) and logits.shape == (len(test), 10)
    assert feats.dtype == logits.dtype == torch.float32 and (feats >= 0).all()  # pooled after a ReLU
    # logits are the linear head of the features (float64 recomputation)
    w, b = net.head.weight.double(), net.head.bias.double()
    torch.testing.assert_close(logits.double(), feats.double() @ w.T + b, rtol=1e-5, atol=1e-5)
    # batch by batch, as samples arrive, equals one call; a net left in training mode is evaluated in eval mode
    # and given back in training mode with its BatchNorm statistics untouched
    before = _weights(net)
    net.train()
    try:
        parts = [features_and_logits(net, chunk, batch_size=7) for chunk in x.split(50)]
        assert net.training
    finally:
        net.eval()
    assert _same_weights(before, _weights(net))
    torch.testing.assert_close(torch.cat([f for f, _ in parts]), feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([lg for _, lg in parts]), logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x), rtol=1e-5, atol=1e-5)
    empty_f, empty_l = features_and_logits(net, x[:0])
    assert empty_f.shape == (0, 64) and empty_l.shape == (0, 10)
    with pytest.raises(TypeError, match="float images"):
        features_and_logits(net, test.x_uint8)


def test_training_is_deterministic_and_leaves_the_global_stream(data):
    train, test = data
    short = replace(SETTINGS, n_iters=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)  # a global stream that seed 0 would not reproduce
        state = torch.random.get_rng_state()
        a, acc_a = train_evaluator(train, test, short)
        assert torch.equal(torch.random.get_rng_state(), state)
    b, acc_b = train_evaluator(train, test, short)
    c, _ = train_evaluator(train, test, replace(short, seed=1))
    assert _same_weights(_weights(a), _weights(b)) and acc_a == acc_b
    assert not _same_weights(_weights(a), _weights(c))
    # with augmentation too (flips and crops come from the seeded generator)
    d, _ = train_evaluator(train, test, replace(short, augment=True))
    e, _ = train_evaluator(train, test, replace(short, augment=True))
    assert _same_weights(_weights(d), _weights(e)) and not _same_weights(_weights(a), _weights(d))


@pytest.mark.parametrize("augment", [False, True])
def test_two_steps_follow_the_documented_protocol(data, augment):
    """Known answer: two steps re-done by hand (init from manual_seed, then per step idx, flip coins, crop offsets
    from one generator; cross-entropy; Adam at lr and lr (1 + cos(pi / 2)) / 2 = lr / 2) give the same weights."""
    train, test = data
    settings = EvaluatorSettings(seed=5, n_iters=2, batch_size=8, lr=1e-2, augment=augment, width=4, depth=1)
    net, _ = train_evaluator(train, test, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        ref = EvaluatorNet((1, 8, 8), 10, width=4)
    ref.train()
    gen = torch.Generator().manual_seed(5)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for lr_t in (1e-2, 5e-3):
        idx = torch.randint(0, len(train), (8,), generator=gen)
        u = train.x_uint8[idx]
        if augment:
            flip = torch.rand(8, generator=gen) < 0.5
            off = torch.randint(0, 3, (8, 2), generator=gen)  # pad max(1, 8 // 8) = 1
            padded = torch.nn.functional.pad(torch.where(flip[:, None, None, None], u.flip(-1), u), (1, 1, 1, 1))
            u = torch.stack([padded[i, :, dy:dy + 8, dx:dx + 8] for i, (dy, dx) in enumerate(off.tolist())])
        loss = torch.nn.functional.cross_entropy(ref(u.double().div(255).float()), train.y[idx])
        for group in opt.param_groups:
            group["lr"] = lr_t
        opt.zero_grad()
        loss.backward()
        opt.step()
    got, want = net.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


def test_cache_trains_once_then_loads_identical_weights(data, trained, tmp_path, monkeypatch):
    train, test = data
    net0, acc0 = trained
    t0 = time.perf_counter()
    net1, acc1, path = load_or_train_evaluator(train, test, SETTINGS, cache_dir=tmp_path)
    first = time.perf_counter() - t0
    assert path.is_file() and path.parent == tmp_path and path.name.startswith("evaluator-digits-1x8x8-")
    assert path == evaluator_cache_path(train, test, SETTINGS, cache_dir=tmp_path)
    # same seed and settings as the fixture: the same weights and accuracy
    assert _same_weights(_weights(net0), _weights(net1)) and acc1 == acc0
    state = torch.load(path, weights_only=True)
    assert state["test_accuracy"] == acc0 and state["key"] == evaluator_cache_key(train, test, SETTINGS)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached evaluator was trained again")

    monkeypatch.setattr(ev, "train_evaluator", no_training)
    t0 = time.perf_counter()
    net2, acc2, path2 = load_or_train_evaluator(train, test, SETTINGS, cache_dir=tmp_path)
    second = time.perf_counter() - t0
    assert path2 == path and acc2 == acc0 and not net2.training
    assert _same_weights(_weights(net1), _weights(net2))
    assert second < first / 3

    # a damaged file is a one-line error naming it, never silently replaced
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="delete it") as err:
        load_or_train_evaluator(train, test, SETTINGS, cache_dir=tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    # a file under this name holding another evaluator (here: other seed in its key)
    save_checkpoint(path, {**state, "key": {**state["key"], "seed": 99}})
    with pytest.raises(CheckpointError, match="another evaluator"):
        load_or_train_evaluator(train, test, SETTINGS, cache_dir=tmp_path)
    # weights that do not fit the network
    model = dict(state["model"])
    model.pop("head.bias")
    save_checkpoint(path, {**state, "model": model})
    with pytest.raises(CheckpointError, match="does not match the evaluator network"):
        load_or_train_evaluator(train, test, SETTINGS, cache_dir=tmp_path)


CHANGES = [("seed", 1), ("n_iters", 151), ("batch_size", 32), ("lr", 1e-3), ("augment", True), ("width", 8),
           ("depth", 2), ("network", "resnet50"), ("lr_schedule", "constant")]


def test_cache_path_changes_with_every_setting_and_the_data(data, tmp_path):
    train, test = data
    base = evaluator_cache_path(train, test, SETTINGS, cache_dir=tmp_path)
    # an equal copy of the data (new tensors, same bytes) finds the same file
    copy = replace(train, x_uint8=train.x_uint8.clone(), y=train.y.clone())
    assert evaluator_cache_path(copy, test, SETTINGS, cache_dir=tmp_path) == base
    paths = {base}
    for name, value in CHANGES:
        paths.add(evaluator_cache_path(train, test, replace(SETTINGS, **{name: value}), cache_dir=tmp_path))
    pixel = train.x_uint8.clone()
    pixel[5, 0, 3, 3] ^= 1
    label = test.y.clone()
    label[0] = (label[0] + 1) % 10
    for tr, te in [(replace(train, x_uint8=pixel), test), (train, replace(test, y=label)),
                   (train.subset(range(1000)), test), (replace(train, centered=True), replace(test, centered=True)),
                   (replace(train, name="digits2"), test), (train, digits(split="test", seed=1))]:
        paths.add(evaluator_cache_path(tr, te, SETTINGS, cache_dir=tmp_path))
    assert len(paths) == 1 + len(CHANGES) + 6
    # every training setting is a field of the one settings object, part of the key, and changed above; the
    # functions that train take that object and no other setting
    key = evaluator_cache_key(train, test, replace(SETTINGS, **dict(CHANGES)))  # later fields: keyed when changed
    names = {f.name for f in fields(EvaluatorSettings)}
    assert names <= set(key) and {name for name, _ in CHANGES} == names
    for fn, skip in [(train_evaluator, {"train", "test", "device"}),
                     (load_or_train_evaluator, {"train", "test", "device", "cache_dir"}),
                     (evaluator_cache_key, {"train", "test"}), (evaluator_cache_path, {"train", "test", "cache_dir"}),
                     (cas, {"images", "labels", "test", "device"})]:
        assert set(inspect.signature(fn).parameters) - skip == {"settings"}, fn.__name__


def test_cache_key_of_the_default_settings_is_unchanged(data, tmp_path):
    """The key (and so the file name) of the default settings, written out: caches trained before the settings
    became one object stay valid."""
    train, test = data
    gin.clear_config()  # EvaluatorSettings() reads its gin bindings: none here
    settings = EvaluatorSettings()
    assert settings == EvaluatorSettings(seed=0, n_iters=200, batch_size=64, lr=2e-3, augment=False, width=16, depth=1)
    assert evaluator_cache_key(train, test, settings) == {
        "version": "evaluator-v1", "dataset": "digits", "num_classes": 10, "centered": False,
        "image_shape": [1, 8, 8], "train_size": 1437, "test_size": 360,
        "train_sha256": "7531db42dd3ff2d2862222a0b92a7132eab114482b8de0e522adc4d755f9686c",
        "test_sha256": "a2fc2790f951761efa3de96d98e5fd3fec1bfbc4ef550eb2193c8e5117cf4c96",
        "seed": 0, "n_iters": 200, "batch_size": 64, "lr": 0.002, "augment": False, "width": 16, "depth": 1,
    }
    path = evaluator_cache_path(train, test, settings, cache_dir=tmp_path)
    assert path == tmp_path / "evaluator-digits-1x8x8-6dcc40f7ac3311ad.pt"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seed", 1.5, "evaluator seed must be an integer, got 1.5"),
    ("n_iters", 0, "evaluator n_iters must be an integer >= 1, got 0"),
    ("batch_size", 1, "evaluator batch_size must be an integer >= 2 (for BatchNorm), got 1"),
    ("lr", float("nan"), "evaluator lr must be a positive number, e.g. 0.002, got nan"),
    ("augment", 1, "evaluator augment must be True or False, got 1"),
    ("width", 0, "evaluator width must be an integer >= 1, got 0"),
    ("depth", True, "evaluator depth must be an integer >= 1, got True"),
])
def test_bad_settings_are_one_line_config_errors(field, value, message):
    with pytest.raises(ConfigError) as err:
        replace(SETTINGS, **{field: value})
    assert str(err.value).splitlines()[0] == message  # gin adds the configurable's name below it


def test_cas_ceiling_is_the_evaluator_protocol_on_real_data(data, trained):
    train, test = data
    _, acc = trained
    # float images in model space are quantised back to exactly the uint8 data: the same run as the fixture
    ceiling = cas(train.x, train.y, test, SETTINGS)
    assert ceiling == acc and ceiling > 0.9


def test_cas_of_useless_samples_is_near_chance(data):
    train, test = data
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (1000, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (1000,), generator=g)
    assert cas(noise, labels, test, SETTINGS) < 0.3
    # real images all labelled 0: the classifier can only say 0, so CAS is the share of zeros in the test split
    zeros = cas(train.x_uint8, torch.zeros(len(train), dtype=torch.int64), test, replace(SETTINGS, n_iters=20))
    assert zeros == pytest.approx((test.y == 0).double().mean().item(), abs=1e-12)


def test_evaluator_at_32x32(tmp_path):
    train, test = digits(split="train", size=32), digits(split="test", size=32)
    settings = EvaluatorSettings(seed=0, n_iters=100, batch_size=32, lr=2e-3, augment=False, width=16, depth=1)
    net, acc, path = load_or_train_evaluator(train, test, settings, cache_dir=tmp_path)
    assert acc > 0.95 and path.name.startswith("evaluator-digits-1x32x32-")
    feats, logits = features_and_logits(net, test.x[:10])
    assert feats.shape == (10, 4 * ev.DEFAULT_WIDTH) and logits.shape == (10, 10)


def test_random_crop_against_a_loop():
    g = torch.Generator().manual_seed(3)
    u = torch.randint(0, 256, (6, 2, 5, 7), generator=g, dtype=torch.uint8)
    pad = 2
    off = torch.randint(0, 2 * pad + 1, (6, 2), generator=torch.Generator().manual_seed(4))
    out = random_crop(u, pad, generator=torch.Generator().manual_seed(4))
    for i in range(6):
        ref = torch.zeros(2, 5 + 2 * pad, 7 + 2 * pad, dtype=torch.uint8)
        ref[:, pad:pad + 5, pad:pad + 7] = u[i]
        dy, dx = off[i].tolist()
        assert torch.equal(out[i], ref[:, dy:dy + 5, dx:dx + 7])
    centre = torch.full((6, 2), pad)
    assert (off == centre).all(dim=1).sum() < 6  # the draws are not all the identity crop


def test_bad_inputs_are_one_line_errors(data, trained):
    train, test = data
    net, _ = trained
    with pytest.raises(ConfigError, match="batch_size"):
        train_evaluator(train, test, replace(SETTINGS, batch_size=1))
    with pytest.raises(TypeError, match="train_evaluator takes an EvaluatorSettings, got dict"):
        train_evaluator(train, test, {"seed": 0})
    with pytest.raises(ConfigError, match="divisible by 4"):
        EvaluatorNet((1, 6, 6), 10)
    with pytest.raises(DataError, match="does not match test data"):
        train_evaluator(train, digits(split="test", size=16), SETTINGS)
    with pytest.raises(DataError, match="labels must be 5 integers"):
        cas(train.x_uint8[:5], train.y[:4], test, SETTINGS)
    with pytest.raises(DataError, match="labels must lie in"):
        cas(train.x_uint8[:5], torch.full((5,), 10), test, SETTINGS)
    with pytest.raises(DataError, match="non-empty"):
        cas(train.x_uint8[:, :, :4], train.y, test, SETTINGS)
    with pytest.raises(ConfigError, match="built for images"):
        features_and_logits(net, torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="as many labels"):
        sample_accuracy(net, test.x[:3], test.y[:2])
