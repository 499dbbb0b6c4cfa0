"""Networks: shapes, Technique 3 scaling, and the classifier shapes' sigma dependence."""

from __future__ import annotations

import pytest
import torch

from dlsm.errors import ConfigError
from dlsm.networks import BranchClassifier, ClassifierMLP, ScoreMLP


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
def test_classifiers_give_logits_per_class(cls):
    clf = cls(2, 3)
    assert clf(torch.randn(5, 2), torch.full((5,), 2.0)).shape == (5, 3)
    assert clf(torch.randn(5, 2), 2.0).shape == (5, 3)


def test_unknown_activation_is_a_config_error():
    with pytest.raises(ConfigError, match="activation must be one of"):
        BranchClassifier(2, 2, activation="tanhh")
