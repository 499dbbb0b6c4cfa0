"""Official checkpoints (dlsm.nets.official names, dlsm.train.official I/O): the official names against lists written
by instantiating the official classes (tests/data/official_*.txt), an exported checkpoint run through score_sde's
NCSN++ forward written out here from its ``models/ncsnpp.py`` (official names, NIN x W, module by module), bit-exact
round trips, and every bad input as its one line with the network left untouched."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from dlsm.errors import CheckpointError, print_error
from dlsm.nets.convnet import ConvClassifier
from dlsm.nets.ncsnpp import NCSNpp
from dlsm.nets.official import (
    classifier_config,
    classifier_key_map,
    ncsnpp_config,
    ncsnpp_key_map,
    official_classifier_names,
    official_ncsnpp_names,
)
from dlsm.train.official import (
    export_classifier_checkpoint,
    export_score_checkpoint,
    import_classifier_checkpoint,
    import_score_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SMALL = {"channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,), "dropout": 0.0}
SMALL_SHAPE = (3, 16, 16)


def _names_file(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.split() for line in (DATA / name).read_text().splitlines() if line and not line.startswith("#")]
    return [(r[0], tuple(int(d) for d in r[1:])) for r in rows]


def _gin_bindings(*files: str, configurable: str) -> dict:
    """``configurable.param = value`` of the gin files (later files override), macros resolved: the published
    settings, read rather than repeated here."""
    macros, out = {}, {}
    for f in files:
        for line in (ROOT / "gin" / f).read_text().splitlines():
            code = line.split("#")[0].strip()
            if m := re.fullmatch(r"([A-Z_0-9]+) = (.+)", code):
                macros[m.group(1)] = m.group(2)
            elif m := re.fullmatch(rf"{configurable}\.(\w+) = (.+)", code):
                out[m.group(1)] = m.group(2)
    return {k: ast.literal_eval(macros[v[1:]] if v.startswith("%") else v) for k, v in out.items()}


def _perturbed(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*net.parameters(), *(b for n, b in net.named_buffers() if n.endswith(("running_mean", "freqs")))]:
            t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype))
        for n, b in net.named_buffers():
            if n.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=g)
    return net


def _small(seed: int = 0, **kw) -> NCSNpp:
    torch.manual_seed(seed)
    return _perturbed(NCSNpp(SMALL_SHAPE, **{**SMALL, **kw}), seed).eval()


def _cifar_ncsnpp(blocks: int) -> NCSNpp:
    kw = _gin_bindings("cifar10.gin", configurable="NCSNpp")
    with torch.device("meta"):  # 107 M parameters: no memory, no init cost
        return NCSNpp((3, 32, 32), **{**kw, "num_res_blocks": blocks})


def _cifar_classifier(gin_file: str, classes: int, device: str = "meta") -> ConvClassifier:
    kw = _gin_bindings("cifar10.gin", gin_file, configurable="ConvClassifier")
    with torch.device(device):
        return ConvClassifier((3, 32, 32), classes, **kw)


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the names: our map against the lists written by the official classes ------------------------------------------

NCSNPP_FILES = [(8, "official_ncsnpp_deep.txt", 107_586_947), (4, "official_ncsnpp_4block.txt", 62_758_787)]


@pytest.mark.parametrize(("blocks", "name", "trainable"), NCSNPP_FILES)
def test_ncsnpp_names_and_map_match_the_official_lists_for_the_published_settings(blocks, name, trainable):
    net = _cifar_ncsnpp(blocks)
    cfg = ncsnpp_config(net)
    assert official_ncsnpp_names(cfg) == _names_file(name)
    entries, own = ncsnpp_key_map(cfg), net.state_dict()
    mapped = [e for e in entries if e.ours is not None]
    assert [e.official for e in entries if e.ours is None] == ["sigmas"]  # the only official tensor without a twin
    assert sorted(e.ours for e in mapped) == sorted(own)  # every one of ours exactly once
    for e in mapped:
        shape = tuple(own[e.ours].shape)
        assert (shape[::-1] if e.transpose else shape) == e.shape, e
    nin_weights = [k for k, _ in _names_file(name) if re.search(r"\.NIN_\d\.W$", k)]
    assert [e.official for e in entries if e.transpose] == nin_weights and len(nin_weights) == 4 * (blocks + 2)
    # score_sde_pytorch NCSNpp's trainable count (models/ncsnpp.py docstring): all but sigmas and the Fourier W
    assert sum(math.prod(s) for k, s in _names_file(name) if k not in ("sigmas", "all_modules.0.W")) == trainable
    assert net.num_parameters() == trainable


CLASSIFIER_FILES = [("cifar10.gin", 10, "official_classifier_resnet18_cifar10.txt", 11_322_634),
                    ("cifar100.gin", 100, "official_classifier_resnet34_cifar100.txt", 21_476_964)]


@pytest.mark.parametrize(("gin_file", "classes", "name", "trainable"), CLASSIFIER_FILES)
def test_classifier_names_and_map_match_the_official_lists_for_the_published_settings(gin_file, classes, name,
                                                                                       trainable):
    net = _cifar_classifier(gin_file, classes)
    cfg = classifier_config(net)
    assert official_classifier_names(cfg) == _names_file(name)
    own = net.state_dict()
    entries = classifier_key_map(cfg)
    assert sorted(e.ours for e in entries) == sorted(own)  # every one of ours exactly once
    assert all(tuple(own[e.ours].shape) == e.shape and not e.transpose for e in entries)
    assert net.num_parameters() == trainable  # the official trainable count (W frozen there, a buffer here)


def test_small_export_has_the_official_names_shapes_and_order(tmp_path):
    """The names file of the small setting was written by score_sde's NCSNpp: the export would load there."""
    export_score_checkpoint(_small(), tmp_path / "c.pth", step=5)
    state = torch.load(tmp_path / "c.pth", weights_only=True)
    model = [(k, tuple(v.shape)) for k, v in state["model"].items()]
    assert model == [(f"module.{k}", s) for k, s in _names_file("official_ncsnpp_small.txt")]
    trainable = [s for k, s in _names_file("official_ncsnpp_small.txt") if k not in ("sigmas", "all_modules.0.W")]
    assert [tuple(t.shape) for t in state["ema"]["shadow_params"]] == trainable
    assert state["step"] == state["ema"]["num_updates"] == 5
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(trainable) + 1  # W is in parameters() too
    sigmas = state["model"]["module.sigmas"]
    assert sigmas.dtype == torch.float64 and sigmas.shape == (1000,)
    torch.testing.assert_close(sigmas[[0, -1]], torch.tensor([50.0, 0.01], dtype=torch.float64))  # sigma_max first


# ---- score_sde's NCSN++ forward, written here from models/ncsnpp.py and layerspp.py on the official names ----------

SQRT2 = math.sqrt(2.0)
FIR = torch.outer(torch.tensor([1.0, 3.0, 3.0, 1.0]), torch.tensor([1.0, 3.0, 3.0, 1.0])).double() / 64.0


def _fir(h: torch.Tensor, *, up: bool) -> torch.Tensor:
    """up_or_down_sampling.upsample_2d / downsample_2d with [1,3,3,1]: zero insertion, pad (2, 1), filter with gain
    4; or pad (1, 1), filter, keep every second sample. The kernel is symmetric, so no flip."""
    c = h.shape[1]
    k = FIR.to(h.dtype).expand(c, 1, 4, 4)
    if up:
        z = h.new_zeros(h.shape[0], c, 2 * h.shape[2], 2 * h.shape[3])
        z[:, :, ::2, ::2] = h
        return F.conv2d(F.pad(z, (2, 1, 2, 1)), 4.0 * k, groups=c)
    return F.conv2d(F.pad(h, (1, 1, 1, 1)), k, stride=2, groups=c)


def _official_forward(p: dict, x: torch.Tensor, sigma: torch.Tensor, *, nrb: int, levels: int,
                      attn: tuple) -> torch.Tensor:
    """score_sde NCSNpp.forward (fourier, conditional, biggan, progressive 'none', progressive_input 'residual',
    skip_rescale, data.centered False, scale_by_sigma) over ``all_modules.<i>`` in order."""
    idx = iter(range(10**6))

    def gn(k, h):
        return F.group_norm(h, min(h.shape[1] // 4, 32), p[f"{k}.weight"], p[f"{k}.bias"], eps=1e-6)

    def conv(k, h, stride=1):
        w = p[f"{k}.weight"]
        return F.conv2d(h, w, p[f"{k}.bias"], stride=stride, padding=w.shape[-1] // 2 if stride == 1 else 0)

    def nin(k, h):  # layers.NIN: y[b, u, i, j] = sum_c h[b, c, i, j] W[c, u] + b[u]
        return torch.einsum("bcij,cu->buij", h, p[f"{k}.W"]) + p[f"{k}.b"][None, :, None, None]

    def resnet(h_in, temb, up=False, down=False):  # layerspp.ResnetBlockBigGANpp
        m = f"all_modules.{next(idx)}"
        h, x_ = F.silu(gn(f"{m}.GroupNorm_0", h_in)), h_in
        if up or down:
            h, x_ = _fir(h, up=up), _fir(x_, up=up)
        bias = F.linear(F.silu(temb), p[f"{m}.Dense_0.weight"], p[f"{m}.Dense_0.bias"])
        h = conv(f"{m}.Conv_0", h) + bias[..., None, None]
        h = conv(f"{m}.Conv_1", F.silu(gn(f"{m}.GroupNorm_1", h)))
        if f"{m}.Conv_2.weight" in p:
            x_ = conv(f"{m}.Conv_2", x_)
        return (x_ + h) / SQRT2

    def attention(h_in):  # layerspp.AttnBlockpp
        m = f"all_modules.{next(idx)}"
        h = gn(f"{m}.GroupNorm_0", h_in)
        q, k, v = (nin(f"{m}.NIN_{i}", h) for i in range(3))
        w = torch.einsum("bchw,bcij->bhwij", q, k) * h.shape[1] ** -0.5
        w = torch.softmax(w.reshape(*w.shape[:3], -1), dim=-1).reshape(w.shape)
        return (h_in + nin(f"{m}.NIN_3", torch.einsum("bhwij,bcij->bchw", w, v))) / SQRT2

    phase = torch.log(sigma)[:, None] * p[f"all_modules.{next(idx)}.W"][None, :] * 2 * math.pi
    temb = torch.cat([phase.sin(), phase.cos()], dim=-1)
    m1, m2 = next(idx), next(idx)
    temb = F.linear(temb, p[f"all_modules.{m1}.weight"], p[f"all_modules.{m1}.bias"])
    temb = F.linear(F.silu(temb), p[f"all_modules.{m2}.weight"], p[f"all_modules.{m2}.bias"])
    x = 2 * x - 1.0
    pyramid, hs = x, [conv(f"all_modules.{next(idx)}", x)]
    for level in range(levels):
        for _ in range(nrb):
            h = resnet(hs[-1], temb)
            hs.append(attention(h) if h.shape[-1] in attn else h)
        if level != levels - 1:
            h = resnet(hs[-1], temb, down=True)
            m = f"all_modules.{next(idx)}.Conv2d_0"  # conv_downsample_2d: FIR with pad (2, 2), then conv stride 2
            c = pyramid.shape[1]
            filtered = F.conv2d(F.pad(pyramid, (2, 2, 2, 2)), FIR.to(x.dtype).expand(c, 1, 4, 4), groups=c)
            pyramid = (conv(m, filtered, stride=2) + h) / SQRT2
            hs.append(pyramid)
    h = resnet(attention(resnet(hs[-1], temb)), temb)
    for level in reversed(range(levels)):
        for _ in range(nrb + 1):
            h = resnet(torch.cat([h, hs.pop()], dim=1), temb)
        if h.shape[-1] in attn:
            h = attention(h)
        if level != 0:
            h = resnet(h, temb, up=True)
    h = F.silu(gn(f"all_modules.{next(idx)}", h))
    h = conv(f"all_modules.{next(idx)}", h)
    assert f"all_modules.{next(idx)}.weight" not in p and not hs  # every module used, in order
    return h / sigma[:, None, None, None]


@pytest.mark.parametrize("kw", [{}, {"channel_mult": (1, 2, 2), "num_res_blocks": 2, "attn_resolutions": (8, 4)}])
def test_exported_weights_run_score_sdes_forward_to_our_outputs(tmp_path, kw):
    """The map's meaning, not only its names: NIN stores W (in, out) and computes x W, so q, k, v and the output
    projection must be transposed; a swapped or untransposed tensor changes these numbers."""
    net = _small(**kw).double()
    export_score_checkpoint(net, tmp_path / "c.pth")
    p = {k.removeprefix("module."): v for k, v in torch.load(tmp_path / "c.pth", weights_only=True)["model"].items()}
    x = torch.rand(3, *SMALL_SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    cfg = {**SMALL, **kw}
    want = _official_forward(p, x, sigma, nrb=cfg["num_res_blocks"], levels=len(cfg["channel_mult"]),
                             attn=cfg["attn_resolutions"])
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), want, rtol=1e-10, atol=1e-10)


# ---- round trips -------------------------------------------------------------------------------------------------


def test_score_round_trip_is_bit_identical_for_weights_ema_and_outputs(tmp_path):
    net, ema = _small(0), _small(1)
    with torch.no_grad():  # the Fourier frequencies are frozen: an EMA of them is the same vector
        ema.time_proj.weight.copy_(net.time_proj.weight)
    export_score_checkpoint(net, tmp_path / "c.pth", ema_net=ema, step=123)
    x = torch.rand(2, *SMALL_SHAPE, generator=torch.Generator().manual_seed(2))
    for use_ema, source in ((True, ema), (False, net)):
        fresh = _small(7)
        assert import_score_checkpoint(tmp_path / "c.pth", fresh, use_ema=use_ema) == 123
        assert _same(_state(fresh), _state(source)) and not _same(_state(fresh), _state(_small(7)))
        with torch.no_grad():
            assert torch.equal(fresh(x, 0.5), source(x, 0.5))


def test_classifier_round_trip_is_bit_identical_with_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    net = _perturbed(_cifar_classifier("cifar10.gin", 10, device="cpu"), 0).eval()
    export_classifier_checkpoint(net, tmp_path / "c.pth", step=60000)
    state = torch.load(tmp_path / "c.pth", weights_only=True)
    assert sorted(state) == ["model", "optimizer", "step"]  # DLSM saves classifiers without EMA
    assert [k for k in state["model"]] == [f"module.{k}" for k, _ in
                                           _names_file("official_classifier_resnet18_cifar10.txt")]
    fresh = _cifar_classifier("cifar10.gin", 10, device="cpu").eval()
    assert import_classifier_checkpoint(tmp_path / "c.pth", fresh) == 60000
    assert _same(_state(fresh), _state(net))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fresh(x, torch.tensor([0.1, 5.0])), net(x, torch.tensor([0.1, 5.0])))


# ---- bad input: one line each, nothing loaded ----------------------------------------------------------------------


class Gadget:
    """Unpickling this needs code: weights_only loading must refuse it."""


def _fake_official(path: Path, names_file: str, prefix: str = "module.") -> Path:
    """A checkpoint with the official names and shapes of ``names_file`` and zero tensors sharing one element of
    storage (a few kB even for 107 M parameters)."""
    zero = torch.zeros(1)
    model = {prefix + k: zero.expand(s) if s else zero[0] for k, s in _names_file(names_file)}
    torch.save({"model": model, "step": 1}, path)
    return path


def _raises(fn, line: str, net: torch.nn.Module | None = None, capsys=None) -> None:
    before = None if net is None or next(net.parameters()).is_meta else _state(net)
    with pytest.raises(CheckpointError) as info:
        fn()
    assert str(info.value) == line
    if before is not None:
        assert _same(_state(net), before)  # nothing loaded
    if capsys is not None:
        print_error(info.value)
        assert capsys.readouterr().err == f"dlsm: error: {line}\n"


DEEP = "NCSNpp(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,), shape=(3, 32, 32))"
FOUR = "NCSNpp(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), shape=(3, 32, 32))"
R18 = "resnet18_cond(num_classes=10, blocks_per_stage=(2, 2, 2, 2), nf=32, shape=(3, 32, 32))"


def test_missing_directory_truncated_and_code_needing_files_are_one_line(tmp_path, capsys):
    net = _small()
    _raises(lambda: import_score_checkpoint(tmp_path / "none.pth", net),
            f"checkpoint {tmp_path / 'none.pth'} does not exist", net, capsys)
    _raises(lambda: import_score_checkpoint(tmp_path, net),
            f"checkpoint {tmp_path} is a directory, not a checkpoint file", net)
    export_score_checkpoint(_small(1), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    _raises(lambda: import_score_checkpoint(tmp_path / "cut.pth", net),
            f"checkpoint {tmp_path / 'cut.pth'} is unreadable (RuntimeError): truncated, corrupt or not a torch file",
            net, capsys)
    torch.save({"model": {"x": torch.zeros(1)}, "gadget": Gadget()}, tmp_path / "code.pth")
    _raises(lambda: import_score_checkpoint(tmp_path / "code.pth", net),
            f"checkpoint {tmp_path / 'code.pth'} needs code to unpickle ({Gadget.__module__}.Gadget), which "
            f"weights_only loading refuses; only tensors, numbers and plain containers are read", net, capsys)
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")  # no pickle at all: unreadable, not "needs code"
    _raises(lambda: import_score_checkpoint(tmp_path / "notes.pth", net),
            f"checkpoint {tmp_path / 'notes.pth'} is unreadable (UnpicklingError): truncated, corrupt or not a torch "
            f"file", net)
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    _raises(lambda: import_score_checkpoint(tmp_path / "other.pth", net),
            f"checkpoint {tmp_path / 'other.pth'} is not an official score_sde / DLSM checkpoint "
            f"(no 'model' state dict)", net)


def test_four_block_into_deep_and_back_names_the_first_mismatch_and_both_networks(tmp_path):
    four = _fake_official(tmp_path / "four.pth", "official_ncsnpp_4block.txt")
    _raises(lambda: import_score_checkpoint(four, _cifar_ncsnpp(8), use_ema=False),
            f"checkpoint {four}: official key all_modules.8.Conv_2.weight (128, 128, 1, 1) is not part of {DEEP}: "
            f"the file holds {FOUR} with 1000 noise levels")
    deep = _fake_official(tmp_path / "deep.pth", "official_ncsnpp_deep.txt")
    _raises(lambda: import_score_checkpoint(deep, _cifar_ncsnpp(4), use_ema=False),
            f"checkpoint {deep}: official key all_modules.9.GroupNorm_0.weight (128,) is not part of {FOUR}: "
            f"the file holds {DEEP} with 1000 noise levels")
    _raises(lambda: import_score_checkpoint(deep, _cifar_ncsnpp(8)),  # the names fit: the EMA is checked next
            f"checkpoint {deep} has no EMA ('ema' with 'shadow_params'); import it with use_ema=False")


def test_a_shape_mismatch_and_a_missing_key_are_named(tmp_path):
    wide, net = _small(1, channels=32), _small()
    export_score_checkpoint(wide, tmp_path / "wide.pth")
    small = "NCSNpp(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), shape=(3, 16, 16))"
    _raises(lambda: import_score_checkpoint(tmp_path / "wide.pth", net),
            f"checkpoint {tmp_path / 'wide.pth'}: official key all_modules.0.W has shape (32,) but {small} expects "
            f"(16,): the file holds {small.replace('channels=16', 'channels=32')} with 1000 noise levels", net)
    export_score_checkpoint(_small(1), tmp_path / "c.pth")
    state = torch.load(tmp_path / "c.pth", weights_only=True)
    del state["model"]["module.all_modules.19.bias"]  # the head conv's bias
    torch.save(state, tmp_path / "cut_key.pth")
    _raises(lambda: import_score_checkpoint(tmp_path / "cut_key.pth", net),
            f"checkpoint {tmp_path / 'cut_key.pth'}: official key all_modules.19.bias (3,) is missing, which {small} "
            f"expects: the file holds another layout (157 tensors)", net)


def test_ema_is_matched_by_position_only_after_count_and_shapes_agree(tmp_path):
    net = _small()
    export_score_checkpoint(_small(1), tmp_path / "c.pth")
    state = torch.load(tmp_path / "c.pth", weights_only=True)
    small = "NCSNpp(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), shape=(3, 16, 16))"
    shadow = state["ema"]["shadow_params"]
    state["ema"]["shadow_params"] = shadow[:-1]
    torch.save(state, tmp_path / "short.pth")
    _raises(lambda: import_score_checkpoint(tmp_path / "short.pth", net),
            f"checkpoint {tmp_path / 'short.pth'}: the EMA holds 155 parameters but {small} has 156 trainable ones",
            net)
    state["ema"]["shadow_params"] = [shadow[1], shadow[0], *shadow[2:]]  # same count, two swapped
    torch.save(state, tmp_path / "swapped.pth")
    _raises(lambda: import_score_checkpoint(tmp_path / "swapped.pth", net),
            f"checkpoint {tmp_path / 'swapped.pth'}: EMA shadow parameter 0 has shape (64,) but official key "
            f"all_modules.1.weight of {small} expects (64, 32)", net)
    assert import_score_checkpoint(tmp_path / "swapped.pth", net, use_ema=False) == 0  # the raw weights still load


def test_wrong_classifiers_and_nets_without_official_twin_are_one_line(tmp_path):
    r34 = _fake_official(tmp_path / "r34.pth", "official_classifier_resnet34_cifar100.txt")
    r34_name = "resnet34_cond(num_classes=100, blocks_per_stage=(3, 4, 6, 3), nf=32, shape=(3, 32, 32))"
    _raises(lambda: import_classifier_checkpoint(r34, _cifar_classifier("cifar10.gin", 10)),
            f"checkpoint {r34}: official key classifier.classifier.layer1.2.conv1.weight (64, 64, 3, 3) is not part "
            f"of {R18}: the file holds {r34_name}")
    r18_100 = _fake_official(tmp_path / "r18_100.pth", "official_classifier_resnet18_cifar10.txt")
    state = torch.load(r18_100, weights_only=True)
    state["model"]["module.classifier.classifier.linear.weight"] = torch.zeros(100, 512)
    state["model"]["module.classifier.classifier.linear.bias"] = torch.zeros(100)
    torch.save(state, r18_100)
    _raises(lambda: import_classifier_checkpoint(r18_100, _cifar_classifier("cifar10.gin", 10)),
            f"checkpoint {r18_100}: official key classifier.classifier.linear.weight has shape (100, 512) but {R18} "
            f"expects (10, 512): the file holds {R18.replace('=10', '=100')}")
    score = _fake_official(tmp_path / "score.pth", "official_ncsnpp_deep.txt")
    _raises(lambda: import_classifier_checkpoint(score, _cifar_classifier("cifar10.gin", 10)),
            f"checkpoint {score}: official key sigmas (1000,) is not part of {R18}: the file holds a score_sde NCSN++ "
            f"score model, not a classifier")
    _raises(lambda: import_score_checkpoint(r34, _cifar_ncsnpp(8)),
            f"checkpoint {r34}: official key classifier.condition_modules.0.W (32,) is not part of {DEEP}: the file "
            f"holds a DLSM classifier, not a score model")
    _raises(lambda: import_score_checkpoint(r34, _small(norm_groups=4)),
            "NCSNpp GroupNorm down_blocks.1.resnets.0.norm2 has 4 groups, eps 1e-06; score_sde's NCSN++ uses "
            "min(C // 4, 32) = 8 and 1e-6: leave NCSNpp.norm_groups unset")
    group = ConvClassifier((3, 32, 32), 10, channels=(64, 128, 256, 512), condition="stage", emb_dim=128,
                           num_frequencies=32)
    _raises(lambda: import_classifier_checkpoint(r34, group),
            "ConvClassifier has no official counterpart (resnet_cond): norm is not 'batch'")


def _official_classifier_forward(p: dict, x: torch.Tensor, sigma: torch.Tensor, blocks: tuple) -> torch.Tensor:
    """DLSM resnet_cond.forward in eval mode (BatchNorm running statistics), written here from models/resnet_cond.py
    on the official names: Fourier W of log sigma, Linear, SiLU, Linear; ResNet_cond with dense_k(SiLU(temb)) added
    after stage k; 4x4 average pooling and the linear head."""
    r = "classifier.classifier"

    def bn(k, h):
        return F.batch_norm(h, p[f"{k}.running_mean"], p[f"{k}.running_var"], p[f"{k}.weight"], p[f"{k}.bias"])

    def lin(k, h):
        return F.linear(h, p[f"{k}.weight"], p[f"{k}.bias"])

    phase = torch.log(sigma)[:, None] * p["classifier.condition_modules.0.W"][None, :] * 2 * math.pi
    temb = lin("classifier.condition_modules.1", torch.cat([phase.sin(), phase.cos()], dim=-1))
    temb = lin("classifier.condition_modules.2", F.silu(temb))
    out = F.relu(bn(f"{r}.bn1", F.conv2d(x, p[f"{r}.conv1.weight"], padding=1)))
    for stage, n in enumerate(blocks):
        for i in range(n):
            k, stride = f"{r}.layer{stage + 1}.{i}", 2 if stage > 0 and i == 0 else 1
            h = F.relu(bn(f"{k}.bn1", F.conv2d(out, p[f"{k}.conv1.weight"], stride=stride, padding=1)))
            h = bn(f"{k}.bn2", F.conv2d(h, p[f"{k}.conv2.weight"], padding=1))
            if f"{k}.shortcut.0.weight" in p:
                out = bn(f"{k}.shortcut.1", F.conv2d(out, p[f"{k}.shortcut.0.weight"], stride=stride))
            out = F.relu(h + out)
        out = out + lin(f"{r}.dense_{stage + 1}", F.silu(temb))[:, :, None, None]
    return lin(f"{r}.linear", F.avg_pool2d(out, 4).flatten(1))


def test_exported_classifier_runs_dlsms_forward_to_our_logits(tmp_path):
    torch.manual_seed(0)
    net = _perturbed(_cifar_classifier("cifar10.gin", 10, device="cpu"), 4).double().eval()
    export_classifier_checkpoint(net, tmp_path / "c.pth")
    p = {k.removeprefix("module."): v for k, v in torch.load(tmp_path / "c.pth", weights_only=True)["model"].items()}
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.05, 20.0], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), _official_classifier_forward(p, x, sigma, (2, 2, 2, 2)),
                                   rtol=1e-10, atol=1e-10)
