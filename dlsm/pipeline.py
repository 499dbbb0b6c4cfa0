"""The two-stage experiment: stage 1 (score model, DSM) -> stage 2 (a classifier per loss) ->
conditional sampling -> metrics -> figures, each stage a child MLflow run of one parent run.

Everything the pipeline uses is a gin binding of :func:`experiment`; the pipeline itself only
wires components together. Checkpoints live in ``<workdir>/<name>/<config hash>/`` so relaunching
the same command resumes where it stopped.
"""

from __future__ import annotations

import inspect
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gin
import numpy as np
import torch
from torch import nn

from dlsm import config as cfg
from dlsm.data import LabelledData
from dlsm.errors import ConfigError
from dlsm.losses import ce_loss, dsm_loss, total_loss
from dlsm.metrics import Evaluation, classifier_metrics, sample_metrics, score_error_metrics
from dlsm.oracle import OracleScores
from dlsm.plots import loss_curves, posterior_field_figure
from dlsm.samplers import annealed_langevin, prior_sample
from dlsm.schedules import NoiseSchedule, noise_schedule
from dlsm.scores import ModelScores
from dlsm.tracking import Tracker
from dlsm.training import load_ema_weights, train

__all__ = ["ExperimentSpec", "build_methods", "experiment", "run_experiment"]

STAGE1 = "stage1-score"


@dataclass
class ExperimentSpec:
    name: str
    seed: int
    dataset: Callable[[], LabelledData]
    score_model: Callable[..., nn.Module]
    classifier: Callable[..., nn.Module]
    score_loss: Callable
    classifier_losses: dict[str, Callable]
    alpha: float
    sampling_methods: dict[str, tuple[str, float]] | None
    sampler: Callable
    n_samples: int
    oracle: bool
    metrics: Sequence[Callable]
    figures: Sequence[Callable]
    stage1_run_id: str | None
    workdir: str


@gin.configurable
def experiment(
    *,
    name: str = "dlsm",
    seed: int = 0,
    dataset: Callable[[], LabelledData] = gin.REQUIRED,
    score_model: Callable[..., nn.Module] = gin.REQUIRED,
    classifier: Callable[..., nn.Module] = gin.REQUIRED,
    score_loss: Callable = dsm_loss,
    classifier_losses: dict[str, Callable] | None = None,
    alpha: float = 1.0,
    sampling_methods: dict[str, tuple[str, float]] | None = None,
    sampler: Callable = annealed_langevin,
    n_samples: int = 1000,
    oracle: bool = True,
    metrics: Sequence[Callable] = (score_error_metrics, classifier_metrics, sample_metrics),
    figures: Sequence[Callable] = (posterior_field_figure,),
    stage1_run_id: str | None = None,
    workdir: str = ".dlsm",
) -> ExperimentSpec:
    """Declare an experiment. ``classifier_losses`` maps a method name to its stage-2 loss
    (default ``{'ce': ce_loss, 'total': total_loss}``); ``alpha`` scales every likelihood score
    at sampling, unless ``sampling_methods`` names each sampled method as ``name: (loss name, alpha)``,
    e.g. ``{'base': ('ce', 1.0), 'scaling': ('ce', 4.0), 'ours': ('total', 1.0)}``;
    ``stage1_run_id`` reuses a finished stage-1 MLflow run instead of training one;
    ``oracle`` adds the Parzen oracle as a method and enables oracle metrics (small data only)."""
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"experiment.n_samples must be a positive integer, got {n_samples!r}")
    losses = classifier_losses if classifier_losses is not None else {"ce": ce_loss, "total": total_loss}
    if not losses:
        raise ConfigError("experiment.classifier_losses is empty; name at least one stage-2 loss")
    if sampling_methods is not None:
        check_sampling_methods(sampling_methods, losses)
    return ExperimentSpec(
        name, seed, dataset, score_model, classifier, score_loss, dict(losses), alpha, sampling_methods, sampler,
        n_samples, oracle, tuple(metrics), tuple(figures), stage1_run_id, workdir,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_methods(
    score_model: nn.Module,
    classifiers: dict[str, nn.Module],
    sampling_methods: dict[str, tuple[str, float]] | None,
    alpha: float,
) -> dict[str, ModelScores]:
    """The sampled methods: ``name -> ModelScores(score_model, classifiers[loss name], alpha)``.

    Without ``sampling_methods`` every classifier is sampled under its loss's name at ``alpha``.
    """
    if sampling_methods is None:
        return {m: ModelScores(score_model, c, alpha=alpha) for m, c in classifiers.items()}
    check_sampling_methods(sampling_methods, classifiers)
    return {
        name: ModelScores(score_model, classifiers[loss], alpha=float(a))
        for name, (loss, a) in sampling_methods.items()
    }


def check_sampling_methods(sampling_methods: dict, loss_names) -> None:
    """Each entry must be ``name: (loss name from experiment.classifier_losses, alpha)``."""
    for name, spec in sampling_methods.items():
        ok = isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] in loss_names
        if not ok or isinstance(spec[1], bool) or not isinstance(spec[1], (int, float)):
            raise ConfigError(
                f"experiment.sampling_methods[{name!r}] = {spec!r}: expected (loss name, alpha) "
                f"with a loss name from experiment.classifier_losses {sorted(loss_names)}"
            )


def _sample(spec: ExperimentSpec, scores, schedule: NoiseSchedule, data: LabelledData, c: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x0 = prior_sample((spec.n_samples, *data.x.shape[1:]), schedule.sigma_max, generator=gen)
    kwargs = {}
    params = inspect.signature(inspect.unwrap(spec.sampler)).parameters
    if "eps" in params:  # annealed Langevin takes its step settings from the noise schedule
        kwargs = {"eps": schedule.eps, "n_steps_each": schedule.n_steps_each}
    return spec.sampler(scores.posterior_fn(c), x0, schedule.sigmas, generator=gen, **kwargs)


def _train_stage(
    spec: ExperimentSpec,
    tracker: Tracker,
    parent_id: str,
    stage: str,
    scope: str,
    ckpt: Path,
    *,
    build: Callable[[], nn.Module],
    loss_fn: Callable,
    data: LabelledData,
    schedule: NoiseSchedule,
    params: dict,
    seed_offset: int,
    timings: dict[str, float],
    train_seed_offset: int = 11,
    stage_label: str = "score",
) -> tuple[nn.Module, list[tuple[int, float]]]:
    """Train one network in its gin ``scope`` inside the child run ``stage``; returns (EMA network, losses).

    Every network of a stage starts from the same seed (``seed_offset``), so methods compare fairly.
    A stage FINISHED in MLflow whose local checkpoint is gone fetches it from its run's artifacts.
    """
    with tracker.stage(parent_id, stage) as (run_id, done):
        t0 = time.perf_counter()
        tracker.log_params(params)
        seed_everything(spec.seed + seed_offset)
        with gin.config_scope(scope):
            model = build()
            if done and not ckpt.exists():
                fetched = tracker.download_checkpoint(run_id, stage, ckpt.name, key=stage, require_finished=False)
                shutil.copy(fetched, ckpt)
            res = train(
                model, loss_fn, data, schedule, ckpt_path=ckpt, seed=spec.seed + train_seed_offset,
                stage=stage_label, log_fn=tracker.log_metrics,
            )
        if not done:
            tracker.log_artifact(ckpt, "checkpoints")
            if res.losses:
                tracker.log_figure(loss_curves({stage_label: res.losses}, stage), "plots/loss.png")
        timings[f"time/{stage}_s"] = time.perf_counter() - t0
        tracker.log_metrics({"wall_seconds": timings[f"time/{stage}_s"]})
    return res.ema, res.losses


def run_experiment(spec: ExperimentSpec, *, fresh: bool = False) -> dict[str, float]:
    """Run (or resume) the whole experiment; returns the final metrics."""
    chash = cfg.config_hash()
    rundir = Path(spec.workdir) / spec.name / chash
    tracker = Tracker(spec.name)
    resume_id = None if fresh else tracker.unfinished_parent(chash)
    if fresh and rundir.exists():
        shutil.rmtree(rundir)
    rundir.mkdir(parents=True, exist_ok=True)
    params = cfg.bindings_as_params()
    seed_everything(spec.seed)

    with tracker.parent(spec.name, chash, resume_id) as parent_id:
        if resume_id:
            print(f"dlsm: resuming run {parent_id} from {rundir}")
        tracker.log_params(params)
        tracker.log_text(gin.config_str(), "config/config.gin")
        data = spec.dataset()
        schedule = noise_schedule(data.x)
        tracker.log_params(schedule.as_params())

        # -- stage 1: score model s(x~; phi) with DSM ----------------------------------------
        timings: dict[str, float] = {}
        if spec.stage1_run_id:
            with tracker.stage(parent_id, STAGE1):
                tracker.log_params({**params, "reused_stage1_run_id": spec.stage1_run_id})
                seed_everything(spec.seed + 1)
                with gin.config_scope("score"):
                    model = spec.score_model(dim=data.dim)
                score_ema = load_ema_weights(
                    model, tracker.download_checkpoint(spec.stage1_run_id, STAGE1, key="experiment.stage1_run_id")
                )
        else:
            score_ema, _ = _train_stage(
                spec, tracker, parent_id, STAGE1, "score", rundir / "score.pt",
                build=lambda: spec.score_model(dim=data.dim),
                loss_fn=lambda m, x, y, s, n: spec.score_loss(m, x, s, n),
                data=data, schedule=schedule, params=params, seed_offset=1, timings=timings,
            )
        score_ema.requires_grad_(False)

        # -- stage 2: one classifier p(y|x~; theta) per loss, score model frozen -------------
        classifiers: dict[str, nn.Module] = {}
        curves: dict[str, list] = {}
        for k, (method, loss) in enumerate(spec.classifier_losses.items()):
            classifiers[method], curves[method] = _train_stage(
                spec, tracker, parent_id, f"stage2-{method}", "classifier", rundir / f"classifier-{method}.pt",
                build=lambda: spec.classifier(dim=data.dim, num_classes=data.num_classes),
                loss_fn=lambda m, x, y, s, n, loss=loss: loss(m, score_ema, x, y, s, n),
                data=data, schedule=schedule, params={**params, "method": method},
                seed_offset=2, train_seed_offset=21 + k, stage_label=method, timings=timings,
            )

        # -- sampling and evaluation ------------------------------------------------------------
        with tracker.stage(parent_id, "sampling"):
            t0 = time.perf_counter()
            tracker.log_params({**params, "alpha": spec.alpha})
            methods: dict = build_methods(score_ema, classifiers, spec.sampling_methods, spec.alpha)
            oracle = OracleScores(data.x, data.y) if spec.oracle else None
            if oracle is not None:
                methods["oracle"] = oracle
            ev = Evaluation(data, schedule, methods, classifiers, oracle=oracle, seed=spec.seed + 31)
            for j, (m, scores) in enumerate(methods.items()):
                ev.samples[m] = {
                    c: _sample(spec, scores, schedule, data, c, spec.seed + 41 + 100 * j + c)
                    for c in range(data.num_classes)
                }
                path = rundir / f"samples-{m}.npz"
                np.savez_compressed(path, **{f"c{c}": x.numpy() for c, x in ev.samples[m].items()})
                tracker.log_artifact(path, "samples")
            results: dict[str, float] = {}
            for suite in spec.metrics:
                results.update(suite(ev))
            tracker.log_metrics(results)
            for fig_fn in spec.figures:
                tracker.log_figure(fig_fn(ev), f"plots/{getattr(fig_fn, '__name__', 'figure')}.png")
            if any(curves.values()):
                tracker.log_figure(loss_curves(curves, "stage 2: classifier losses"), "plots/stage2_losses.png")
            timings["time/sampling_s"] = time.perf_counter() - t0
            tracker.log_metrics({"wall_seconds": timings["time/sampling_s"]})

        tracker.log_metrics({**results, **timings})
        tracker.log_text(gin.operative_config_str(), "config/operative_config.gin")
    return {**results, **timings}
