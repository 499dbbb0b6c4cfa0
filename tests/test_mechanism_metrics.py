"""The mechanism metrics of the digits reproduction: held-out DLSM' / CE / accuracy per sigma against a float64
closed form (a Gaussian prior score and a linear softmax classifier), the score-error metrics limited to chosen
methods, and the Parzen oracle as a reference only (not sampled)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dlsm.data.points import LabelledData
from dlsm.errors import ConfigError
from dlsm.eval.points import Evaluation, heldout_metrics, score_error_metrics
from dlsm.math.oracle import OracleScores
from dlsm.math.scores import ModelScores


class GaussianPrior(nn.Module):
    """s(x, sigma) = -x / (1 + sigma^2): the exact score of N(0, I) convolved with N(0, sigma^2 I)."""

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return -x / (1 + s**2)


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:  # noqa: ARG002
        return x.reshape(x.shape[0], -1) @ self.w.T + self.b


class Split:
    """A test split with ImageData's two methods the metric uses."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx):
        return self.x[idx], self.y[idx]


def _reference(x, y, z, w, b, sigma):
    """float64 numpy: 1/2 ||grad log p(y|x~) + s(x~) + z / sigma||^2, CE and accuracy at x~ = x + sigma z."""
    x, z, w, b = (np.asarray(a, dtype=np.float64).reshape(len(y), -1) if a.ndim > 1 and a.shape[0] == len(y)
                  else np.asarray(a, dtype=np.float64) for a in (x, z, w, b))
    xt = x + sigma * z
    logits = xt @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = w[y] - p @ w  # grad_x log softmax_y
    dlsm = 0.5 * ((grad - xt / (1 + sigma**2) + z / sigma) ** 2).sum(1)
    ce = -np.log(p[np.arange(len(y)), y])
    conf, right = p.max(1), (p.argmax(1) == y)
    bins = np.minimum((conf * 15).astype(int) - (conf * 15 == np.floor(conf * 15)), 14)  # bins (b/15, (b+1)/15]
    ece = sum(abs(right[bins == j].mean() - conf[bins == j].mean()) * (bins == j).mean() for j in range(15)
              if (bins == j).any())
    return dlsm.mean(), ce.mean(), (logits.argmax(1) == y).mean(), ece


@pytest.mark.parametrize("seed", [0, 5])
def test_heldout_dlsm_ce_accuracy_and_ece_equal_the_float64_closed_form(seed):
    g = torch.Generator().manual_seed(seed)
    n, d, k = 40, 6, 3
    test = Split(torch.randn(n, 1, 2, 3, generator=g), torch.randint(0, k, (n,), generator=g))
    w, b = torch.randn(k, d, generator=g), torch.randn(k, generator=g)
    clf = Linear(w.clone(), b.clone())
    train = LabelledData(torch.zeros(2, 1, 2, 3), torch.zeros(2, dtype=torch.long), k, "t")
    ev = Evaluation(train, None, {"m": ModelScores(GaussianPrior(), clf)}, {"c": clf}, seed=seed,  # type: ignore[arg-type]
                    test_data=lambda: test)
    sigmas = (0.1, 1.0)
    out = heldout_metrics(ev, sigmas=sigmas, n_points=25)
    # the same draws as the metric: idx then z from generator seed + 303, per sigma in order
    gen = torch.Generator().manual_seed(seed + 303)
    for sigma in sigmas:
        idx = torch.randint(0, n, (25,), generator=gen)
        z = torch.randn(25, 1, 2, 3, generator=gen)
        dlsm, ce, acc, ece = _reference(test.x[idx].numpy(), test.y[idx].numpy(), z.numpy(), w.numpy(), b.numpy(),
                                        sigma)
        assert out[f"c/heldout/dlsm/s{sigma:g}"] == pytest.approx(dlsm, rel=1e-5)
        assert out[f"c/heldout/ce/s{sigma:g}"] == pytest.approx(ce, rel=1e-5)
        assert out[f"c/heldout/acc/s{sigma:g}"] == pytest.approx(acc, abs=1e-12)
        assert out[f"c/heldout/ece/s{sigma:g}"] == pytest.approx(ece, abs=1e-5)  # 15 equal-width bins, by hand


def test_heldout_metrics_need_a_test_split():
    train = LabelledData(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), 2, "t")
    ev = Evaluation(train, None, {}, {"c": Linear(torch.zeros(2, 2), torch.zeros(2))})  # type: ignore[arg-type]
    assert heldout_metrics(ev) == {}


def _toy_ev():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 2, generator=g)
    y = (x[:, 0] > 0).long()
    data = LabelledData(x, y, 2, "toy")
    oracle = OracleScores(x.double(), y)
    clf = Linear(torch.randn(2, 2, generator=g), torch.zeros(2))
    methods = {"a": ModelScores(GaussianPrior(), clf), "b": ModelScores(GaussianPrior(), clf, alpha=3.0),
               "oracle": oracle}
    return Evaluation(data, None, methods, oracle=oracle, seed=2)  # type: ignore[arg-type]


def test_score_errors_limited_to_the_chosen_methods():
    ev = _toy_ev()
    every = score_error_metrics(ev, sigmas=(0.5,), n_points=16, grid_size=None)
    only = score_error_metrics(ev, sigmas=(0.5,), n_points=16, grid_size=None, methods=["a"])
    assert {k.split("/")[0] for k in every} == {"a", "b"} and {k.split("/")[0] for k in only} == {"a"}
    assert all(only[k] == every[k] for k in only)  # the same points either way
    # alpha scales the likelihood term: alpha* of b is a third of a's
    assert every["b/c0/alpha_star/s0.5"] == pytest.approx(every["a/c0/alpha_star/s0.5"] / 3)
    with pytest.raises(ConfigError, match="'c' is not a method"):
        score_error_metrics(ev, sigmas=(0.5,), n_points=4, grid_size=None, methods=["c"])
