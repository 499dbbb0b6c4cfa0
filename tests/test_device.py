"""Device names and generators (dlsm.train.device): what 'auto', 'cpu', 'cuda' and 'cuda:N' resolve to, the one-line
errors, and generators that reproduce the CPU stream of torch.Generator().manual_seed."""

from __future__ import annotations

import gin
import pytest
import torch

from dlsm.errors import ConfigError
from dlsm.train.device import device, make_generator, resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    assert all(line.strip().startswith("In call to configurable") for line in lines[1:]), lines
    return lines[0]


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without a visible CUDA GPU, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that reports two CUDA GPUs, the current one being cuda:0 (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_auto_follows_torch_cuda_is_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device().type == expected


def test_auto_is_cpu_without_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_is_the_current_gpu_with_one(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_cpu_names(name):
    got = resolve_device(name)
    assert got == torch.device("cpu") and got == torch.ones(1).device  # compares equal to a tensor's device


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1", torch.device("cuda")])
def test_cuda_without_gpu_is_one_line_config_error(no_gpu, name):
    with pytest.raises(ConfigError) as info:
        resolve_device(name)
    msg = _one_line(info.value)
    assert msg == str(info.value)
    assert f"device = {name!r} but no CUDA GPU is visible (torch.cuda.is_available() is False)" in msg
    assert "use device = 'auto' or 'cpu'" in msg


@pytest.mark.parametrize(("name", "index"), [("cuda", 0), ("cuda:0", 0), ("cuda:1", 1), ("CUDA:1", 1)])
def test_cuda_names_carry_their_index(two_gpus, name, index):
    assert resolve_device(name) == torch.device("cuda", index)


def test_cuda_index_beyond_the_visible_gpus(two_gpus):
    with pytest.raises(ConfigError, match=r"only 2 CUDA GPU\(s\) are visible \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "mps", "", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "auto:1", "cuda0", 0, None])
def test_unknown_names_are_one_line_config_errors(name):
    with pytest.raises(ConfigError) as info:
        resolve_device(name)
    msg = _one_line(info.value)
    assert f"device = {name!r} is not a device name" in msg and "'auto', 'cpu', 'cuda' or 'cuda:N'" in msg


def test_gin_binding_device_name():
    try:
        gin.parse_config("device.name = 'cpu'")
        assert device() == torch.device("cpu")
        gin.parse_config("device.name = 'tpu'")
        with pytest.raises(ConfigError) as info:
            device()
        assert _one_line(info.value).startswith("device = 'tpu' is not a device name")
    finally:
        gin.clear_config()


def test_cpu_generator_reproduces_the_torch_generator_stream():
    a, b = make_generator(5, "cpu"), make_generator(5, torch.device("cpu"))
    ref = torch.Generator().manual_seed(5)
    assert a.device == torch.device("cpu")
    x = torch.randn(100, generator=a)
    assert torch.equal(x, torch.randn(100, generator=b))
    assert torch.equal(x, torch.randn(100, generator=ref))
    assert not torch.equal(x, torch.randn(100, generator=make_generator(6)))


def test_generator_on_a_missing_gpu_is_a_config_error(no_gpu):
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        make_generator(0, "cuda")


@cuda
def test_cuda_generator_lives_on_the_gpu_and_reproduces():
    a, b = make_generator(5, "cuda"), make_generator(5, "cuda")
    assert a.device.type == "cuda"
    x = torch.randn(1000, generator=a, device=a.device)
    assert x.device.type == "cuda"
    assert torch.equal(x, torch.randn(1000, generator=b, device=b.device))
    assert not torch.equal(x, torch.randn(1000, generator=make_generator(6, "cuda"), device=a.device))
    assert resolve_device("cuda") == x.device  # the index is filled in, so it compares equal to tensors' devices


def test_auto_with_gpus_assigned_but_none_usable_runs_on_the_cpu_in_one_line(monkeypatch, capsys):
    """A Ray trial given (logical) GPUs gets CUDA_VISIBLE_DEVICES; where torch sees no GPU, 'auto' is the CPU, said
    once per process in one line; 'cpu' says nothing, and without CUDA_VISIBLE_DEVICES 'auto' says nothing."""
    from dlsm.train import device as device_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_SAID", set())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_module.resolve_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert device_module.resolve_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().err == ""
    for _ in range(3):
        assert device_module.resolve_device("auto") == torch.device("cpu")
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["dlsm: device 'auto': CUDA_VISIBLE_DEVICES=1 but torch sees no CUDA GPU (a CPU build, no driver, "
                     "or logical GPUs); running on the CPU"]
