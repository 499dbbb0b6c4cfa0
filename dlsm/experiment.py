"""An experiment is a gin-bound list of stages run in order, each a plain function ``stage(run, state)``.

    score model (DSM) -> classifiers (one per loss, score model frozen) -> sampling -> evaluation -> figures

``experiment.stages`` lists them (the default above: :mod:`dlsm.stages`); moons-only work (the Parzen
oracle, method (c) posterior SM) is more stages that the moons gin files add to the list. A stage reads
and extends a small explicit :class:`~dlsm.stages.base.State` (data, noise schedule, networks, methods, samples,
metrics) and opens its own child MLflow run through :class:`~dlsm.stages.base.Run` (tracker, parent run, checkpoint
folder, device). Checkpoints live in ``<workdir>/<name>/<config hash>/`` so relaunching the same
command resumes where it stopped; finished stages are skipped.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gin
from torch import nn

from dlsm import config as cfg
from dlsm import stages as st
from dlsm.errors import ConfigError
from dlsm.locks import exclusive
from dlsm.math.losses import ce_loss, dsm_loss, total_loss
from dlsm.math.samplers import annealed_langevin
from dlsm.math.schedules import noise_schedule
from dlsm.preflight import check_before_training, check_guidance, check_networks, check_workdir
from dlsm.stages.base import (
    ExperimentSpec,
    Run,
    State,
    check_sampling_methods,
    sampling_alphas_error,
    seed_everything,
)
from dlsm.tracking import rank_tracker
from dlsm.train import distributed as dist
from dlsm.train.device import device as device_binding

__all__ = ["ExperimentResult", "check_networks", "check_workdir", "experiment", "run_experiment"]


@dataclass
class ExperimentResult:
    run_id: str  # the MLflow parent run
    metrics: dict[str, float]


@gin.configurable
def experiment(
    *,
    name: str = "dlsm",
    seed: int = 0,
    dataset: Callable = gin.REQUIRED,
    score_model: Callable[..., nn.Module] = gin.REQUIRED,
    classifier: Callable[..., nn.Module] | dict[str, Callable[..., nn.Module]] = gin.REQUIRED,
    score_loss: Callable = dsm_loss,
    classifier_losses: dict[str, Callable] | None = None,
    alpha: float = 1.0,
    sampling_methods: dict[str, tuple[str, float]] | None = None,
    sampler: Callable = annealed_langevin,
    stages: Sequence[Callable] | None = None,
    workdir: str = ".dlsm",
    stage1_run_id: str | None = None,
    stage2_run_id: str | None = None,
    stop_after: str | None = None,
) -> ExperimentSpec:
    """Declare an experiment. ``classifier_losses`` maps a method name to its stage-2 loss
    (default ``{'ce': ce_loss, 'total': total_loss}``); ``alpha`` scales every likelihood score
    at sampling, unless ``sampling_methods`` names each sampled method as ``name: (loss name, alpha)``,
    e.g. ``{'base': ('ce', 1.0), 'scaling': ('ce', 10.0), 'ours': ('total', 1.0)}``.

    ``classifier`` may be one network or a dict of named shapes ``{'mlp': @ClassifierMLP, ...}``; every
    shape gets every stage-2 loss and sampled method, named ``{method}-{shape}``, on one shared stage 1.
    ``stages`` is the list of stage functions (default: score model, classifiers, sampling, evaluation,
    figures). ``stage1_run_id`` / ``stage2_run_id`` reuse the score model / classifiers of a finished
    run; ``stop_after = 'stage1'`` or ``'stage2'`` ends the run after that stage (a shared run for sweeps)."""
    if stop_after not in (None, "stage1", "stage2"):
        raise ConfigError(f"experiment.stop_after must be None, 'stage1' or 'stage2', got {stop_after!r}")
    shapes = dict(classifier) if isinstance(classifier, dict) else {"": classifier}
    if not shapes or any(not isinstance(k, str) or not k.isidentifier() and k for k in shapes):
        raise ConfigError(f"experiment.classifier: expected a network or a dict of named networks, got {classifier!r}")
    losses = classifier_losses if classifier_losses is not None else {"ce": ce_loss, "total": total_loss}
    if not losses:
        raise ConfigError("experiment.classifier_losses is empty; name at least one stage-2 loss")
    if cfg.finite_nonnegative(alpha):
        raise ConfigError(f"experiment.alpha = {alpha!r}: {cfg.finite_nonnegative(alpha)}")
    if sampling_methods is not None:
        check_sampling_methods(sampling_methods, losses)
    stages = tuple(stages) if stages is not None else st.DEFAULT_STAGES
    if not stages or not all(callable(s) for s in stages):
        raise ConfigError(f"experiment.stages: expected a list of stage functions, got {stages!r}")
    return ExperimentSpec(name, seed, dataset, score_model, shapes, score_loss, dict(losses), alpha, sampling_methods,
                          sampler, stages, workdir, stage1_run_id, stage2_run_id, stop_after)


cfg.constrain(experiment, "alpha", cfg.finite_nonnegative)  # checked at parse time, before anything trains
cfg.constrain(experiment, "sampling_methods", sampling_alphas_error)


def _stops_here(stage: Callable, stop_after: str | None) -> bool:
    last = {"stage1": st.train_score_model, "stage2": st.train_classifiers}.get(stop_after or "")
    return last is not None and inspect.unwrap(stage) is inspect.unwrap(last)


def _on_every_rank(stage: Callable) -> bool:
    """The training stages run on every rank (DDP, in lockstep), and so does sampling (each rank draws its share of
    the units) with the stages that add sampled methods; the other stages run on rank 0 alone."""
    return any(inspect.unwrap(stage) is inspect.unwrap(s) for s in (
        st.train_score_model, st.train_classifiers, st.posterior_sm, st.parzen_oracle, st.exact_likelihood, st.sample))


def run_experiment(
    spec: ExperimentSpec,
    *,
    fresh: bool = False,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    on_metrics: Callable[[str, dict[str, float], int], None] | None = None,
) -> ExperimentResult:
    """Run (or resume) the experiment's stages in order; returns its MLflow run id and final metrics.

    ``parent_run_id`` nests the run under another run (a sweep); ``on_metrics(stage, metrics, step)``
    sees every metric as it is logged (a sweep's trial reports stage-2 curves to its scheduler).

    Under torchrun (:mod:`dlsm.train.distributed`) every rank calls this: rank 0 alone tracks in MLflow (one parent
    run) and decides whether to resume, and its decisions and user errors reach every rank. The training stages
    (score model, classifiers, posterior SM) run on every rank with DistributedDataParallel; sampling runs on every
    rank, each drawing its share of the units, and rank 0 gathers them (:mod:`dlsm.stages.units`); evaluation,
    figures and any other stage run on rank 0 alone while the other ranks return (their metrics are only the
    timings)."""
    chash = cfg.config_hash()
    with contextlib.ExitStack() as held:  # rank 0 holds the folder's lock for the run; a refusal stops every rank
        dist.from_main(lambda: held.enter_context(rundir_lock(spec, chash)))
        return _run(spec, chash, fresh=fresh, parent_run_id=parent_run_id, run_name=run_name, on_metrics=on_metrics)


def rundir_lock(spec: ExperimentSpec, chash: str, *, wait: bool = False) -> contextlib.AbstractContextManager:
    """The exclusive lock on ``<workdir>/<name>/<config hash>/`` (:mod:`dlsm.locks`): a second launch of the same
    configuration into the same folder stops at once in one line naming the holder; ``wait`` waits instead."""
    check_workdir(spec.workdir)
    folder = Path(spec.workdir) / spec.name / chash
    return exclusive(
        f"{folder}.lock", what=f"the checkpoint folder {folder}", wait=wait,
        hint="wait for it to finish, or run a separate copy with --fresh and another experiment.workdir",
    )


def _run(
    spec: ExperimentSpec,
    chash: str,
    *,
    fresh: bool,
    parent_run_id: str | None,
    run_name: str | None,
    on_metrics: Callable[[str, dict[str, float], int], None] | None,
) -> ExperimentResult:
    """:func:`run_experiment`'s body, under the folder's lock."""
    rundir = Path(spec.workdir) / spec.name / chash
    tracker = rank_tracker(spec.name, on_metrics=on_metrics)

    def check_sources() -> None:
        for key, source in (("experiment.stage1_run_id", spec.stage1_run_id),
                            ("experiment.stage2_run_id", spec.stage2_run_id)):
            if source:  # a wrong run id fails now, not after training the stages before it
                tracker.check_source_run(source, key)

    dist.from_main(check_sources)
    dev = device_binding()
    seed_everything(spec.seed)
    data = dist.main_first(spec.dataset)  # a missing dataset fails here, before any MLflow run or checkpoint exists
    schedule = noise_schedule(data)  # reads data.x only for 'auto' sigma_max / num_scales
    check_before_training(spec, data)  # networks, evaluation settings: dlsm.preflight
    check_guidance(spec, data, schedule)
    if len(tuple(getattr(data, "shape", ()))) == 3:  # images: Inception weights, if bound, exist (or are downloaded)
        from dlsm.eval.images import preflight

        preflight()

    def find_run() -> str | None:
        resume_id = None if fresh else tracker.unfinished_parent(chash)
        if fresh and rundir.exists():
            shutil.rmtree(rundir)
        rundir.mkdir(parents=True, exist_ok=True)
        return resume_id

    resume_id = dist.from_main(find_run)
    params = cfg.bindings_as_params()

    with tracker.parent(run_name or spec.name, chash, resume_id, nest_under=parent_run_id) as parent_id:
        parent_id = dist.share(parent_id)  # rank 0's run id on every rank
        if resume_id and dist.is_main():
            print(f"dlsm: resuming run {parent_id} from {rundir}")
        tracker.log_params({**params, "device": str(dev)})
        tracker.log_text(gin.config_str(), "config/config.gin")
        tracker.log_params(schedule.as_params())
        run = Run(spec, tracker, parent_id, rundir, params, dev)
        state = State(data, schedule)
        for stage in spec.stages:
            if dist.is_main() or _on_every_rank(stage):
                state = stage(run, state)
            if _stops_here(stage, spec.stop_after):
                break
        final = {**state.metrics, **run.timings}
        tracker.log_metrics(final)
        tracker.log_text(gin.operative_config_str(), "config/operative_config.gin")
    return ExperimentResult(parent_id, final)
