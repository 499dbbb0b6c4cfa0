"""Tiny CIFAR archives in the real format, written by the tests (the real archives cannot be downloaded here)."""

import io
import pickle
import struct

import numpy as np

# Tiny CIFAR archives in the real format: Python-2 pickles (protocol 2) whose strings are py2 ``str``, so that
# pickle.load(encoding="bytes") gives b'data' keys (as on the CIFAR web page) and torchvision's
# encoding="latin1" gives 'data' keys; b'data' is an N x 3072 uint8 array, R, G, B planes, each row-major.


class _Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), as the CIFAR archives were written."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _write_py2(path, obj) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _rows(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
PIXEL = (2, 5, 7)  # (c, h, w) of the planted pixel; flat index c*1024 + h*32 + w
FLAT = PIXEL[0] * 1024 + PIXEL[1] * 32 + PIXEL[2]


def make_cifar10(root, per_batch=2, n_test=3, seed=0, balanced=False):
    """Writes root/cifar-10-batches-py/; returns (train rows, train labels, test rows, test labels).
    ``balanced``: labels cycle through the classes (every class gets 5 * per_batch / 10 training images and
    n_test / 10 test images) instead of random."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rows, labels = [], []
    for b in range(1, 6):
        r, lab = _rows(rng, per_batch), [int(v) for v in rng.integers(0, 10, per_batch)]
        if balanced:
            lab = [(len(labels) + i) % 10 for i in range(per_batch)]
        if b == 3:
            r[1, FLAT] = 201  # train image 2 * per_batch + 1
        _write_py2(d / f"data_batch_{b}", {b"batch_label": f"training batch {b} of 5".encode(), b"labels": lab,
                                            b"data": r, b"filenames": [b"x.png"] * per_batch})
        rows.append(r)
        labels += lab
    test_r, test_l = _rows(rng, n_test), [int(v) for v in rng.integers(0, 10, n_test)]
    if balanced:
        test_l = [i % 10 for i in range(n_test)]
    test_r[0, FLAT] = 7
    _write_py2(d / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test_l, b"data": test_r,
                                  b"filenames": [b"x.png"] * n_test})
    _write_py2(d / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": CIFAR10_NAMES,
                                    b"num_vis": 3072})
    return np.concatenate(rows), labels, test_r, test_l


FINE = [f"fine{k}".encode() for k in range(100)]


def make_cifar100(root, n_train=4, n_test=2, seed=1, balanced=False):
    """Writes root/cifar-100-python/; returns {split: (rows, fine labels)}; ``balanced`` as in make_cifar10."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        r, fine = _rows(rng, n), [int(v) for v in rng.integers(0, 100, n)]
        if balanced:
            fine = [i % 100 for i in range(n)]
        _write_py2(d / split, {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                               b"coarse_labels": [f // 5 for f in fine], b"data": r})
        out[split] = (r, fine)
    _write_py2(d / "meta", {b"fine_label_names": FINE, b"coarse_label_names": [f"c{k}".encode() for k in range(20)]})
    return out
