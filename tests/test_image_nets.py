"""Image networks (dlsm.nets): the preconditioning of ScoreUNet.forward (Technique 3, c_in, c_noise = log sigma),
sigma conditioning and batch independence, the Fourier features against a hand computation, parameter counts
against hand counts (and the published CIFAR ResNet-18/34 numbers), one-line ConfigErrors, and tiny overfits."""

from __future__ import annotations

import math

import gin
import pytest
import torch

from dlsm.errors import ConfigError, print_error
from dlsm.nets import ConvClassifier, GaussianFourierEmbedding, ScoreUNet, count_parameters

SHAPE = (1, 8, 8)


def _tiny_unet(**kw) -> ScoreUNet:
    return ScoreUNet(SHAPE, **{"channels": 8, "channel_mult": (1, 2), **kw})


def _tiny_clf(**kw) -> ConvClassifier:
    return ConvClassifier(SHAPE, 3, **{"channels": (8, 16), **kw})


# ---- preconditioning -----------------------------------------------------------------------------


def test_score_unet_technique3_output_times_sigma_is_the_unscaled_output():
    torch.manual_seed(0)
    scaled = _tiny_unet(scale_by_sigma=True).double().eval()
    raw = _tiny_unet(scale_by_sigma=False).double().eval()
    raw.load_state_dict(scaled.state_dict())
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    for sigma in (0.01, 0.3, 1.0, 7.5, 50.0):
        torch.testing.assert_close(scaled(x, sigma) * sigma, raw(x, sigma), rtol=1e-12, atol=1e-12)
    sig = torch.tensor([0.02, 0.5, 3.0, 40.0], dtype=torch.float64)
    torch.testing.assert_close(scaled(x, sig) * sig[:, None, None, None], raw(x, sig), rtol=1e-12, atol=1e-12)


def test_score_unet_forward_is_the_body_at_c_in_x_and_log_sigma_divided_by_sigma():
    """s(x, sigma) = F(x / sqrt(sigma^2 + sigma_data^2), log sigma) / sigma, with F the body called directly."""
    torch.manual_seed(1)
    net = _tiny_unet(sigma_data=0.5).double().eval()
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    sig = torch.tensor([0.1, 1.0, 9.0], dtype=torch.float64)
    c_in = 1.0 / torch.sqrt(sig**2 + 0.25)
    expected = net.net(x * c_in[:, None, None, None], torch.log(sig)) / sig[:, None, None, None]
    torch.testing.assert_close(net(x, sig), expected, rtol=1e-12, atol=1e-12)


def test_classifier_sees_c_in_x_and_log_sigma():
    torch.manual_seed(2)
    with_sd = _tiny_clf(sigma_data=2.0).double().eval()
    without = _tiny_clf().double().eval()
    without.load_state_dict(with_sd.state_dict())
    x, sigma = torch.randn(3, *SHAPE, dtype=torch.float64), 1.5
    torch.testing.assert_close(with_sd(x, sigma), without(x / math.sqrt(1.5**2 + 4.0), sigma), rtol=1e-12, atol=1e-12)


# ---- manual float64 forward passes, written from the module docstrings ------------------------------

F = torch.nn.functional


def _silu(t: torch.Tensor) -> torch.Tensor:
    return t / (1.0 + torch.exp(-t))


def _dense(p: dict, k: str, h: torch.Tensor) -> torch.Tensor:
    return h @ p[f"{k}.weight"].T + p[f"{k}.bias"]


def _cv(p: dict, k: str, h: torch.Tensor, stride: int = 1) -> torch.Tensor:
    w = p[f"{k}.weight"]
    return F.conv2d(h, w, p.get(f"{k}.bias"), stride=stride, padding=w.shape[-1] // 2)


def _gn(p: dict, k: str, h: torch.Tensor, groups: int = 2) -> torch.Tensor:
    b, c, hh, ww = h.shape
    g = h.reshape(b, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return g.reshape(b, c, hh, ww) * p[f"{k}.weight"][:, None, None] + p[f"{k}.bias"][:, None, None]


def _embed(p: dict, sigma: torch.Tensor) -> torch.Tensor:
    """e = W2 SiLU(W1 [sin 2 pi c w; cos 2 pi c w]), c = log sigma."""
    ang = 2 * math.pi * torch.log(sigma)[:, None] * p["embed.freqs"][None, :]
    return _dense(p, "embed.linear2", _silu(_dense(p, "embed.linear1", torch.cat([ang.sin(), ang.cos()], 1))))


def _manual_res(p: dict, k: str, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    a = _cv(p, f"{k}.conv1", _silu(_gn(p, f"{k}.norm1", h))) + _dense(p, f"{k}.emb", _silu(e))[:, :, None, None]
    a = _cv(p, f"{k}.conv2", _silu(_gn(p, f"{k}.norm2", a)))
    return (_cv(p, f"{k}.skip", h) if f"{k}.skip.weight" in p else h) + a


def _manual_attn(p: dict, k: str, h: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = h.shape
    q, kk, v = _cv(p, f"{k}.qkv", _gn(p, f"{k}.norm", h)).reshape(b, 3, c, hh * ww).unbind(1)  # (B, C, N) each
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, kk) / math.sqrt(c), dim=-1)
    return h + _cv(p, f"{k}.proj", torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww))


def test_score_unet_matches_a_manual_forward():
    """channels 4, mult (1, 2), one block, attention at 4x4, sigma_data 0.5, Technique 3 -- by hand."""
    torch.manual_seed(9)
    net = ScoreUNet(
        SHAPE, channels=4, channel_mult=(1, 2), norm_groups=2, emb_dim=16, attention_resolutions=(4,), sigma_data=0.5
    ).double()
    p = {k.removeprefix("net."): v for k, v in net.state_dict().items()}
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    sig = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    e = _embed(p, sig)
    h0 = _cv(p, "conv_in", x / torch.sqrt(sig**2 + 0.25)[:, None, None, None])  # 4 @ 8x8
    h1 = _manual_res(p, "down.0", h0, e)  # 4 @ 8x8
    h2 = _cv(p, "down.1", h1, stride=2)  # 4 @ 4x4
    h3 = _manual_attn(p, "down.3", _manual_res(p, "down.2", h2, e))  # 8 @ 4x4
    u = _manual_res(p, "mid.2", _manual_attn(p, "mid.1", _manual_res(p, "mid.0", h3, e)), e)
    u = _manual_attn(p, "up.1", _manual_res(p, "up.0", torch.cat([u, h3], 1), e))
    u = _manual_attn(p, "up.3", _manual_res(p, "up.2", torch.cat([u, h2], 1), e))
    u = _cv(p, "up.4.1", u.repeat_interleave(2, -1).repeat_interleave(2, -2))  # nearest x2, conv: 8 @ 8x8
    u = _manual_res(p, "up.6", torch.cat([_manual_res(p, "up.5", torch.cat([u, h1], 1), e), h0], 1), e)
    expected = _cv(p, "conv_out", _silu(_gn(p, "norm_out", u))) / sig[:, None, None, None]
    torch.testing.assert_close(net(x, sig), expected, rtol=1e-10, atol=1e-10)


def test_conv_classifier_matches_a_manual_forward():
    """channels (4, 8), one block each, GroupNorm(2), sigma_data 0.7: the per-block bias before the first ReLU."""
    torch.manual_seed(10)
    net = ConvClassifier(SHAPE, 3, channels=(4, 8), norm_groups=2, emb_dim=16, sigma_data=0.7).double()
    p = net.state_dict()
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    sig = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    e = _embed(p, sig)
    h = torch.relu(_gn(p, "stem.1", _cv(p, "stem.0", x / torch.sqrt(sig**2 + 0.49)[:, None, None, None])))
    for i, stride in ((0, 1), (1, 2)):  # the second stage starts with a stride-2 block
        k = f"blocks.{i}"
        a = _gn(p, f"{k}.norm1", _cv(p, f"{k}.conv1", h, stride)) + _dense(p, f"{k}.emb", _silu(e))[:, :, None, None]
        a = _gn(p, f"{k}.norm2", _cv(p, f"{k}.conv2", torch.relu(a)))
        short = _gn(p, f"{k}.shortcut.1", _cv(p, f"{k}.shortcut.0", h, stride)) if i else h
        h = torch.relu(a + short)
    assert h.shape[-2:] == (4, 4)
    expected = _dense(p, "head", h.mean((2, 3)))
    torch.testing.assert_close(net(x, sig), expected, rtol=1e-10, atol=1e-10)


# ---- sigma conditioning and batch independence ------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: _tiny_unet(scale_by_sigma=False), _tiny_clf], ids=["unet", "clf"])
def test_output_depends_on_sigma_and_per_example_sigma_is_per_example_calls(make):
    torch.manual_seed(3)
    net = make().eval()
    x = torch.randn(5, *SHAPE)
    assert (net(x, 0.05) - net(x, 5.0)).abs().max() > 1e-3  # raw F (no 1/sigma factor) changes with sigma
    sig = torch.tensor([0.01, 0.2, 1.0, 6.0, 50.0])
    rows = torch.cat([net(x[i : i + 1], float(sig[i])) for i in range(5)])
    torch.testing.assert_close(net(x, sig), rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(x, 2.0), net(x, torch.full((5,), 2.0)), rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("make", [_tiny_unet, _tiny_clf], ids=["unet", "clf"])
def test_group_norm_nets_row_i_does_not_depend_on_example_j(make, train):
    torch.manual_seed(4)
    net = make().double().train(train)
    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    sig = torch.linspace(0.1, 3.0, 6, dtype=torch.float64)
    x2 = x.clone()
    x2[2] += 5.0 * torch.randn(SHAPE, dtype=torch.float64)
    out, out2 = net(x, sig), net(x2, sig)
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(out2[keep], out[keep], rtol=1e-12, atol=1e-12)
    assert (out2[2] - out[2]).abs().max() > 1e-6


def test_batch_norm_classifier_couples_examples_in_train_mode_only():
    """The docstring's warning: BatchNorm batch statistics enter every logit in training mode."""
    torch.manual_seed(5)
    net = _tiny_clf(norm="batch").double()
    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    x2 = x.clone()
    x2[2] += 5.0
    net.train()
    assert (net(x2, 0.5)[0] - net(x, 0.5)[0]).abs().max() > 1e-6
    net.eval()
    torch.testing.assert_close(net(x2, 0.5)[0], net(x, 0.5)[0], rtol=1e-12, atol=1e-12)


# ---- embedding -------------------------------------------------------------------------------------


def test_fourier_features_and_mlp_match_a_hand_computation():
    torch.manual_seed(6)
    emb = GaussianFourierEmbedding(8, num_frequencies=3).double()
    w = [0.5, -1.25, 16.0]
    emb.freqs.copy_(torch.tensor(w))
    cs = [0.0, 0.3, -1.1]
    feats = emb.features(torch.tensor(cs, dtype=torch.float64))
    by_hand = [[math.sin(2 * math.pi * c * f) for f in w] + [math.cos(2 * math.pi * c * f) for f in w] for c in cs]
    torch.testing.assert_close(feats, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # e = W2 silu(W1 phi + b1) + b2
    p = {k: v.double() for k, v in emb.state_dict().items()}
    h = torch.tensor(by_hand, dtype=torch.float64) @ p["linear1.weight"].T + p["linear1.bias"]
    h = h / (1.0 + torch.exp(-h))
    expected = h @ p["linear2.weight"].T + p["linear2.bias"]
    torch.testing.assert_close(emb(torch.tensor(cs, dtype=torch.float64)), expected, rtol=1e-12, atol=1e-12)


def test_fourier_frequencies_are_a_reproducible_buffer_of_the_given_scale():
    torch.manual_seed(7)
    a = GaussianFourierEmbedding(64)
    torch.manual_seed(7)
    b = GaussianFourierEmbedding(64)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)
    assert "freqs" in dict(a.named_buffers()) and "freqs" not in dict(a.named_parameters())
    assert a.freqs.shape == (16,)  # dim // 4 frequencies by default
    # an explicit seed does not depend on the global RNG
    torch.manual_seed(0)
    c = GaussianFourierEmbedding(64, seed=3)
    torch.manual_seed(1)
    d = GaussianFourierEmbedding(64, seed=3)
    torch.testing.assert_close(c.freqs, d.freqs, rtol=0, atol=0)
    torch.testing.assert_close(c.freqs, torch.randn(16, generator=torch.Generator().manual_seed(3)) * 16.0)
    big = GaussianFourierEmbedding(8, num_frequencies=20000, scale=16.0, seed=0)
    assert abs(big.freqs.std().item() - 16.0) < 0.5 and abs(big.freqs.mean().item()) < 0.5


# ---- parameter counts ------------------------------------------------------------------------------


def _conv(a: int, b: int, k: int, bias: bool = True) -> int:
    return a * b * k * k + (b if bias else 0)


def _lin(a: int, b: int) -> int:
    return a * b + b


def _res(a: int, b: int, e: int) -> int:
    """U-Net ResBlock: GN(a), conv3(a->b), Dense(e->b), GN(b), conv3(b->b), 1x1 skip when a != b."""
    return 2 * a + _conv(a, b, 3) + _lin(e, b) + 2 * b + _conv(b, b, 3) + (_conv(a, b, 1) if a != b else 0)


def _attn(c: int) -> int:
    return 2 * c + _conv(c, 3 * c, 1) + _conv(c, c, 1)


@pytest.mark.parametrize("attention", [(), (4,)])
def test_unet_parameter_count_by_hand(attention):
    net = ScoreUNet(
        SHAPE, channels=4, channel_mult=(1, 2), num_res_blocks=1, norm_groups=2, emb_dim=16,
        attention_resolutions=attention,
    )  # fmt: skip
    e = 16
    expected = (
        _lin(8, e) + _lin(e, e)  # 4 Fourier frequencies -> 8 features -> MLP
        + _conv(1, 4, 3)  # stem
        + _res(4, 4, e) + _conv(4, 4, 3) + _res(4, 8, e)  # encoder: 8x8 block, stride-2 conv, 4x4 block
        + _res(8, 8, e) + _res(8, 8, e)  # middle
        + _res(8 + 8, 8, e) + _res(8 + 4, 8, e) + _conv(8, 8, 3)  # decoder 4x4: skips of width 8, 4; upsample conv
        + _res(8 + 4, 4, e) + _res(4 + 4, 4, e)  # decoder 8x8: skips of width 4, 4
        + 2 * 4 + _conv(4, 1, 3)  # GN, conv out
    )  # fmt: skip
    if attention:  # 4x4 level: after the encoder block, in the middle, after each of the two decoder blocks
        expected += 4 * _attn(8)
    assert net.num_parameters() == count_parameters(net) == expected


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_classifier_parameter_count_by_hand(norm):
    net = ConvClassifier(SHAPE, 3, channels=(4, 8), blocks_per_stage=1, norm=norm, norm_groups=2, emb_dim=16)
    nb = norm != "none"  # conv biases only without a norm; GroupNorm and BatchNorm both have 2c parameters

    def n(c: int) -> int:
        return 2 * c if nb else 0

    expected = (
        _lin(8, 16) + _lin(16, 16)  # embedding
        + _conv(1, 4, 3, not nb) + n(4)  # stem
        + _conv(4, 4, 3, not nb) + n(4) + _lin(16, 4) + _conv(4, 4, 3, not nb) + n(4)  # block 1, identity shortcut
        + _conv(4, 8, 3, not nb) + n(8) + _lin(16, 8) + _conv(8, 8, 3, not nb) + n(8)  # block 2, stride 2
        + _conv(4, 8, 1, not nb) + n(8)  # its 1x1 stride-2 shortcut
        + _lin(8, 3)  # head
    )  # fmt: skip
    assert net.num_parameters() == expected


@pytest.mark.parametrize(("blocks", "resnet_count"), [((2, 2, 2, 2), 11_173_962), ((3, 4, 6, 3), 21_282_122)])
def test_resnet18_34_widths_have_the_cifar_resnet_count_plus_the_sigma_parts(blocks, resnet_count):
    """CIFAR ResNet-18/34 (3x3 stem, 10 classes) = torchvision's 11,689,512 / 21,797,672 - 7x7 stem (9,408)
    + 3x3 stem (1,728) - 1000-way fc (513,000) + 10-way fc (5,130). The sigma parts come on top."""
    net = ConvClassifier((3, 32, 32), 10, channels=(64, 128, 256, 512), blocks_per_stage=blocks, norm="batch")
    e, m = 256, 64  # emb_dim = 4 * 64, dim // 4 frequencies
    widths = [w for w, b in zip((64, 128, 256, 512), blocks, strict=True) for _ in range(b)]
    sigma_parts = _lin(2 * m, e) + _lin(e, e) + sum(_lin(e, w) for w in widths)
    assert net.num_parameters() == resnet_count + sigma_parts


# ---- configuration errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ScoreUNet((1, 6, 6)), "divisible by 4"),
        (lambda: ScoreUNet((1, 8, 8), channel_mult=(1, 2, 2, 2, 2)), "divisible by 16"),
        (lambda: ScoreUNet((1, 8, 8), channels=12), "GroupNorm with 8 groups"),
        (lambda: ScoreUNet((1, 8, 8), attention_resolutions=(3,)), "attention_resolutions"),
        (lambda: ScoreUNet((8, 8)), "shape must be"),
        (lambda: ScoreUNet((1, 8, 8), dropout=1.0), "dropout"),
        (lambda: ConvClassifier((1, 6, 6), 2, channels=(8, 16, 32)), "divisible by 4"),
        (lambda: ConvClassifier((1, 8, 8), 2, channels=(30, 60)), "GroupNorm with 8 groups"),
        (lambda: ConvClassifier((1, 8, 8), 2, norm="layer"), "norm must be one of"),
        (lambda: ConvClassifier((1, 8, 8), 2, blocks_per_stage=(1, 2, 3)), "blocks_per_stage"),
        (lambda: _tiny_unet()(torch.zeros(2, 3, 8, 8), 1.0), "built for images of shape"),
        (lambda: _tiny_clf()(torch.zeros(2, 1, 16, 16), 1.0), "built for images of shape"),
    ],
)
def test_bad_configurations_raise_a_one_line_config_error(make, match, capsys):
    with pytest.raises(ConfigError) as info:
        make()
    # gin appends "In call to configurable ..." lines after ours; the launcher prints the first line only
    assert match in str(info.value).splitlines()[0]
    assert print_error(info.value) == ConfigError.exit_code
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and match in printed and "In call to" not in printed


def test_both_nets_are_gin_configurable():
    try:
        gin.parse_config(["ScoreUNet.channels = 16", "ConvClassifier.channels = (8, 16, 24)"])
        assert ScoreUNet(SHAPE).net.conv_in.out_channels == 16
        assert ConvClassifier(SHAPE, 2).head.in_features == 24
    finally:
        gin.clear_config()


# ---- tiny overfits -----------------------------------------------------------------------------------


def _halves(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: bright left half; class 1: bright right half (values +1 / -1)."""
    y = torch.arange(n) % 2
    x = -torch.ones(n, *SHAPE)
    x[y == 0, :, :, :4] = 1.0
    x[y == 1, :, :, 4:] = 1.0
    return x + 0.1 * torch.randn(x.shape, generator=generator), y


def test_classifier_overfits_left_vs_right_halves():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = _halves(64, g)
    sigma = 0.1
    x_noisy = x + sigma * torch.randn(x.shape, generator=g)
    clf = ConvClassifier(SHAPE, 2, channels=(16, 32))
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(clf(x_noisy, sigma), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (clf(x_noisy, sigma).argmax(1) == y).float().mean().item()
    assert acc >= 0.95, acc


def test_score_unet_halves_the_sigma2_weighted_dsm_loss_on_a_fixed_batch():
    """sigma^2-weighted DSM: E || sigma s(x + sigma z, sigma) + z ||^2 on a fixed batch (x, z, sigma)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, _ = _halves(32, g)
    z = torch.randn(x.shape, generator=g)
    sigma = torch.exp(torch.empty(32).uniform_(math.log(0.05), math.log(2.0), generator=g))
    x_noisy = x + sigma[:, None, None, None] * z
    net = ScoreUNet(SHAPE, channels=16, channel_mult=(1, 2))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def dsm() -> torch.Tensor:
        return (sigma[:, None, None, None] * net(x_noisy, sigma) + z).square().sum((1, 2, 3)).mean()

    first = dsm().item()
    for _ in range(100):
        loss = dsm()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert dsm().item() < 0.5 * first, (first, dsm().item())


# ---- GPU -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_outputs_match_cpu():
    torch.manual_seed(8)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    sig = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=torch.float64)
    nets = [
        ScoreUNet((3, 32, 32), attention_resolutions=(16,)),
        ConvClassifier((3, 32, 32), 10),
        ConvClassifier((3, 32, 32), 10, channels=(64, 128, 256, 512), blocks_per_stage=2, norm="batch"),
    ]
    for net in nets:
        net = net.double().eval()  # float64: no TF32 convolutions on the GPU
        cpu = net(x, sig)
        gpu = net.to("cuda")(x.cuda(), sig.cuda())
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)


# ---- the official DLSM classifier layout (per-stage sigma bias) and BatchNorm at sampling time ---------------


@pytest.mark.parametrize(("blocks", "classes", "resnet_count"),
                         [((2, 2, 2, 2), 10, 11_173_962), ((3, 4, 6, 3), 100, 21_282_122 - 5_130 + 51_300)])
def test_official_resnet_cond_count(blocks, classes, resnet_count):
    """The official ``resnet_cond`` (classifier.nf = 32): CIFAR ResNet + Fourier MLP 64 -> 128 -> 128 + one dense
    per stage 128 -> 64/128/256/512; the Fourier frequencies are fixed (not trainable) there and here."""
    net = ConvClassifier((3, 32, 32), classes, channels=(64, 128, 256, 512), blocks_per_stage=blocks, norm="batch",
                         condition="stage", emb_dim=128, num_frequencies=32)
    sigma_parts = _lin(64, 128) + _lin(128, 128) + sum(_lin(128, w) for w in (64, 128, 256, 512))
    assert net.num_parameters() == resnet_count + sigma_parts
    assert net.embed.freqs.shape == (32,)


def test_stage_conditioning_adds_one_bias_after_each_stage():
    """condition='stage': h <- stage_k(h) + Dense_k(SiLU(e)), computed here from the parts by hand."""
    torch.manual_seed(3)
    net = ConvClassifier(SHAPE, 3, channels=(8, 16), blocks_per_stage=(2, 1), condition="stage").double().eval()
    assert all(b.emb is None for b in net.blocks) and net.stage_ends == [1, 2]
    x, sigma = torch.randn(5, *SHAPE, dtype=torch.float64), torch.tensor([0.1, 0.5, 1.0, 2.0, 9.0]).double()
    emb = torch.nn.functional.silu(net.embed(sigma.log()))
    h = net.stem(x)
    h = net.blocks[1](net.blocks[0](h, None), None) + net.stage_emb[0](emb)[:, :, None, None]
    h = net.blocks[2](h, None) + net.stage_emb[1](emb)[:, :, None, None]
    torch.testing.assert_close(net(x, sigma), net.head(h.mean(dim=(2, 3))), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # without the stage biases the logits no longer depend on sigma
        for lin in net.stage_emb:
            lin.weight.zero_(), lin.bias.zero_()
    torch.testing.assert_close(net(x, 0.1), net(x, 9.0), rtol=1e-12, atol=1e-12)


def test_sampling_uses_the_running_statistics_of_a_batchnorm_classifier():
    """ModelScores (what the sampler calls) puts the classifier in eval mode: the likelihood score of a sample is
    the same alone or in any batch, and sampling leaves the running statistics as training left them."""
    from dlsm.math.scores import ModelScores

    torch.manual_seed(0)
    clf = ConvClassifier(SHAPE, 3, channels=(8, 16), norm="batch", condition="stage").double()
    clf.train()
    for _ in range(3):  # give the running statistics values of their own
        clf(torch.randn(16, *SHAPE, dtype=torch.float64) * 2 + 1, 0.5)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    assert clf.training  # as stage 2 leaves a network it has just trained, before the stage's own eval()
    scores = ModelScores(lambda x, s: torch.zeros_like(x), clf, alpha=1.0)
    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    batch = scores.likelihood(x, 0.5, 1)
    alone = torch.cat([scores.likelihood(x[i : i + 1], 0.5, 1) for i in range(6)])
    torch.testing.assert_close(batch, alone, rtol=1e-10, atol=1e-12)
    # the reference: eval-mode BatchNorm is the affine map of the running statistics
    assert not clf.training
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())
