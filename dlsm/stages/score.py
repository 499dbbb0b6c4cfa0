"""Stage 1: the score model s(x~; phi), trained by denoising score matching (DSM); and the paper's
method (c), posterior SM: one DSM score model per class (a moons-only stage)."""

from __future__ import annotations

import functools

import gin

from dlsm.math.scores import PosteriorSMScores
from dlsm.stages.base import Run, State, build_network
from dlsm.stages.common import STAGE1, fit, load_published, reuse
from dlsm.train.official import import_score_checkpoint

__all__ = ["posterior_sm", "train_score_model"]


def _dsm(run: Run):
    return lambda m, x, y, s, n: run.spec.score_loss(m, x, s, n)


@gin.configurable(denylist=["run", "state"])
def train_score_model(run: Run, state: State, *, snapshot=None, checkpoint: str | None = None) -> State:
    """Stage 1 (child run ``stage1-score``): train the score model with ``experiment.score_loss``
    (DSM, NCSNv2 eq. 2) in the ``score/`` gin scope, or load it from ``experiment.stage1_run_id``, or from
    ``checkpoint``, an official score_sde / DLSM score checkpoint file (its EMA weights, as the official sampling
    uses: :func:`dlsm.train.official.import_score_checkpoint`; checked before anything runs by
    :func:`dlsm.preflight.check_published`); it is frozen afterwards. ``snapshot(run, state)`` builds a function
    ``(ema_model, step)`` called every ``score/train.snapshot_every`` steps (e.g.
    :func:`dlsm.stages.sample.sample_grid_snapshot`)."""
    spec, data = run.spec, state.data
    build = lambda: build_network(spec.score_model, data)  # noqa: E731
    if checkpoint:
        importer = functools.partial(import_score_checkpoint, use_ema=True)
        model, _ = load_published(run, STAGE1, "score", build, importer, checkpoint)
    elif spec.stage1_run_id:
        model, _, _ = reuse(run, STAGE1, build)
    else:
        model, _, _ = fit(run, STAGE1, "score", run.rundir / "score.pt", build=build, loss_fn=_dsm(run), data=data,
                          schedule=state.schedule, params=run.params, seed_offset=1,
                          snapshot_fn=snapshot(run, state) if snapshot is not None else None)
    state.score_model = model.requires_grad_(False)
    return state


@gin.configurable(denylist=["run", "state"])
def posterior_sm(run: Run, state: State) -> State:
    """Method (c) of the DLSM paper: one DSM score model per class, s(x; phi_c) ~ grad log p(x|y=c),
    trained under the ``score/posterior_sm`` gin scope (inheriting ``score/`` bindings), child runs
    ``posterior_sm-c{c}``; sampled as the method ``posterior_sm``."""
    data, models = state.data, []
    for c in range(data.num_classes):
        model_c, _, _ = fit(
            run, f"posterior_sm-c{c}", "score/posterior_sm", run.rundir / f"score-c{c}.pt",
            build=lambda: build_network(run.spec.score_model, data), loss_fn=_dsm(run),
            data=data.subset(data.y == c), schedule=state.schedule, params={**run.params, "class": c},
            seed_offset=3 + c, train_seed_offset=51 + c, stage_label=f"posterior_sm-c{c}",
        )
        models.append(model_c.requires_grad_(False))
    state.extra_methods["posterior_sm"] = PosteriorSMScores(state.score_model, models)
    return state
