"""Pipeline wiring that needs no training: sampled methods and their guidance scales."""

from __future__ import annotations

import pytest
import torch

from dlsm.errors import ConfigError
from dlsm.nets.mlp import ClassifierMLP, ScoreMLP
from dlsm.stages.base import build_methods


@pytest.fixture
def nets():
    torch.manual_seed(0)
    return ScoreMLP(2), {"ce": ClassifierMLP(2, 2), "total": ClassifierMLP(2, 2)}


def test_default_methods_are_the_classifiers_at_alpha(nets):
    score, clfs = nets
    methods = build_methods(score, clfs, None, 2.5)
    assert set(methods) == {"ce", "total"}
    assert all(m.alpha == 2.5 for m in methods.values()) and methods["total"].classifier is clfs["total"]


def test_scaling_method_scales_the_likelihood_score_and_keeps_the_prior(nets):
    score, clfs = nets
    methods = build_methods(score, clfs, {"base": ("ce", 1.0), "scaling": ("ce", 3.0), "ours": ("total", 1.0)}, 1.0)
    x, sigma = 10 * torch.randn(32, 2), 2.0
    base, scaling = methods["base"], methods["scaling"]
    torch.testing.assert_close(scaling.likelihood(x, sigma, 1), 3.0 * base.likelihood(x, sigma, 1))
    torch.testing.assert_close(scaling.prior(x, sigma), base.prior(x, sigma))
    torch.testing.assert_close(
        scaling.posterior(x, sigma, 0), base.posterior(x, sigma, 0) + 2.0 * base.likelihood(x, sigma, 0)
    )
    assert methods["ours"].classifier is clfs["total"]


@pytest.mark.parametrize("bad", [{"b": ("dlsm", 1.0)}, {"b": ("ce",)}, {"b": "ce"}])
def test_unknown_or_malformed_sampling_method_is_one_line_config_error(nets, bad):
    score, clfs = nets
    with pytest.raises(ConfigError, match=r"experiment.sampling_methods\['b'\]") as err:
        build_methods(score, clfs, bad, 1.0)
    assert "\n" not in str(err.value)
