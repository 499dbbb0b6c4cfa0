"""What every stage takes: the experiment's declaration (:class:`ExperimentSpec`), what one launch shares
(:class:`Run`: MLflow, the checkpoint folder, the device) and what stages hand on (:class:`State`), plus the
helpers that build networks and sampled methods from them.

A stage is ``stage(run: Run, state: State) -> State``. This module imports no stage, so the stages and
:mod:`dlsm.experiment` (which lists the default stages) both import it without a circle.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dlsm import config as cfg
from dlsm.errors import ConfigError
from dlsm.math.guidance import Guidance, TemperatureGuidance, as_guidance
from dlsm.math.schedules import NoiseSchedule
from dlsm.math.scores import ModelScores
from dlsm.tracking import NullTracker, Tracker

__all__ = [
    "ExperimentSpec", "Run", "State", "build_methods", "build_network", "check_sampling_methods", "method_key",
    "sampling_alphas_error", "seed_everything",
]


@dataclass
class ExperimentSpec:
    """What :func:`experiment` declares: the components, shared by every stage."""

    name: str
    seed: int
    dataset: Callable
    score_model: Callable[..., nn.Module]
    classifiers: dict[str, Callable[..., nn.Module]]  # shape name ('' when one) -> network factory
    score_loss: Callable
    classifier_losses: dict[str, Callable]
    alpha: float
    sampling_methods: dict[str, tuple[str, float | Guidance]] | None
    sampler: Callable
    stages: tuple[Callable, ...]
    workdir: str = ".dlsm"
    stage1_run_id: str | None = None
    stage2_run_id: str | None = None
    stop_after: str | None = None


@dataclass
class State:
    """What stages hand on: each stage reads what earlier ones left and adds its own part."""

    data: object  # LabelledData or ImageData (dlsm.data.points / dlsm.data.images)
    schedule: NoiseSchedule
    score_model: nn.Module | None = None
    classifiers: dict[str, dict[str, nn.Module]] = field(default_factory=dict)  # shape -> loss -> EMA net
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # "{loss}-{shape}" -> losses
    extra_methods: dict[str, object] = field(default_factory=dict)  # e.g. posterior SM, the Parzen oracle
    oracle: object | None = None
    samples: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # method -> class -> samples
    metrics: dict[str, float] = field(default_factory=dict)
    feature_nets: list | None = None  # images: dlsm.eval.images feature networks, built once when first needed
    test_data: object | None = None  # images: the test split, loaded once when first needed (evaluation)
    stream: object | None = None  # images: features of the samples, computed while sampling (FeatureStream)
    temperatures: dict[str, tuple] = field(default_factory=dict)  # "{loss}[-{shape}]" -> ((sigma, tau), ...)

    def methods(self, spec: ExperimentSpec) -> dict[str, object]:
        """The sampled methods in a fixed order: every classifier shape's (base, scaling, ours, ...), then
        the extra methods in the order the stages added them."""
        out: dict[str, object] = {}
        for shape, per_loss in self.classifiers.items():
            out.update(build_methods(self.score_model, per_loss, spec.sampling_methods, spec.alpha, shape=shape,
                                     temperatures=self.temperatures))
        return {**out, **self.extra_methods}


@dataclass
class Run:
    """What every stage of one launch shares: the spec, MLflow, the checkpoint folder and the device."""

    spec: ExperimentSpec
    tracker: Tracker | NullTracker  # a NullTracker on ranks other than 0 (torchrun)
    parent_id: str
    rundir: Path
    params: dict[str, str]
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)

    def seed(self, offset: int) -> int:
        return self.spec.seed + offset


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_network(factory: Callable[..., nn.Module], data, **kwargs) -> nn.Module:
    """``factory(shape=data.shape, ...)`` for image networks, ``factory(dim=data.dim, ...)`` for vector ones."""
    params = inspect.signature(inspect.unwrap(factory)).parameters
    return factory(shape=tuple(data.shape), **kwargs) if "shape" in params else factory(dim=data.dim, **kwargs)


def build_methods(
    score_model: nn.Module,
    classifiers: dict[str, nn.Module],
    sampling_methods: dict[str, tuple[str, float | Guidance]] | None,
    alpha: float,
    *,
    shape: str = "",
    temperatures: dict[str, tuple] | None = None,
) -> dict[str, ModelScores]:
    """The sampled methods: ``name -> ModelScores(score_model, classifiers[loss name], guidance)``.

    Without ``sampling_methods`` every classifier is sampled under its loss's name at ``alpha``. An entry's
    second item is a number alpha (constant guidance) or a guidance (:mod:`dlsm.math.guidance`); a
    :class:`~dlsm.math.guidance.TemperatureGuidance` gets its classifier's fitted temperatures from
    ``temperatures`` (``calibrate_temperature``). A non-empty ``shape`` is appended to every name (``base-mlp``).
    """
    if sampling_methods is None:
        return {method_key(m, shape): ModelScores(score_model, c, alpha=alpha) for m, c in classifiers.items()}
    check_sampling_methods(sampling_methods, classifiers)
    out = {}
    for name, (loss, a) in sampling_methods.items():
        guidance = as_guidance(a, f"experiment.sampling_methods[{name!r}]")
        fitted = (temperatures or {}).get(method_key(loss, shape))
        if isinstance(guidance, TemperatureGuidance) and fitted:
            guidance = guidance.with_taus(fitted)
        out[method_key(name, shape)] = ModelScores(score_model, classifiers[loss], guidance=guidance)
    return out


def method_key(name: str, shape: str) -> str:
    """A method's or classifier's name for one classifier shape: ``base-mlp`` (``base`` if unnamed)."""
    return f"{name}-{shape}" if shape else name


def check_sampling_methods(sampling_methods: dict, loss_names) -> None:
    """Each entry must be ``name: (loss name from experiment.classifier_losses, alpha or guidance)``."""
    for name, spec in sampling_methods.items():
        ok = isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] in loss_names
        if not ok or isinstance(spec[1], bool) or not isinstance(spec[1], (int, float, Guidance)):
            raise ConfigError(
                f"experiment.sampling_methods[{name!r}] = {spec!r}: expected (loss name, alpha or guidance) "
                f"with a loss name from experiment.classifier_losses {sorted(loss_names)}"
            )
        wrong = sampling_alphas_error({name: spec})
        if wrong:
            raise ConfigError(f"experiment.sampling_methods[{name!r}] = {spec!r}: {wrong}")


def sampling_alphas_error(sampling_methods: object) -> str | None:
    """What is wrong with the alphas of ``experiment.sampling_methods`` (each must be >= 0), or None."""
    for name, spec in sampling_methods.items() if isinstance(sampling_methods, dict) else ():
        if isinstance(spec, (tuple, list)) and len(spec) == 2 and cfg.finite_nonnegative(spec[1]):
            return f"the alpha of {name!r} {cfg.finite_nonnegative(spec[1])}"
    return None
