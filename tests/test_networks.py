"""Networks (dlsm.nets.mlp) against a manual float64 forward pass written from the module docstrings,
Technique 3 scaling, sigma conditioning, and hand-counted parameter numbers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlsm.errors import ConfigError
from dlsm.nets.mlp import BranchClassifier, ClassifierMLP, ScoreMLP


def _logit_input_jacobian(clf, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.autograd.functional.jacobian(lambda z: clf(z, sigma).sum(0), x)  # (classes, B, D)


def test_score_mlp_technique3_divides_the_unscaled_output_by_sigma():
    torch.manual_seed(0)
    scaled, raw = ScoreMLP(2, scale_by_sigma=True), ScoreMLP(2, scale_by_sigma=False)
    raw.load_state_dict(scaled.state_dict())
    x, sigma = torch.randn(16, 2), torch.rand(16) * 5 + 0.1
    torch.testing.assert_close(scaled(x, sigma) * sigma[:, None], raw(x, sigma))


def test_branch_classifier_input_gradient_does_not_depend_on_sigma():
    torch.manual_seed(0)
    clf = BranchClassifier(2, 2, activation="silu")
    x = torch.randn(8, 2)
    j1, j2 = _logit_input_jacobian(clf, x, 0.3), _logit_input_jacobian(clf, x, 20.0)
    torch.testing.assert_close(j1, j2)  # logits = a(x) + b(sigma): the x-Jacobian ignores sigma
    assert not torch.allclose(clf(x, 0.3), clf(x, 20.0))  # while the logits themselves do change


def test_sigma_conditioned_mlp_input_gradient_does_depend_on_sigma():
    torch.manual_seed(0)
    clf = ClassifierMLP(2, 2)
    x = torch.randn(8, 2)
    assert not torch.allclose(_logit_input_jacobian(clf, x, 0.3), _logit_input_jacobian(clf, x, 20.0))


@pytest.mark.parametrize("cls", [BranchClassifier, ClassifierMLP])
def test_classifiers_scalar_sigma_is_the_batch_of_it(cls):
    torch.manual_seed(1)
    clf = cls(2, 3)
    x = torch.randn(5, 2)
    out = clf(x, torch.full((5,), 2.0))
    assert out.shape == (5, 3)
    torch.testing.assert_close(clf(x, 2.0), out, rtol=0, atol=0)
    # per-example sigma: row i is the network at sigma_i alone
    sig = torch.tensor([0.1, 0.5, 2.0, 7.0, 30.0])
    rows = torch.cat([clf(x[i : i + 1], float(sig[i])) for i in range(5)])
    torch.testing.assert_close(clf(x, sig), rows, rtol=1e-6, atol=1e-6)


# ---- manual forward passes (float64, from the parameters) ---------------------------------------


def _silu(t: torch.Tensor) -> torch.Tensor:
    return t / (1.0 + torch.exp(-t))


def _lin(p: dict, name: str, h: torch.Tensor) -> torch.Tensor:
    return h @ p[f"{name}.weight"].double().T + p[f"{name}.bias"].double()


def _manual_trunk(p: dict, prefix: str, h: torch.Tensor, sigma: torch.Tensor, depth: int) -> torch.Tensor:
    """NoiseConditionalMLP: e = SiLU(P [sin 2 pi c f; cos 2 pi c f]), c = log(sigma)/4;
    h <- SiLU(W_l h + U_l e) for each layer; out = W_out h."""
    c = torch.log(sigma) / 4.0
    ang = 2.0 * math.pi * c[:, None] * p[f"{prefix}embed.freqs"].double()[None, :]
    e = _silu(_lin(p, f"{prefix}embed.proj", torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)))
    for i in range(depth):
        h = _silu(_lin(p, f"{prefix}layers.{i}", h) + _lin(p, f"{prefix}cond.{i}", e))
    return _lin(p, f"{prefix}out", h)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    depth=st.integers(1, 3),
    sigma_data=st.one_of(st.none(), st.floats(0.5, 20.0)),
    scale_by_sigma=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_score_mlp_matches_manual_forward(depth, sigma_data, scale_by_sigma, seed):
    """s(x, sigma) = F(c_in x, log(sigma)/4) * c_out, c_in = 1/sqrt(sigma^2 + sigma_data^2) (or 1),
    c_out = 1/sigma with Technique 3 (or 1)."""
    torch.manual_seed(seed)
    net = ScoreMLP(3, hidden=8, depth=depth, emb_dim=6, sigma_data=sigma_data, scale_by_sigma=scale_by_sigma)
    g = torch.Generator().manual_seed(seed)
    x = 5.0 * torch.randn(7, 3, generator=g)
    sigma = torch.exp(3.0 * torch.rand(7, generator=g) - 2.0)
    p = net.state_dict()
    xd, sd = x.double(), sigma.double()
    cin = 1.0 if sigma_data is None else 1.0 / torch.sqrt(sd**2 + sigma_data**2)[:, None]
    f = _manual_trunk(p, "net.", cin * xd, sd, depth)
    ref = f / sd[:, None] if scale_by_sigma else f
    torch.testing.assert_close(net(x, sigma).double(), ref, rtol=1e-5, atol=1e-6)


def test_score_and_classifier_outputs_depend_on_sigma():
    """Conditioning is live: the un-scaled body F changes with sigma at a fixed input."""
    torch.manual_seed(0)
    raw = ScoreMLP(2, scale_by_sigma=False)
    clf = ClassifierMLP(2, 3)
    x = torch.randn(8, 2)
    for net in (raw, clf):
        a, b = net(x, 0.3).detach(), net(x, 20.0).detach()
        assert float((a - b).abs().max()) > 1e-3 * float(a.abs().max())


@pytest.mark.parametrize("activation", ["relu", "silu", "softplus"])
def test_branch_classifier_matches_manual_forward(activation):
    """logits = W [f(x); g(sigma)] + b with f, g MLPs (activation between layers, none after the last)."""
    torch.manual_seed(3)
    act = {"relu": torch.relu, "silu": _silu, "softplus": lambda t: torch.log1p(torch.exp(t))}[activation]
    clf = BranchClassifier(2, 3, x_widths=(5, 4), sigma_widths=(3, 2), activation=activation)
    p = clf.state_dict()
    x, sigma = torch.randn(6, 2), torch.tensor([0.01, 0.1, 1.0, 5.0, 20.0, 60.0])

    def branch(prefix, h, n_layers):
        for j in range(n_layers):  # Sequential indices: Linear at 0, 2, 4, ...
            h = _lin(p, f"{prefix}.{2 * j}", h)
            if j < n_layers - 1:
                h = act(h)
        return h

    h = torch.cat([branch("x_branch", x.double(), 2), branch("sigma_branch", sigma.double()[:, None], 2)], dim=1)
    torch.testing.assert_close(clf(x, sigma).double(), _lin(p, "head", h), rtol=1e-5, atol=1e-6)


def test_classifier_mlp_matches_manual_forward():
    torch.manual_seed(4)
    clf = ClassifierMLP(2, 3, hidden=8, depth=2, emb_dim=6, sigma_data=14.0)
    x, sigma = 10.0 * torch.randn(5, 2), torch.tensor([0.05, 0.5, 2.0, 7.5, 40.0])
    cin = 1.0 / torch.sqrt(sigma.double() ** 2 + 14.0**2)[:, None]
    ref = _manual_trunk(clf.state_dict(), "net.", cin * x.double(), sigma.double(), 2)
    torch.testing.assert_close(clf(x, sigma).double(), ref, rtol=1e-5, atol=1e-6)


def _n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(("dim", "hidden", "depth", "emb"), [(2, 128, 3, 64), (3, 16, 1, 7), (5, 8, 2, 10)])
def test_parameter_counts_are_the_hand_counted_ones(dim, hidden, depth, emb):
    half = emb // 2
    trunk_in = 2 * half * emb + emb  # embedding projection; the Fourier frequencies are a buffer
    layers = (dim * hidden + hidden) + (depth - 1) * (hidden * hidden + hidden)
    cond = depth * (emb * hidden + hidden)
    assert _n_params(ScoreMLP(dim, hidden=hidden, depth=depth, emb_dim=emb)) == (
        trunk_in + layers + cond + hidden * dim + dim)
    assert _n_params(ClassifierMLP(dim, 4, hidden=hidden, depth=depth, emb_dim=emb)) == (
        trunk_in + layers + cond + hidden * 4 + 4)
    # the DLSM toy code's branch classifier at its default widths, for D = 2 and 2 classes
    x_part = (2 * 256 + 256) + (256 * 128 + 128) + (128 * 64 + 64)
    s_part = (1 * 64 + 64) + (64 * 32 + 32) + (32 * 16 + 16)
    assert _n_params(BranchClassifier(2, 2)) == x_part + s_part + (64 + 16) * 2 + 2 == 44_818


def test_unknown_activation_is_a_config_error():
    with pytest.raises(ConfigError, match="activation must be one of"):
        BranchClassifier(2, 2, activation="tanhh")
