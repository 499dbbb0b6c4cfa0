"""NCSN++ (dlsm.nets.ncsnpp): a float64 forward written from the module docstring, Technique 3 (s = F / sigma),
sigma conditioning, float vs tensor sigma, the score_sde initialisation, full-width parameter counts against the
official score_sde_pytorch numbers and against diffusers' closest UNet2DModel, gradients, one-line ConfigErrors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from diffusers import UNet2DModel

from dlsm.errors import ConfigError, print_error
from dlsm.nets.ncsnpp import NCSNpp, closest_unet2d_config, upfirdn2d

F = torch.nn.functional
TINY = {"channels": 8, "channel_mult": (1, 2), "num_res_blocks": 2, "attn_resolutions": (4,), "dropout": 0.0}


def _tiny(shape=(1, 8, 8), **kw) -> NCSNpp:
    return NCSNpp(shape, **{**TINY, **kw})


def _perturbed(net: NCSNpp, seed: int = 0) -> NCSNpp:
    """Random non-trivial weights everywhere (GroupNorm affine too), so no layer is the identity or zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


# ---- a float64 forward written from the module docstring ---------------------------------------------------------

SQRT2 = math.sqrt(2.0)
K = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
K2 = torch.outer(K, K) / 64.0  # the [1,3,3,1] FIR kernel, normalised


def _fir(h: torch.Tensor, *, up: bool) -> torch.Tensor:
    """FIR x2 resampling with [1,3,3,1] (StyleGAN2 upfirdn2d): down = filter then keep every 2nd sample;
    up = zero-insertion then filter with 4 * kernel (gain factor^2)."""
    c = h.shape[1]
    k = K2.to(h.dtype).expand(c, 1, 4, 4)
    if up:
        return F.conv_transpose2d(h, 4.0 * k, stride=2, padding=1, groups=c)
    return F.conv2d(F.pad(h, (1, 1, 1, 1)), k, stride=2, groups=c)


def _fir_conv_down(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """score_sde conv_downsample_2d: FIR-filter with padding 2, then the 3x3 conv with stride 2."""
    c = h.shape[1]
    return F.conv2d(F.conv2d(F.pad(h, (2, 2, 2, 2)), K2.to(h.dtype).expand(c, 1, 4, 4), groups=c), w, b, stride=2)


def _reference(p: dict, x: torch.Tensor, sigma: torch.Tensor, *, mult=(1, 2), nrb=2, attn=(4,)) -> torch.Tensor:
    """F(x, log sigma) of the module docstring with nf 8, GroupNorm min(C // 4, 32) groups, eps 1e-6."""
    silu = F.silu

    def gn(k, h):
        return F.group_norm(h, min(h.shape[1] // 4, 32), p[f"{k}.weight"], p[f"{k}.bias"], eps=1e-6)

    def conv(k, h):
        w = p[f"{k}.weight"]
        return F.conv2d(h, w, p[f"{k}.bias"], padding=w.shape[-1] // 2)

    def dense(k, h):
        return h @ p[f"{k}.weight"].T + p[f"{k}.bias"]

    def block(k, h_in, e, *, up=False, down=False):
        h, x_ = silu(gn(f"{k}.norm1", h_in)), h_in
        if up or down:
            h, x_ = _fir(h, up=up), _fir(x_, up=up)
        h = conv(f"{k}.conv1", h) + dense(f"{k}.time_emb_proj", silu(e))[:, :, None, None]
        h = conv(f"{k}.conv2", silu(gn(f"{k}.norm2", h)))
        if f"{k}.conv_shortcut.weight" in p:
            x_ = conv(f"{k}.conv_shortcut", x_)
        return (x_ + h) / SQRT2

    def attention(k, h_in):
        b, c, hh, ww = h_in.shape
        h = gn(f"{k}.group_norm", h_in).reshape(b, c, hh * ww).transpose(1, 2)
        q, kk, v = (dense(f"{k}.to_{n}", h) for n in "qkv")
        a = torch.softmax(q @ kk.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
        return (h_in + dense(f"{k}.to_out.0", a).transpose(1, 2).reshape(b, c, hh, ww)) / SQRT2

    phase = 2 * math.pi * torch.log(sigma)[:, None] * p["time_proj.weight"][None, :]
    e = dense(
        "time_embedding.linear_2", silu(dense("time_embedding.linear_1", torch.cat([phase.sin(), phase.cos()], 1)))
    )
    h = conv("conv_in", x)
    hs, pyramid = [h], x
    for i in range(len(mult)):
        for j in range(nrb):
            h = block(f"down_blocks.{i}.resnets.{j}", h, e)
            if h.shape[-1] in attn:
                h = attention(f"down_blocks.{i}.attentions.{j}", h)
            hs.append(h)
        if i < len(mult) - 1:
            h = block(f"down_blocks.{i}.resnet_down", h, e, down=True)
            k = f"down_blocks.{i}.pyramid_down.Conv2d_0"
            pyramid = (_fir_conv_down(pyramid, p[f"{k}.weight"], p[f"{k}.bias"]) + h) / SQRT2
            h = pyramid
            hs.append(h)
    h = block("mid_block.resnets.1", attention("mid_block.attentions.0", block("mid_block.resnets.0", h, e)), e)
    for n, i in enumerate(reversed(range(len(mult)))):
        for j in range(nrb + 1):
            h = block(f"up_blocks.{n}.resnets.{j}", torch.cat([h, hs.pop()], dim=1), e)
        if h.shape[-1] in attn:
            h = attention(f"up_blocks.{n}.attention", h)
        if i > 0:
            h = block(f"up_blocks.{n}.resnet_up", h, e, up=True)
    assert not hs
    return conv("conv_out", silu(gn("conv_norm_out", h)))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8)])
def test_forward_matches_the_docstring_written_out_in_float64(shape):
    torch.manual_seed(0)
    net = _perturbed(_tiny(shape, scale_by_sigma=False)).double().eval()
    p = dict(net.named_parameters())
    x = torch.randn(3, *shape, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    # data in [0, 1] (centered_input=False, score_sde's data.centered=False): the body sees 2 x - 1
    torch.testing.assert_close(net(x, sigma), _reference(p, 2 * x - 1, sigma), rtol=1e-10, atol=1e-10)
    net.centered_input = True
    torch.testing.assert_close(net(x, sigma), _reference(p, x, sigma), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("up", "down", "pad", "gain"),
    [(1, 2, (1, 1), 1.0), (2, 1, (2, 1), 4.0), (1, 1, (2, 2), 1.0), (3, 2, (0, 3), 2.0)],
)
def test_upfirdn2d_equals_diffusers_upfirdn2d_native_in_values_and_gradients(up, down, pad, gain):
    """The grouped-conv FIR resampling that replaces diffusers' reshape-to-one-channel version inside NCSN++."""
    from diffusers.models.upsampling import upfirdn2d_native

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g, requires_grad=True)
    kernel = torch.rand(4, 4, dtype=torch.float64, generator=g) * gain  # not symmetric: the flip matters
    ours, theirs = upfirdn2d(x, kernel, up=up, down=down, pad=pad), upfirdn2d_native(x, kernel, up, down, pad)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    cot = torch.randn(ours.shape, dtype=torch.float64, generator=g)
    (g_ours,), (g_theirs,) = torch.autograd.grad(ours, x, cot), torch.autograd.grad(theirs, x, cot)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-12)


# ---- preconditioning and sigma --------------------------------------------------------------------------------------


def test_technique3_scaled_output_is_the_unscaled_output_divided_by_sigma():
    torch.manual_seed(1)
    scaled = _perturbed(_tiny(scale_by_sigma=True)).double().eval()
    raw = _tiny(scale_by_sigma=False).double().eval()
    raw.load_state_dict(scaled.state_dict())
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    for sigma in (0.01, 0.3, 1.0, 7.5, 50.0):
        torch.testing.assert_close(scaled(x, sigma), raw(x, sigma) / sigma, rtol=1e-12, atol=0)
    sig = torch.tensor([0.02, 0.5, 3.0, 40.0], dtype=torch.float64)
    torch.testing.assert_close(scaled(x, sig), raw(x, sig) / sig[:, None, None, None], rtol=1e-12, atol=0)


def test_float_sigma_equals_tensor_sigma_and_rows_are_per_example_calls():
    torch.manual_seed(2)
    net = _perturbed(_tiny()).eval()
    x = torch.randn(3, 1, 8, 8)
    for sigma in (0.05, 2.0):
        expected = net(x, torch.full((3,), sigma))
        torch.testing.assert_close(net(x, sigma), expected, rtol=0, atol=0)
        torch.testing.assert_close(net(x, torch.tensor(sigma)), expected, rtol=0, atol=0)
    net, x = net.double(), x.double()
    sig = torch.tensor([0.05, 2.0, 30.0], dtype=torch.float64)
    rows = torch.cat([net(x[i : i + 1], float(sig[i])) for i in range(3)])
    torch.testing.assert_close(net(x, sig), rows, rtol=1e-10, atol=1e-12)


def test_unscaled_output_depends_on_sigma():
    torch.manual_seed(3)
    net = _tiny(scale_by_sigma=False, init_scale=1.0).eval()
    x = torch.randn(2, 1, 8, 8)
    a, b = net(x, 0.1), net(x, 10.0)
    assert (a - b).abs().max() > 1e-2 * a.abs().max()


# ---- initialisation -------------------------------------------------------------------------------------------------


def _bound(layer: torch.nn.Module, scale: float) -> float:
    """score_sde default_init(scale): U(-a, a) with a^2 = 3 scale / fan_avg."""
    w = layer.weight
    receptive = w[0, 0].numel() if w.ndim == 4 else 1
    return math.sqrt(3.0 * scale / ((w.shape[0] + w.shape[1]) * receptive / 2))


def test_init_is_score_sde_default_init_with_init_scale_zero_on_the_last_layers():
    torch.manual_seed(4)
    net = NCSNpp((3, 16, 16), channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    block, attn = net.down_blocks[0].resnets[0], net.down_blocks[1].attentions[0]
    for layer, scale in [
        (net.conv_in, 1.0),
        (net.time_embedding.linear_1, 1.0),
        (block.conv1, 1.0),
        (block.time_emb_proj, 1.0),
        (attn.to_q, 0.1),
        (net.down_blocks[0].pyramid_down.Conv2d_0, 1.0),
        (block.conv2, 1e-10),
        (attn.to_out[0], 1e-10),
        (net.conv_out, 1e-10),
    ]:
        a = _bound(layer, scale)
        assert 0.9 * a < layer.weight.abs().max() <= a, layer
        assert layer.bias.abs().max() == 0
    x = torch.randn(2, 3, 16, 16)
    assert net.eval()(x, 1.0).abs().max() < 1e-3  # init_scale 0: F starts at ~0, every block at ~identity
    assert NCSNpp((3, 16, 16), channels=32, channel_mult=(1, 2), init_scale=1.0).eval()(x, 1.0).abs().max() > 1e-2


# ---- parameter counts -----------------------------------------------------------------------------------------------

# instantiating yang-song/score_sde_pytorch models/ncsnpp.py (commit cb1f359) with configs/ve/cifar10_ncsnpp_continuous
# and cifar10_ncsnpp_deep_continuous gives 62,758,915 and 107,587,075 parameters, 128 of them the frozen Fourier W
OFFICIAL = {4: 62_758_787, 8: 107_586_947}


@pytest.mark.parametrize("blocks", [4, 8])
def test_full_width_parameter_count_equals_the_official_ncsnpp(blocks):
    with torch.device("meta"):
        net = NCSNpp((3, 32, 32), num_res_blocks=blocks)
    assert net.num_parameters() == OFFICIAL[blocks]
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL[blocks] + 128


@pytest.mark.parametrize("blocks", [4, 8])
def test_closest_unet2d_model_differs_only_by_the_progressive_paths(blocks):
    """UNet2DModel with the hub NCSN++ blocks: input_skip 1x1 convs 3->C and output_skip GN + 3x3 conv C->3 at the
    three upsampling levels, instead of the residual pyramid's FIR 3x3 convs 3->128->256->256."""
    with torch.device("meta"):
        hub = UNet2DModel(**closest_unet2d_config((3, 32, 32), num_res_blocks=blocks))
    hub_count = sum(p.numel() for p in hub.parameters() if p.requires_grad)
    residual_pyramid = (3 * 9 * 128 + 128) + (128 * 9 * 256 + 256) + (256 * 9 * 256 + 256)
    input_skip = (3 * 128 + 128) + 2 * (3 * 256 + 256)
    output_skip = 3 * (2 * 256 + 256 * 9 * 3 + 3)
    assert OFFICIAL[blocks] - hub_count == residual_pyramid - input_skip - output_skip == 863_991


# ---- gradients and errors -------------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter_and_the_input():
    torch.manual_seed(5)
    net = _tiny((3, 8, 8), init_scale=1.0, dropout=0.1)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    loss = (net(x, torch.tensor([0.1, 0.5, 2.0, 20.0])) ** 2).mean()
    loss.backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert net.time_proj.weight.grad is None  # the Fourier frequencies stay fixed
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "shape, kw, match",
    [
        ((3, 30, 30), {"channel_mult": (1, 2, 2, 2), "attn_resolutions": ()}, "divisible by 8"),
        ((3, 8, 8), {"attn_resolutions": (16,)}, "attn_resolutions"),
        ((3, 8, 8), {"channels": 2, "attn_resolutions": ()}, "min\\(C // 4, 32\\)"),
        ((3, 8, 8), {"norm_groups": 3}, "3 groups"),
        ((3, 8), {}, "shape must be"),
        ((3, 8, 8), {"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_configurations_are_one_line_config_errors(shape, kw, match, capsys):
    with pytest.raises(ConfigError) as err:
        _tiny(shape, **kw)
    # gin appends "In call to configurable ..." lines after ours; the launcher prints the first line only
    assert re.search(match, str(err.value).splitlines()[0])
    assert print_error(err.value) == ConfigError.exit_code
    assert capsys.readouterr().err.count("\n") == 1


def test_a_batch_of_the_wrong_shape_is_a_config_error():
    net = _tiny()
    with pytest.raises(ConfigError, match="built for images of shape"):
        net(torch.randn(2, 3, 8, 8), 1.0)


def test_narrow_nets_work_with_an_explicit_group_count():
    net = NCSNpp((1, 8, 8), channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), norm_groups=4)
    assert net(torch.randn(2, 1, 8, 8), 0.3).shape == (2, 1, 8, 8)
    assert {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} == {4}
