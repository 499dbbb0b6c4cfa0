"""dlsm.data.images: uint8 image datasets, CIFAR through torchvision's real loader, digits split and resize."""

import os
import pickle
import time
from collections import Counter

import gin
import numpy as np
import pytest
import torch
from cifar_archives import CIFAR10_NAMES, make_cifar10, make_cifar100  # tests/, on sys.path

from dlsm.data.images import ImageData, cifar10, cifar100, digits, digits_to_uint8
from dlsm.errors import DataError


@pytest.fixture
def stand_in_md5(monkeypatch):
    """The stand-in files cannot match CIFAR's md5 sums: torchvision's check becomes 'the file exists'."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _one_line(err: pytest.ExceptionInfo) -> str:
    """The error's own message: gin appends "In call to configurable ..." lines, which dlsm.launch drops."""
    lines = str(err.value).splitlines()
    assert lines and lines[0] and lines[0].strip() == lines[0], lines
    assert all(line.strip().startswith("In call to configurable") for line in lines[1:]), lines
    return lines[0]


def test_tiny_archive_is_real_cifar_pickle_format(tmp_path):
    make_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # how the CIFAR page reads it
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (2, 3072)


def test_cifar10_through_torchvision_pixels_labels_splits(tmp_path, stand_in_md5):
    train_r, train_l, test_r, test_l = make_cifar10(tmp_path)
    tr = cifar10(root=tmp_path)
    assert isinstance(tr, ImageData) and tr.x_uint8.dtype == torch.uint8
    assert tuple(tr.x_uint8.shape) == (10, 3, 32, 32) and tr.shape == (3, 32, 32) and tr.dim == 3072 and len(tr) == 10
    assert tr.x_uint8[5, 2, 5, 7] == 201  # the planted pixel (c, h, w) of data_batch_3 row 1
    # every pixel: flat index c*1024 + h*32 + w of row i
    i, c, h, w = 7, 1, 30, 2
    assert tr.x_uint8[i, c, h, w] == train_r[i, c * 1024 + h * 32 + w]
    assert torch.equal(tr.x_uint8, torch.from_numpy(train_r).view(10, 3, 32, 32))
    assert tr.y.tolist() == train_l and tr.y.dtype == torch.int64
    assert tr.num_classes == 10 and tr.class_names == tuple(n.decode() for n in CIFAR10_NAMES)
    assert tr.name == "cifar10" and not tr.centered

    te = cifar10(root=tmp_path, split="test", centered=True)
    assert len(te) == 3 and te.y.tolist() == test_l and te.x_uint8[0, 2, 5, 7] == 7
    assert torch.equal(te.x_uint8, torch.from_numpy(test_r).view(3, 3, 32, 32)) and te.centered


def test_cifar100_through_torchvision(tmp_path, stand_in_md5):
    ref = make_cifar100(tmp_path)
    for split in ("train", "test"):
        d = cifar100(root=str(tmp_path), split=split)
        rows, fine = ref[split]
        assert torch.equal(d.x_uint8, torch.from_numpy(rows).view(-1, 3, 32, 32))
        assert d.y.tolist() == fine
        assert d.num_classes == 100 and d.class_names[37] == "fine37" and d.name == "cifar100"


def test_data_root_env_and_binding_overrides_it(tmp_path, monkeypatch, stand_in_md5):
    a, b = tmp_path / "a", tmp_path / "b"
    make_cifar10(a, seed=0)
    make_cifar10(b, seed=5)
    monkeypatch.setenv("DATA_ROOT", str(a))
    from_env = cifar10()
    assert torch.equal(from_env.x_uint8, cifar10(root=a).x_uint8)
    assert not torch.equal(from_env.x_uint8, cifar10(root=b).x_uint8)
    try:
        gin.parse_config(f"cifar10.root = '{b}'")
        assert torch.equal(cifar10().x_uint8, cifar10(root=b).x_uint8)
    finally:
        gin.clear_config()
    monkeypatch.chdir(b.parent)  # no DATA_ROOT: ./data
    monkeypatch.delenv("DATA_ROOT")
    with pytest.raises(DataError) as err:
        cifar10()
    assert f"{tmp_path / 'data'}/cifar-10-batches-py/" in _one_line(err)


def test_offline_missing_cifar_is_one_line_fast_and_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        cifar10()
    assert time.perf_counter() - t0 < 5.0
    msg = _one_line(err)
    assert msg == (f"CIFAR-10 not found in {tmp_path}: expected {tmp_path}/cifar-10-batches-py/ "
                   "(set DATA_ROOT or cifar10.root, or cifar10.download = True with internet)")
    with pytest.raises(DataError) as err:
        cifar100(split="test")
    assert f"{tmp_path}/cifar-100-python/" in _one_line(err)
    assert no_network == []


def test_download_without_internet_is_one_line(tmp_path, no_network):
    with pytest.raises(DataError) as err:
        cifar10(root=tmp_path, download=True)
    msg = _one_line(err)
    assert msg.startswith("could not download CIFAR-10 from https://") and str(tmp_path) in msg
    assert no_network  # a connection was tried, and refused


def test_partial_and_corrupt_folders(tmp_path, stand_in_md5, monkeypatch):
    make_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_4").unlink()
    with pytest.raises(DataError) as err:
        cifar10(root=tmp_path)
    msg = _one_line(err)
    assert "incomplete or corrupt" in msg and "missing data_batch_4" in msg and f"{d}/" in msg

    (d / "data_batch_4").write_bytes((d / "data_batch_1").read_bytes()[:100])  # truncated pickle
    with pytest.raises(DataError) as err:
        cifar10(root=tmp_path)
    assert "cannot be read" in _one_line(err)

    monkeypatch.undo()  # the real md5 check: every stand-in fails it
    with pytest.raises(DataError) as err:
        cifar10(root=tmp_path, split="test")
    assert "a file fails its md5 check" in _one_line(err)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: cifar10(split="val"), "cifar10.split must be 'train' or 'test', got 'val'"),
        (lambda: cifar100(split="Train"), "cifar100.split must be 'train' or 'test'"),
        (lambda: digits(split="valid"), "digits.split must be 'train' or 'test'"),
        (lambda: digits(size=0), "digits.size must be a positive integer"),
        (lambda: digits(size=2.5), "digits.size must be a positive integer"),
        (lambda: digits(test_fraction=0.0), "digits.test_fraction must be in (0, 1)"),
        (lambda: digits(test_fraction=1.0), "digits.test_fraction must be in (0, 1)"),
        (lambda: digits(test_fraction=0.001), "cannot split 1,797 images stratified"),
    ],
)
def test_bad_arguments_are_one_line(call, needle):
    with pytest.raises(DataError) as err:
        call()
    assert needle in _one_line(err)


def test_missing_data_root_is_named(tmp_path, monkeypatch, no_network):
    missing = tmp_path / "nope"
    monkeypatch.setenv("DATA_ROOT", str(missing))
    with pytest.raises(DataError) as err:
        cifar10(download=True)  # not even a download into a mistyped DATA_ROOT
    assert _one_line(err).startswith(f"DATA_ROOT={missing} does not exist")
    assert not missing.exists() and no_network == []


# --------------------------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def sk_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def test_digits_mapping_known_values():
    v = torch.tensor([0, 1, 5, 8, 13, 15, 16])
    # round(255 v / 16) with halves up: 0, 15.94, 79.69, 127.5, 207.19, 239.06, 255
    assert digits_to_uint8(v).tolist() == [0, 16, 80, 128, 207, 239, 255]


def test_digits_split_is_stratified_partition_of_all_images(sk_digits):
    images, target = sk_digits
    tr, te = digits(), digits(split="test")
    assert tr.shape == (1, 8, 8) and len(tr) + len(te) == 1797 and len(te) == 360  # ceil(0.2 * 1797)
    assert tr.num_classes == 10 and tr.class_names == tuple("0123456789") and tr.x_uint8.dtype == torch.uint8
    per_class = np.bincount(target, minlength=10)
    test_counts = np.bincount(te.y.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * per_class) <= 1.0)
    assert np.array_equal(np.bincount(tr.y.numpy(), minlength=10) + test_counts, per_class)
    # the pixels, mapped independently (numpy, halves up), as (bytes, label) pairs: a partition of the 1,797
    ref = np.floor(images * 255.0 / 16.0 + 0.5).astype(np.uint8)
    everything = Counter((im.tobytes(), int(t)) for im, t in zip(ref, target, strict=True))
    got_tr = Counter((im[0].tobytes(), int(t)) for im, t in zip(tr.x_uint8.numpy(), tr.y.numpy(), strict=True))
    got_te = Counter((im[0].tobytes(), int(t)) for im, t in zip(te.x_uint8.numpy(), te.y.numpy(), strict=True))
    assert not set(got_tr) & set(got_te)
    assert got_tr + got_te == everything


def test_digits_split_depends_on_seed_only():
    a, b, c = digits(split="test", seed=3), digits(split="test", seed=3), digits(split="test", seed=4)
    assert torch.equal(a.x_uint8, b.x_uint8) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x_uint8, c.x_uint8)
    assert len(digits(split="test", test_fraction=0.5)) == 899  # ceil(0.5 * 1797)


def test_digits_resize_to_32_matches_pil_bilinear():
    from PIL import Image

    small, big = digits(split="test"), digits(split="test", size=32)
    assert tuple(big.x_uint8.shape) == (360, 1, 32, 32) and big.shape == (1, 32, 32) and big.dim == 1024
    assert torch.equal(big.y, small.y)
    x = big.x
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    ref = np.stack([
        np.asarray(Image.fromarray(im[0].astype(np.float32), mode="F").resize((32, 32), Image.BILINEAR))
        for im in small.x_uint8.numpy()[:40]
    ])
    assert np.abs(big.x_uint8.numpy()[:40, 0].astype(float) - ref).max() <= 1.0
    assert int(big.x_uint8.max()) >= 250 and int(big.x_uint8.min()) == 0
    assert torch.equal(big.x_uint8, digits(split="test", size=32).x_uint8)


# --------------------------------------------------------------------------------------------------------------
# ImageData: conversion, decode, flips, devices


def _toy(centered=False, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 256, (n, 3, 4, 5), generator=g, dtype=torch.uint8)
    return ImageData(u, torch.arange(n) % 3, 3, "toy", ("a", "b", "c"), centered)


def test_batch_known_answers():
    u = torch.tensor([0, 51, 102, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    d = ImageData(u, torch.tensor([1]), 2, "k")
    x, y = d.batch(torch.tensor([0]))
    assert x.dtype == torch.float32 and y.tolist() == [1]
    torch.testing.assert_close(x.flatten(), torch.tensor([0.0, 0.2, 0.4, 1.0]), rtol=0, atol=1e-7)
    xc, _ = ImageData(u, torch.tensor([1]), 2, "k", centered=True).batch([0])
    torch.testing.assert_close(xc.flatten(), torch.tensor([-1.0, -0.6, -0.2, 1.0]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("centered", [False, True])
def test_decode_inverts_batch_for_all_256_levels(centered):
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    d = ImageData(u, torch.zeros(1, dtype=torch.int64), 1, "levels", centered=centered)
    x, _ = d.batch([0])
    assert torch.equal(d.decode(x), u)
    lo, hi = (-1.0, 1.0) if centered else (0.0, 1.0)
    assert float(x.min()) == lo and float(x.max()) == hi
    # rounding to the nearest level and clamping outside the range
    step = (hi - lo) / 255
    probe = torch.tensor([lo - 5.0, lo + 0.4 * step, lo + 0.6 * step, lo + 200.3 * step, lo + 200.9 * step,
                          hi - 0.2 * step, hi + 3.0, float("nan")])
    assert d.decode(probe).tolist() == [0, 0, 1, 200, 201, 255, 255, 0]
    # the official sampler's np.clip(255 x, 0, 255).astype(np.uint8): truncation (gin/eval_official.gin)
    import gin

    from dlsm.data.images import from_model_space

    assert from_model_space(probe, centered=centered, rounding="truncate").tolist() == [0, 0, 0, 200, 200, 254, 255, 0]
    gin.clear_config()
    try:
        gin.bind_parameter("from_model_space.rounding", "truncate")
        assert d.decode(probe).tolist() == [0, 0, 0, 200, 200, 254, 255, 0]  # the binding reaches decode
        if not centered:  # (x + 1) 127.5 in float32 falls just below some levels, which truncation then drops
            assert torch.equal(d.decode(x), u)  # exact levels stay exact
    finally:
        gin.clear_config()


def test_x_of_class_and_subset():
    d = _toy(centered=True)
    torch.testing.assert_close(d.x, d.x_uint8.double().mul(2 / 255).sub(1).float(), rtol=0, atol=1e-6)
    assert torch.equal(d.of_class(1), d.x[[1, 4]])
    s = d.subset(d.y == 2)
    assert torch.equal(s.x_uint8, d.x_uint8[[2, 5]]) and s.y.tolist() == [2, 2] and s.centered and s.num_classes == 3


def _flipped_mask(out: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """Per row: True if out == flip(orig, W), False if out == orig; fails if neither."""
    same = (out == orig).flatten(1).all(1)
    mirrored = (out == torch.flip(orig, dims=[-1])).flatten(1).all(1)
    assert torch.all(same ^ mirrored), "every row is exactly the original or exactly its horizontal mirror"
    return mirrored


def test_flip_mirrors_about_half_the_rows_reproducibly():
    d = _toy(n=6)
    idx = torch.arange(4000) % 6
    orig, y0 = d.batch(idx)
    out, y = d.batch(idx, flip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, y0)
    flipped = _flipped_mask(out, orig)
    assert 1800 < int(flipped.sum()) < 2200  # Binomial(4000, 1/2): mean 2000, sd 32
    again, _ = d.batch(idx, flip=True, generator=torch.Generator().manual_seed(1))
    other, _ = d.batch(idx, flip=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again, out) and not torch.equal(other, out)
    assert torch.equal(d.batch(idx, flip=False, generator=torch.Generator().manual_seed(1))[0], orig)


def test_to_cpu_roundtrip_and_validation():
    d = _toy()
    e = d.to("cpu")
    assert e.device.type == "cpu" and torch.equal(e.x_uint8, d.x_uint8) and torch.equal(e.y, d.y)
    assert e.class_names == d.class_names and e.name == "toy"
    m = d.to("meta")  # a device other than the CPU, available everywhere
    assert m.x_uint8.is_meta and m.y.is_meta and m.x_uint8.dtype == torch.uint8 and m.shape == d.shape
    assert d.x_uint8.device.type == "cpu"  # the original is untouched
    with pytest.raises(DataError, match="uint8"):
        ImageData(d.x_uint8.float(), d.y, 3, "bad")
    with pytest.raises(DataError, match="int64"):
        ImageData(d.x_uint8, d.y[:2], 3, "bad")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_live_on_gpu_and_match_cpu():
    d = _toy(centered=True, n=64)
    g = d.to("cuda")
    assert g.x_uint8.is_cuda and g.x_uint8.dtype == torch.uint8 and g.y.is_cuda
    idx = torch.randint(0, 64, (500,), device="cuda")
    x, y = g.batch(idx)
    assert x.is_cuda and y.is_cuda
    xc, yc = d.batch(idx.cpu())
    assert torch.equal(x.cpu(), xc) and torch.equal(y.cpu(), yc)
    xf, _ = g.batch(idx, flip=True, generator=torch.Generator(device="cuda").manual_seed(0))
    assert xf.is_cuda
    flipped = _flipped_mask(xf.cpu(), xc)
    assert 150 < int(flipped.sum()) < 350
    assert torch.equal(g.decode(x).cpu(), d.x_uint8[idx.cpu()])
    assert torch.equal(g.of_class(1).cpu(), d.of_class(1)) and torch.equal(g.to("cpu").x_uint8, d.x_uint8)
