"""Stage 2: one noise-conditional classifier p(y|x~; theta) per loss (and classifier shape and seed),
trained with the score model frozen: CE (base), DLSM', or Total = DLSM' + lambda CE (ours)."""

from __future__ import annotations

from collections.abc import Callable

import gin
from torch import nn

from dlsm import config as cfg
from dlsm.errors import ConfigError
from dlsm.report.plots import training_curves_figure
from dlsm.stages.base import Run, State, build_network, method_key
from dlsm.stages.common import fit, load_published, reuse
from dlsm.train import distributed as dist
from dlsm.train.official import import_classifier_checkpoint

__all__ = ["train_classifiers"]


@gin.configurable(denylist=["run", "state"])
def train_classifiers(
    run: Run, state: State, *, seeds: int = 1, tracker: Callable[..., Callable[[nn.Module], dict]] | None = None,
    checkpoints: dict[str, str | None] | None = None,
) -> State:
    """Stage 2 (child runs ``stage2-{loss}[-{shape}][-seed{k}]``): for every classifier shape of
    ``experiment.classifier`` and every loss of ``experiment.classifier_losses``, train a classifier in
    the ``classifier/`` gin scope with the frozen score model (or load it from
    ``experiment.stage2_run_id``). ``seeds`` trains each one that many times from different seeds
    (the first is sampled and evaluated); ``tracker(data)`` builds a function of the classifier logged
    every ``classifier/train.eval_every`` steps (training curves, e.g. ``@LikelihoodScoreTracker``),
    plotted per shape as ``plots/training_curves*.png`` in the parent run. ``checkpoints`` maps a classifier's name
    (its loss name, ``{loss}-{shape}`` with several shapes) to an official DLSM classifier file loaded instead of
    training it (:func:`dlsm.train.official.import_classifier_checkpoint`; e.g. ``{'ce': %BASE_CKPT, 'total':
    %OURS_CKPT}``), checked before anything runs by :func:`dlsm.preflight.check_published`."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"train_classifiers.seeds must be a positive integer, got {seeds!r}")
    spec, data, score = run.spec, state.data, state.score_model
    track_fn = tracker(data) if tracker is not None else None
    runs: dict[str, list[str]] = {}  # "{loss}-{shape}" -> stage-2 run ids, one per seed
    for shape, make in spec.classifiers.items():
        state.classifiers.setdefault(shape, {})
        for k, (loss_name, loss) in enumerate(spec.classifier_losses.items()):
            key = method_key(loss_name, shape)
            for rep in range(seeds):
                stage = f"stage2-{key}" + (f"-seed{rep}" if seeds > 1 else "")
                offset = 1000 * rep
                build = lambda make=make: build_network(make, data, num_classes=data.num_classes)  # noqa: E731
                if (checkpoints or {}).get(key):
                    (model, run_id), losses = load_published(
                        run, stage, "classifier", build, import_classifier_checkpoint, checkpoints[key]), []
                elif spec.stage2_run_id:
                    model, losses, run_id = reuse(run, stage, build)
                else:
                    model, losses, run_id = fit(
                        run, stage, "classifier", run.rundir / f"classifier-{stage[7:]}.pt", build=build,
                        loss_fn=lambda m, x, y, s, n, loss=loss: loss(m, score, x, y, s, n), data=data,
                        schedule=state.schedule,
                        params={**run.params, "method": loss_name, "shape": shape, "stage2_seed": rep},
                        seed_offset=2 + offset, train_seed_offset=21 + k + offset, stage_label=loss_name,
                        eval_fn=track_fn,
                    )
                runs.setdefault(key, []).append(run_id)
                if rep == 0:
                    state.classifiers[shape][loss_name], state.curves[key] = model, losses
    trained = not spec.stage2_run_id and not checkpoints  # loaded classifiers have no training curves
    if track_fn is not None and trained and dist.is_main():  # MLflow's histories: rank 0 (torchrun)
        histories = {key: [run.tracker.metric_histories(rid, "track/") for rid in ids] for key, ids in runs.items()}
        lost = any(h is None for hs in histories.values() for h in hs)  # tracking lost: no figure, as no write
        for shape in () if lost else spec.classifiers:
            fig = training_curves_figure({
                loss_name: histories[method_key(loss_name, shape)] for loss_name in spec.classifier_losses
            }, title=shape)
            run.tracker.log_figure(fig, f"plots/{method_key('training_curves', shape)}.png")
    return state


cfg.constrain(train_classifiers, "seeds", cfg.positive_int)
