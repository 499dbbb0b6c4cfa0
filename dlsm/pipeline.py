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
from dataclasses import dataclass, replace
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
from dlsm.plots import loss_curves, posterior_field_figure, training_curves_figure
from dlsm.samplers import annealed_langevin, prior_sample
from dlsm.schedules import NoiseSchedule, noise_schedule
from dlsm.scores import ModelScores, PosteriorSMScores
from dlsm.tracking import Tracker
from dlsm.training import load_ema_weights, train

__all__ = ["ExperimentResult", "ExperimentSpec", "build_methods", "experiment", "method_key", "run_experiment"]

STAGE1 = "stage1-score"


@dataclass
class ExperimentSpec:
    name: str
    seed: int
    dataset: Callable[[], LabelledData]
    score_model: Callable[..., nn.Module]
    classifiers: dict[str, Callable[..., nn.Module]]
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
    posterior_sm: bool = False
    stage2_seeds: int = 1
    tracker: Callable[[LabelledData], Callable[[nn.Module], dict[str, float]]] | None = None
    sample: bool = True
    stage2_run_id: str | None = None
    stop_after: str | None = None


@dataclass
class ExperimentResult:
    run_id: str  # the MLflow parent run
    metrics: dict[str, float]


@gin.configurable
def experiment(
    *,
    name: str = "dlsm",
    seed: int = 0,
    dataset: Callable[[], LabelledData] = gin.REQUIRED,
    score_model: Callable[..., nn.Module] = gin.REQUIRED,
    classifier: Callable[..., nn.Module] | dict[str, Callable[..., nn.Module]] = gin.REQUIRED,
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
    posterior_sm: bool = False,
    stage2_seeds: int = 1,
    tracker: Callable[[LabelledData], Callable[[nn.Module], dict[str, float]]] | None = None,
    sample: bool = True,
    stage2_run_id: str | None = None,
    stop_after: str | None = None,
) -> ExperimentSpec:
    """Declare an experiment. ``classifier_losses`` maps a method name to its stage-2 loss
    (default ``{'ce': ce_loss, 'total': total_loss}``); ``alpha`` scales every likelihood score
    at sampling, unless ``sampling_methods`` names each sampled method as ``name: (loss name, alpha)``,
    e.g. ``{'base': ('ce', 1.0), 'scaling': ('ce', 4.0), 'ours': ('total', 1.0)}``;
    ``stage1_run_id`` reuses a finished stage-1 MLflow run instead of training one;
    ``oracle`` adds the Parzen oracle as a method and enables oracle metrics (small data only).

    ``classifier`` may be one network or a dict of named shapes ``{'mlp': @ClassifierMLP, ...}``; every
    shape gets every stage-2 loss and sampled method, named ``{method}-{shape}``, on one shared stage 1.
    ``posterior_sm`` adds the paper's method (c): one DSM score model per class, trained under the
    ``score/posterior_sm`` gin scope (inheriting ``score/`` bindings). ``stage2_seeds`` trains each
    classifier that many times from different seeds (the first one is sampled and evaluated);
    ``tracker(data)`` builds a function of the classifier logged every ``classifier/train.eval_every``
    steps (training curves, e.g. ``@LikelihoodScoreTracker``); ``sample = False`` skips sampling.
    ``stage2_run_id`` reuses the classifiers of a finished run (sampling-only experiments, e.g. an
    alpha sweep); ``stop_after = 'stage1'`` or ``'stage2'`` ends the run after that stage (a shared
    run for sweeps)."""
    if stop_after not in (None, "stage1", "stage2"):
        raise ConfigError(f"experiment.stop_after must be None, 'stage1' or 'stage2', got {stop_after!r}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"experiment.n_samples must be a positive integer, got {n_samples!r}")
    if isinstance(stage2_seeds, bool) or not isinstance(stage2_seeds, int) or stage2_seeds < 1:
        raise ConfigError(f"experiment.stage2_seeds must be a positive integer, got {stage2_seeds!r}")
    shapes = dict(classifier) if isinstance(classifier, dict) else {"": classifier}
    if not shapes or any(not isinstance(k, str) or not k.isidentifier() and k for k in shapes):
        raise ConfigError(f"experiment.classifier: expected a network or a dict of named networks, got {classifier!r}")
    losses = classifier_losses if classifier_losses is not None else {"ce": ce_loss, "total": total_loss}
    if not losses:
        raise ConfigError("experiment.classifier_losses is empty; name at least one stage-2 loss")
    if sampling_methods is not None:
        check_sampling_methods(sampling_methods, losses)
    return ExperimentSpec(
        name, seed, dataset, score_model, shapes, score_loss, dict(losses), alpha, sampling_methods, sampler,
        n_samples, oracle, tuple(metrics), tuple(figures), stage1_run_id, workdir, posterior_sm, stage2_seeds,
        tracker, sample, stage2_run_id, stop_after,
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
    *,
    shape: str = "",
) -> dict[str, ModelScores]:
    """The sampled methods: ``name -> ModelScores(score_model, classifiers[loss name], alpha)``.

    Without ``sampling_methods`` every classifier is sampled under its loss's name at ``alpha``.
    A non-empty ``shape`` is appended to every name (``base-mlp``).
    """
    if sampling_methods is None:
        return {method_key(m, shape): ModelScores(score_model, c, alpha=alpha) for m, c in classifiers.items()}
    check_sampling_methods(sampling_methods, classifiers)
    return {
        method_key(name, shape): ModelScores(score_model, classifiers[loss], alpha=float(a))
        for name, (loss, a) in sampling_methods.items()
    }


def method_key(name: str, shape: str) -> str:
    """A method's or classifier's name for one classifier shape: ``base-mlp`` (``base`` if unnamed)."""
    return f"{name}-{shape}" if shape else name


def _shape_view(ev: Evaluation, shape: str, shapes: dict) -> Evaluation:
    """The evaluation as seen by one classifier shape: its methods (suffix dropped) plus the
    shape-free ones (posterior SM, oracle), for per-shape figures."""
    if len(shapes) == 1:
        return ev
    suffix = f"-{shape}"
    others = tuple(f"-{s}" for s in shapes)
    full_names = {}
    for name in ev.methods:
        if name.endswith(suffix):
            full_names[name.removesuffix(suffix)] = name
        elif not name.endswith(others):
            full_names[name] = name
    keep = {short: ev.methods[full] for short, full in full_names.items()}
    samples = {short: ev.samples[full] for short, full in full_names.items() if full in ev.samples}
    return replace(ev, methods=keep, samples=samples)


def _history(tracker: Tracker, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every ``track/...`` metric history of a run, as (step, value) lists."""
    keys = [k for k in tracker.client.get_run(run_id).data.metrics if k.startswith("track/")]
    return {k: sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, k)) for k in keys}


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
    eval_fn: Callable | None = None,
) -> tuple[nn.Module, list[tuple[int, float]], str]:
    """Train one network in its gin ``scope`` inside the child run ``stage``; returns
    (EMA network, losses, MLflow run id).

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
                stage=stage_label, log_fn=tracker.log_metrics, eval_fn=eval_fn,
            )
        if not done:
            tracker.log_artifact(ckpt, "checkpoints")
            if res.losses:
                tracker.log_figure(loss_curves({stage_label: res.losses}, stage), "plots/loss.png")
        timings[f"time/{stage}_s"] = time.perf_counter() - t0
        tracker.log_metrics({"wall_seconds": timings[f"time/{stage}_s"]})
    return res.ema, res.losses, run_id


def _reuse_stage(
    spec: ExperimentSpec, tracker: Tracker, parent_id: str, stage: str, build: Callable[[], nn.Module], params: dict
) -> tuple[nn.Module, list, str]:
    """Load the EMA network of ``stage`` from the finished run named by ``experiment.stage1_run_id``
    (stage 1) or ``experiment.stage2_run_id`` (stage-2 classifiers), recorded as a child run here."""
    key = "experiment.stage1_run_id" if stage == STAGE1 else "experiment.stage2_run_id"
    source = spec.stage1_run_id if stage == STAGE1 else spec.stage2_run_id
    name = "score.pt" if stage == STAGE1 else f"classifier-{stage.removeprefix('stage2-')}.pt"
    with tracker.stage(parent_id, stage) as (run_id, _):
        tracker.log_params({**params, f"reused_{key.split('.')[1]}": source})
        seed_everything(spec.seed + 1)
        with gin.config_scope("score" if stage == STAGE1 else "classifier"):
            model = build()
        ema = load_ema_weights(model, tracker.download_checkpoint(source, stage, name, key=key))
    return ema, [], run_id


def run_experiment(
    spec: ExperimentSpec,
    *,
    fresh: bool = False,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    on_metrics: Callable[[str, dict[str, float], int], None] | None = None,
) -> ExperimentResult:
    """Run (or resume) the whole experiment; returns its MLflow run id and final metrics.

    ``parent_run_id`` nests the run under another run (a sweep); ``on_metrics(stage, metrics, step)``
    sees every metric as it is logged (a sweep's trial reports stage-2 curves to its scheduler)."""
    chash = cfg.config_hash()
    rundir = Path(spec.workdir) / spec.name / chash
    tracker = Tracker(spec.name, on_metrics=on_metrics)
    resume_id = None if fresh else tracker.unfinished_parent(chash)
    if fresh and rundir.exists():
        shutil.rmtree(rundir)
    rundir.mkdir(parents=True, exist_ok=True)
    params = cfg.bindings_as_params()
    seed_everything(spec.seed)

    with tracker.parent(run_name or spec.name, chash, resume_id, nest_under=parent_run_id) as parent_id:
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
            score_ema, _, _ = _reuse_stage(spec, tracker, parent_id, STAGE1, lambda: spec.score_model(dim=data.dim),
                                           params)
        else:
            score_ema, _, _ = _train_stage(
                spec, tracker, parent_id, STAGE1, "score", rundir / "score.pt",
                build=lambda: spec.score_model(dim=data.dim),
                loss_fn=lambda m, x, y, s, n: spec.score_loss(m, x, s, n),
                data=data, schedule=schedule, params=params, seed_offset=1, timings=timings,
            )
        score_ema.requires_grad_(False)
        if spec.stop_after == "stage1":
            tracker.log_text(gin.operative_config_str(), "config/operative_config.gin")
            return ExperimentResult(parent_id, timings)

        # -- method (c): one score model per class ----------------------------------------------
        class_models: list[nn.Module] = []
        if spec.posterior_sm:
            for c in range(data.num_classes):
                keep = data.y == c
                class_data = LabelledData(data.x[keep], data.y[keep], data.num_classes, data.name, data.class_names)
                model_c, _, _ = _train_stage(
                    spec, tracker, parent_id, f"posterior_sm-c{c}", "score/posterior_sm",
                    rundir / f"score-c{c}.pt", build=lambda: spec.score_model(dim=data.dim),
                    loss_fn=lambda m, x, y, s, n: spec.score_loss(m, x, s, n),
                    data=class_data, schedule=schedule, params={**params, "class": c}, seed_offset=3 + c,
                    train_seed_offset=51 + c, stage_label=f"posterior_sm-c{c}", timings=timings,
                )
                class_models.append(model_c.requires_grad_(False))

        # -- stage 2: one classifier p(y|x~; theta) per shape, loss and seed, score model frozen -
        track_fn = spec.tracker(data) if spec.tracker is not None else None
        classifiers: dict[str, dict[str, nn.Module]] = {shape: {} for shape in spec.classifiers}
        curves: dict[str, list] = {}
        runs: dict[str, list[str]] = {}  # "{loss}-{shape}" -> stage-2 run ids, one per seed
        for shape, make_classifier in spec.classifiers.items():
            for k, (loss_name, loss) in enumerate(spec.classifier_losses.items()):
                key = method_key(loss_name, shape)
                for rep in range(spec.stage2_seeds):
                    stage = f"stage2-{key}" + (f"-seed{rep}" if spec.stage2_seeds > 1 else "")
                    offset = 1000 * rep
                    build = lambda make=make_classifier: make(dim=data.dim, num_classes=data.num_classes)  # noqa: E731
                    if spec.stage2_run_id:
                        model, losses, run_id = _reuse_stage(spec, tracker, parent_id, stage, build, params)
                    else:
                        model, losses, run_id = _train_stage(
                            spec, tracker, parent_id, stage, "classifier", rundir / f"classifier-{stage[7:]}.pt",
                            build=build, loss_fn=lambda m, x, y, s, n, loss=loss: loss(m, score_ema, x, y, s, n),
                            data=data, schedule=schedule,
                            params={**params, "method": loss_name, "shape": shape, "stage2_seed": rep},
                            seed_offset=2 + offset, train_seed_offset=21 + k + offset, stage_label=loss_name,
                            timings=timings, eval_fn=track_fn,
                        )
                    runs.setdefault(key, []).append(run_id)
                    if rep == 0:
                        classifiers[shape][loss_name], curves[key] = model, losses
        if spec.stop_after == "stage2":
            tracker.log_text(gin.operative_config_str(), "config/operative_config.gin")
            return ExperimentResult(parent_id, timings)
        if track_fn is not None and not spec.stage2_run_id:
            histories = {key: [_history(tracker, rid) for rid in ids] for key, ids in runs.items()}
            for shape in spec.classifiers:
                fig = training_curves_figure({
                    loss_name: histories[method_key(loss_name, shape)] for loss_name in spec.classifier_losses
                }, title=shape)
                tracker.log_figure(fig, f"plots/{method_key('training_curves', shape)}.png")

        # -- sampling and evaluation ------------------------------------------------------------
        with tracker.stage(parent_id, "sampling"):
            t0 = time.perf_counter()
            tracker.log_params({**params, "alpha": spec.alpha})
            methods: dict = {}
            for shape, per_loss in classifiers.items():
                methods.update(build_methods(score_ema, per_loss, spec.sampling_methods, spec.alpha, shape=shape))
            if class_models:
                methods["posterior_sm"] = PosteriorSMScores(score_ema, class_models)
            oracle = OracleScores(data.x, data.y) if spec.oracle else None
            if oracle is not None:
                methods["oracle"] = oracle
            flat = {method_key(n, shape): c for shape, per in classifiers.items() for n, c in per.items()}
            ev = Evaluation(data, schedule, methods, flat, oracle=oracle, seed=spec.seed + 31)
            for j, (m, scores) in enumerate(methods.items() if spec.sample else ()):
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
                fig_name = getattr(fig_fn, "__name__", "figure")
                for shape in spec.classifiers:
                    tracker.log_figure(fig_fn(_shape_view(ev, shape, spec.classifiers)),
                                       f"plots/{method_key(fig_name, shape)}.png")
            if any(curves.values()):
                tracker.log_figure(loss_curves(curves, "stage 2: classifier losses"), "plots/stage2_losses.png")
            timings["time/sampling_s"] = time.perf_counter() - t0
            tracker.log_metrics({"wall_seconds": timings["time/sampling_s"]})

        tracker.log_metrics({**results, **timings})
        tracker.log_text(gin.operative_config_str(), "config/operative_config.gin")
    return ExperimentResult(parent_id, {**results, **timings})
