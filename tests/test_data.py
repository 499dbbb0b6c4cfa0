"""The moons dataset (dlsm.data.points): two_moons' points against their closed form, and LabelledData's dataset
protocol (the one dlsm.data.images.ImageData has) against plain indexing."""

from __future__ import annotations

import math

import pytest
import torch

from dlsm.data.images import ImageData
from dlsm.data.points import LabelledData, two_moons
from dlsm.errors import ConfigError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DATA = two_moons(n=50)


def test_two_moons_is_its_closed_form():
    """Upper crescent (cos t, sin t), lower (1 - cos t, 1/2 - sin t), t evenly spaced on [0, pi], centred, scaled
    by 20, shuffled by randperm of a generator seeded 1 (noise = 0 draws nothing before the permutation)."""
    n, up = 7, 3
    pts = [(math.cos(t), math.sin(t)) for t in (math.pi * k / (up - 1) for k in range(up))]
    pts += [(1 - math.cos(t), 0.5 - math.sin(t)) for t in (math.pi * k / (n - up - 1) for k in range(n - up))]
    cx, cy = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    expected = torch.tensor([[(pts[i][0] - cx) * 20, (pts[i][1] - cy) * 20] for i in perm], dtype=torch.float32)
    data = two_moons(n=n)
    torch.testing.assert_close(data.x, expected, rtol=0, atol=2e-6)
    assert data.y.tolist() == [0 if i < up else 1 for i in perm]


def test_size_shape_and_device():
    assert len(DATA) == 50 == DATA.x.shape[0]
    assert DATA.shape == (2,) and DATA.dim == 2
    assert DATA.device == torch.device("cpu") == DATA.x.device
    images = ImageData(torch.zeros(3, 1, 4, 5, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), 1, "im")
    assert (len(images), images.shape) == (3, (1, 4, 5))  # the same protocol for images


@pytest.mark.parametrize("as_list", [False, True])
def test_batch_is_plain_indexing_and_draws_nothing(as_list):
    up, lo = torch.nonzero(DATA.y == 0).flatten(), torch.nonzero(DATA.y == 1).flatten()
    idx = torch.stack([up[0], lo[3], up[5], lo[0]])  # labels 0, 1, 0, 1: any mix-up of rows shows in y too
    g = torch.Generator().manual_seed(0)
    before = g.get_state().clone()
    x, y = DATA.batch(idx.tolist() if as_list else idx, generator=g)
    assert torch.equal(x, DATA.x[idx]) and torch.equal(y, DATA.y[idx])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(g.get_state(), before)  # no random numbers: the training stream is untouched


def test_batch_with_flip_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as info:
        DATA.batch(torch.arange(4), flip=True, generator=torch.Generator())
    msg = str(info.value)
    assert "\n" not in msg and "train.flip = True" in msg and "two_moons" in msg and "train.flip = False" in msg


def test_subset_by_indices_and_by_mask():
    idx = torch.tensor([5, 1, 1])
    sub = DATA.subset(idx)
    assert isinstance(sub, LabelledData)
    assert torch.equal(sub.x, DATA.x[idx]) and torch.equal(sub.y, DATA.y[idx])
    assert (sub.num_classes, sub.name, sub.class_names) == (DATA.num_classes, DATA.name, DATA.class_names)
    upper = DATA.subset(DATA.y == 0)
    assert torch.equal(upper.x, DATA.of_class(0)) and bool((upper.y == 0).all())
    assert len(upper) == int((DATA.y == 0).sum()) > 0
    assert torch.equal(DATA.subset([0, 2]).x, DATA.x[[0, 2]])


def test_to_is_a_copy_on_the_device():
    moved = DATA.to("cpu")
    assert moved is not DATA and moved.device == torch.device("cpu")
    assert torch.equal(moved.x, DATA.x) and torch.equal(moved.y, DATA.y) and moved.name == DATA.name


def test_decode_is_the_identity_for_points():
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    assert torch.equal(DATA.decode(x), x)


@cuda
def test_protocol_on_the_gpu():
    gpu = DATA.to("cuda")
    assert gpu.device.type == "cuda" and gpu.x.device.type == "cuda" and gpu.y.device.type == "cuda"
    idx = torch.tensor([3, 0, 49], device="cuda")
    x, y = gpu.batch(idx, generator=torch.Generator(device="cuda"))
    assert x.device.type == "cuda" and y.device.type == "cuda"
    assert torch.equal(x.cpu(), DATA.x[idx.cpu()]) and torch.equal(y.cpu(), DATA.y[idx.cpu()])
    assert gpu.subset(gpu.y == 1).device.type == "cuda"
