"""NCSNv2 score network (dlsm.nets.ncsnv2): output shapes and the official stage layout (one halving, then dilated
stages at the same resolution), Technique 3 s = F(x)/sigma with an unconditional body, the 2x - 1 input map,
InstanceNorm++ against a float64 NumPy computation of its formula, the full-width CIFAR-10 parameter count against a
layer-by-layer count of the official ermongroup/ncsnv2 source, one-line ConfigErrors, batch independence, backward."""

from __future__ import annotations

import math

import gin
import numpy as np
import pytest
import torch

from dlsm.errors import ConfigError, print_error
from dlsm.nets.ncsnv2 import InstanceNorm2dPlus, NCSNv2


def _tiny(shape: tuple[int, int, int] = (3, 8, 8), **kw) -> NCSNv2:
    return NCSNv2(shape, **{"ngf": 8, **kw})


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter (so that beta != 0 and alpha, gamma != 1 matter in the checks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---- shapes and layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 8, 8), (3, 32, 32), (3, 8, 12)])
def test_output_has_the_input_shape(shape):
    torch.manual_seed(0)
    net = _tiny(shape)
    x = torch.rand(2, *shape)
    out = net(x, 0.5)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("variant", "size"), [("deeper", 16), ("deepest", 16)])
def test_deeper_variants_run(variant, size):
    torch.manual_seed(0)
    net = _tiny((3, size, size), variant=variant)
    assert net(torch.rand(2, 3, size, size), 1.0).shape == (2, 3, size, size)


def test_stages_follow_the_official_32x32_layout():
    """ngf at 32x32, then 2 ngf at 16x16 for stages 2-4: the dilated 'down' blocks keep the resolution."""
    net = _tiny((3, 32, 32))
    seen = []
    hooks = [s.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[1:]))) for s in net.net.stages]
    net(torch.rand(1, 3, 32, 32), 1.0)
    for h in hooks:
        h.remove()
    assert seen == [(8, 32, 32), (16, 16, 16), (16, 16, 16), (16, 16, 16)]
    dilations = [[b.conv1.dilation[0] for b in s] for s in net.net.stages]
    assert dilations == [[1, 1], [1, 1], [2, 2], [4, 4]]


# ---- preconditioning: Technique 3 and the input map ----------------------------------------------


def test_technique3_output_times_sigma_is_the_unscaled_output():
    torch.manual_seed(1)
    scaled = _tiny(scale_by_sigma=True).double()
    raw = _tiny(scale_by_sigma=False).double()
    raw.load_state_dict(scaled.state_dict())
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    for sigma in (0.01, 0.3, 1.0, 50.0):
        torch.testing.assert_close(scaled(x, sigma) * sigma, raw(x, sigma), rtol=1e-12, atol=1e-12)
    sig = torch.tensor([0.01, 0.5, 3.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(scaled(x, sig) * sig[:, None, None, None], raw(x, sig), rtol=1e-12, atol=1e-12)


def test_body_is_unconditional_and_forward_is_body_of_2x_minus_1_over_sigma():
    torch.manual_seed(2)
    net = _tiny().double()
    raw = _tiny(scale_by_sigma=False).double()
    raw.load_state_dict(net.state_dict())
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(raw(x, 0.01), raw(x, 50.0), rtol=0, atol=0)  # F does not see sigma
    sig = torch.tensor([0.02, 1.0, 9.0], dtype=torch.float64)
    expected = net.net(2.0 * x - 1.0) / sig[:, None, None, None]
    torch.testing.assert_close(net(x, sig), expected, rtol=1e-12, atol=1e-12)


def test_centered_input_skips_the_2x_minus_1_map():
    torch.manual_seed(3)
    plain = _tiny(centered_input=False).double()
    centered = _tiny(centered_input=True).double()
    centered.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(plain(x, 0.7), centered(2.0 * x - 1.0, 0.7), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(plain(x, 0.7), centered(x, 0.7))


def test_examples_do_not_interact_across_the_batch():
    torch.manual_seed(4)
    net = _tiny().double()
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    sig = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    torch.testing.assert_close(net(x, sig)[1:3], net(x[1:3], sig[1:3]), rtol=1e-10, atol=1e-10)


def _deterministic_weights(net: torch.nn.Module) -> None:
    """Weights from a formula (no RNG): conv weights sin(0.7 j + i)/sqrt(fan_in), alpha/gamma 1 + 0.1 sin(.),
    biases and beta 0.1 sin(.), with i the index of the parameter in name order and j the flat position."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(net.named_parameters())):
            w = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i).reshape(p.shape)
            if p.ndim == 4:
                p.copy_(w / math.sqrt(p[0].numel()))
            elif name.endswith(("alpha", "gamma")):
                p.copy_(1.0 + 0.1 * w)
            else:
                p.copy_(0.1 * w)


@pytest.mark.parametrize(
    ("size", "known"),
    [
        (8, (-151.3397468543494, 1415.4083234103318, 1.032005618404335, 0.6695213929898436)),
        (32, (-124.47222501850773, 20366.7010479902, 0.24756158065023698, 0.6143818834325545)),
    ],
)
def test_body_matches_the_official_network_on_known_answers(size, known):
    """F(x) for ngf 8 and formula weights, against numbers produced by the official ermongroup/ncsnv2 NCSNv2
    (commit 1bcea03, float64, the same weights loaded by name; its output times sigma): sum, sum of squares and two
    entries. Catches any change of block order, activation placement, pooling, interpolation or input map."""
    net = NCSNv2((3, size, size), ngf=8, scale_by_sigma=False).double()
    _deterministic_weights(net)
    n = 2 * 3 * size * size
    x = (0.5 + 0.4 * torch.sin(torch.arange(n, dtype=torch.float64) * 0.13)).reshape(2, 3, size, size)
    f = net(x, 1.0).detach()
    got = (f.sum().item(), (f**2).sum().item(), f[0, 0, 0, 0].item(), f[1, 2, size - 1, size // 2].item())
    assert got == pytest.approx(known, rel=1e-9, abs=1e-12)


# ---- InstanceNorm++ ------------------------------------------------------------------------------


def _instance_norm_plus_reference(x, alpha, gamma, beta, eps=1e-5):
    """NCSN InstanceNorm++ in float64 NumPy, channel by channel (official normalization.InstanceNorm2dPlus):
    z_k = gamma_k [(x_k - mu_k)/sqrt(s_k^2 + eps) + alpha_k (mu_k - m)/sqrt(v + eps)] + beta_k,
    mu_k, s_k^2 the spatial mean and biased variance, m and v the mean and unbiased (ddof=1) variance of the mu_k."""
    b, c = x.shape[:2]
    out = np.empty_like(x)
    for i in range(b):
        mu = np.array([x[i, k].mean() for k in range(c)])
        m, v = mu.mean(), mu.var(ddof=1)
        for k in range(c):
            s2 = ((x[i, k] - mu[k]) ** 2).mean()
            normed = (x[i, k] - mu[k]) / np.sqrt(s2 + eps) + alpha[k] * (mu[k] - m) / np.sqrt(v + eps)
            out[i, k] = gamma[k] * normed + beta[k]
    return out


def test_instance_norm_plus_matches_a_float64_reference():
    torch.manual_seed(5)
    norm = InstanceNorm2dPlus(6).double()
    _randomise(norm, seed=5)
    x = (
        torch.randn(3, 6, 5, 7, dtype=torch.float64) * torch.linspace(0.5, 3.0, 6)[:, None, None]
        + torch.arange(6.0)[:, None, None].double()
    )
    expected = _instance_norm_plus_reference(
        x.numpy(), norm.alpha.detach().numpy(), norm.gamma.detach().numpy(), norm.beta.detach().numpy()
    )
    np.testing.assert_allclose(norm(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_instance_norm_plus_initialisation_is_the_official_one():
    torch.manual_seed(6)
    norm = InstanceNorm2dPlus(4096)
    assert torch.equal(norm.beta, torch.zeros(4096))
    for p in (norm.alpha, norm.gamma):
        assert abs(p.mean().item() - 1.0) < 2e-3 and abs(p.std().item() - 0.02) < 2e-3


# ---- parameter count -----------------------------------------------------------------------------


def _official_ncsnv2_parameter_count(channels: int, ngf: int) -> int:
    """Parameters of ermongroup/ncsnv2 ``models/ncsnv2.py::NCSNv2`` counted by hand from its source.

    conv k x k (in -> out): k^2 in out weights (+ out biases; the RCU/CRP convs have none);
    InstanceNorm2dPlus(c) with bias: alpha, gamma, beta = 3c.
    """
    n, a, c = ngf, 2 * ngf, channels
    norm = 3
    # ResidualBlock(c_in=c_out=w, resample=None, no dilation): norm1, conv1 3x3, norm2, conv2 3x3; identity shortcut
    plain = lambda w: norm * w + (9 * w * w + w) + norm * w + (9 * w * w + w)  # noqa: E731
    begin = 9 * c * n + n
    res1 = 2 * plain(n)
    # res2[0] ResidualBlock(n, 2n, 'down'): conv1 3x3 n->n, norm2(n), ConvMeanPool 3x3 n->2n, shortcut ConvMeanPool 1x1
    res2 = norm * n + (9 * n * n + n) + norm * n + (9 * n * a + a) + (n * a + a) + plain(a)
    # res3[0] / res4[0] ResidualBlock(2n, 2n, 'down', dilation): conv1, conv2 and the shortcut are dilated 3x3 convs
    dilated_down = norm * a + (9 * a * a + a) + norm * a + (9 * a * a + a) + (9 * a * a + a)
    res3 = dilated_down + plain(a)  # res3[1], res4[1]: resample=None with dilation -> same count as plain
    res4 = dilated_down + plain(a)
    rcu = lambda w, blocks: blocks * 2 * 9 * w * w  # noqa: E731  RCUBlock(w, blocks, 2 stages), bias-free
    crp = lambda w: 2 * 9 * w * w  # noqa: E731  CRPBlock(w, 2 stages), bias-free
    msf = lambda ins, w: sum(9 * i * w + w for i in ins)  # noqa: E731  one 3x3 conv with bias per input
    refine1 = rcu(a, 2) + crp(a) + rcu(a, 1)  # RefineBlock([2n], 2n, start=True): no MSF
    refine2 = 2 * rcu(a, 2) + msf([a, a], a) + crp(a) + rcu(a, 1)
    refine3 = 2 * rcu(a, 2) + msf([a, a], n) + crp(n) + rcu(n, 1)
    refine4 = 2 * rcu(n, 2) + msf([n, n], n) + crp(n) + rcu(n, 3)  # end=True: 3 output RCU blocks
    end = norm * n + (9 * n * c + c)  # normalizer + end_conv
    return begin + res1 + res2 + res3 + res4 + refine1 + refine2 + refine3 + refine4 + end


def test_full_width_cifar10_parameter_count_is_the_official_one():
    """29,694,083 for 3x32x32 and ngf 128 (also what instantiating the official NCSNv2 class gives)."""
    assert _official_ncsnv2_parameter_count(3, 128) == 29_694_083
    with torch.device("meta"):  # no memory, no init cost
        net = NCSNv2((3, 32, 32), ngf=128)
        deeper = NCSNv2((3, 32, 32), ngf=128, variant="deeper")
        deepest = NCSNv2((3, 32, 32), ngf=128, variant="deepest")
    assert net.num_parameters() == 29_694_083
    # official NCSNv2Deeper / NCSNv2Deepest with ngf 128, counted by instantiating the official classes
    assert deeper.num_parameters() == 83_445_379
    assert deepest.num_parameters() == 94_132_611


@pytest.mark.parametrize(("channels", "ngf"), [(1, 8), (3, 8), (3, 16), (1, 64)])
def test_small_parameter_counts_follow_the_official_formula(channels, ngf):
    net = NCSNv2((channels, 8, 8), ngf=ngf)
    assert net.num_parameters() == _official_ncsnv2_parameter_count(channels, ngf)


# ---- errors, gin, backward -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (3, 7, 8)}, "divisible by 2"),
        ({"shape": (3, 6, 6), "variant": "deeper"}, "divisible by 4"),
        ({"shape": (3, 32)}, "shape must be"),
        ({"shape": (3, 2, 8)}, "at least 2x2"),
        ({"shape": (3, 8, 8), "ngf": 1}, "ngf"),
        ({"shape": (3, 8, 8), "variant": "huge"}, "unknown variant"),
    ],
)
def test_bad_configuration_is_a_one_line_config_error(kwargs, match, capsys):
    with pytest.raises(ConfigError, match=match) as err:
        NCSNv2(**{"ngf": 8, **kwargs})
    assert print_error(err.value) == ConfigError.exit_code
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and match in printed and "In call to" not in printed


def test_batch_of_the_wrong_shape_is_a_config_error():
    net = _tiny()
    with pytest.raises(ConfigError, match=r"built for images of shape \(3, 8, 8\)"):
        net(torch.rand(2, 3, 16, 16), 1.0)


def test_gin_binds_the_network():
    with gin.unlock_config():
        gin.parse_config(["NCSNv2.ngf = 8", "NCSNv2.centered_input = True"])
    try:
        net = NCSNv2((1, 8, 8))
        assert net.centered_input and net.net.begin_conv.out_channels == 8
    finally:
        gin.clear_config()


def test_backward_reaches_every_parameter():
    torch.manual_seed(7)
    net = _tiny((3, 8, 8))
    x = torch.rand(4, 3, 8, 8)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0])
    noise = torch.randn_like(x)
    score = net(x + sigma[:, None, None, None] * noise, sigma)
    loss = ((sigma[:, None, None, None] * score + noise) ** 2).sum(dim=(1, 2, 3)).mean()  # NCSNv2 DSM, lambda = sigma^2
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
