"""Evaluation and figures: metric suites ``suite(evaluation) -> {name: value}`` and figure functions
``figure(evaluation) -> matplotlib figure``, each stage a child run (``evaluation``, ``figures``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import gin

from dlsm.eval.points import Evaluation, classifier_metrics, sample_metrics
from dlsm.math.guidance import as_guidance
from dlsm.report.plots import loss_curves
from dlsm.stages.base import Run, State, method_key

__all__ = ["cache_dir", "classifier_loss_settings", "evaluate", "feature_nets", "figures", "log_artifacts",
           "log_points", "test_split"]


def cache_dir(run: Run) -> Path:
    """Where evaluators and real-data features are cached: ``{experiment.workdir}/cache`` (shared by experiments)."""
    return Path(run.spec.workdir) / "cache"


def test_split(run: Run, state: State) -> Callable[[], object]:
    """The experiment's dataset with ``split='test'`` (images), loaded when first asked for and kept in ``state``."""

    def load() -> object:
        if state.test_data is None:
            state.test_data = run.spec.dataset(split="test")
        return state.test_data

    return load


def feature_nets(run: Run, state: State) -> list:
    """The image feature networks (``image_features``), built once per launch and kept in ``state``."""
    if state.feature_nets is None:
        from dlsm.eval.images import image_features

        test = test_split(run, state)()
        state.feature_nets = image_features(state.data, test, device=run.device, cache_dir=cache_dir(run))
    return state.feature_nets


def _evaluation(run: Run, state: State) -> Evaluation:
    flat = {method_key(n, shape): c for shape, per in state.classifiers.items() for n, c in per.items()}
    return Evaluation(state.data, state.schedule, state.methods(run.spec), flat, samples=state.samples,
                      oracle=state.oracle, seed=run.seed(31), test_data=test_split(run, state), device=run.device,
                      cache_dir=cache_dir(run), stream=state.stream, feature_nets=lambda: feature_nets(run, state))


def log_artifacts(tracker, artifacts: dict[str, object], *, also_to: str | None = None) -> None:
    """Suites' tables (``.md``: also to run ``also_to``, the sampling run), JSON data and figures, in the active run."""
    for name, obj in artifacts.items():
        if name.endswith(".md"):
            tracker.log_text(obj, name)
            if also_to:
                tracker.log_text_to(also_to, obj, name)
        elif name.endswith(".json"):
            tracker.log_text(json.dumps(obj, indent=1, sort_keys=True), name)
        else:
            tracker.log_figure(obj, name)


def classifier_loss_settings() -> dict[str, dict[str, object]]:
    """Each stage-2 loss of ``experiment.classifier_losses`` as {name: {'loss': configurable, 'scope': gin scope,
    **its effective gin bindings}} (e.g. ``lam`` of ``@lam_large/total_loss`` = 8.0), read from the parsed config."""
    try:
        refs = gin.query_parameter("experiment.classifier_losses")
    except ValueError:  # not bound: the defaults, CE and Total
        refs = None
    if not isinstance(refs, dict):
        return {"ce": {"loss": "ce_loss", "scope": ""},
                "total": {"loss": "total_loss", "scope": "", **gin.get_bindings("total_loss")}}
    out: dict[str, dict[str, object]] = {}
    for name, ref in refs.items():
        scope = ref.scoped_selector.rpartition("/")[0]
        with gin.config_scope(scope or None):
            bound = gin.get_bindings(ref.configurable.wrapped, resolve_references=True)
        out[name] = {"loss": ref.configurable.name, "scope": scope, **bound}
    return out


def log_points(run: Run, state: State) -> None:
    """One child run per sampled method, ``point-{method}`` (tag ``dlsm.kind = 'point'``), with what places it
    in the (lambda, alpha) plane as params -- ``method``, ``classifier``, ``loss``, ``lam`` (Total-type losses),
    ``alpha``, ``seed`` -- and the method's metrics without the ``{method}/`` prefix, so the MLflow UI compares
    every (classifier loss, lambda, alpha, seed) side by side (filter ``tags.dlsm.kind = 'point'``). Sampled
    extra methods (``exact``) get a point run too."""
    spec = run.spec
    methods = spec.sampling_methods or {n: (n, spec.alpha) for n in spec.classifier_losses}
    losses = classifier_loss_settings()
    for name, (clf, alpha) in methods.items():
        setting = losses.get(clf, {})
        guidance = as_guidance(alpha)
        params: dict[str, object] = {"method": name, "classifier": clf, "alpha": float(guidance.alpha),
                                     "seed": spec.seed, "loss": setting.get("loss", "?")}
        if not isinstance(alpha, (int, float)):  # a guidance schedule: its kind and settings
            params |= guidance.as_params()
        params |= {("lam" if k == "lam" else f"loss.{k}"): v for k, v in setting.items() if k not in ("loss",)}
        _log_point(run, state, name, params)
    for name, scores in state.extra_methods.items():  # e.g. 'exact': the prior model with the oracle's likelihood
        if name in state.samples:
            _log_point(run, state, name, {"method": name, "classifier": name, "seed": spec.seed,
                                          "alpha": float(getattr(scores, "alpha", 1.0)), "loss": "none"})


def _log_point(run: Run, state: State, name: str, params: dict[str, object]) -> None:
    import mlflow

    metrics = {k.removeprefix(f"{name}/"): v for k, v in state.metrics.items() if k.startswith(f"{name}/")}
    with run.tracker.stage(run.parent_id, f"point-{name}"):
        mlflow.set_tag("dlsm.kind", "point")
        run.tracker.log_params(params)
        run.tracker.log_metrics(metrics)


@gin.configurable(denylist=["run", "state"])
def evaluate(
    run: Run, state: State, *, suites: Sequence[Callable] = (classifier_metrics, sample_metrics),
    point_runs: bool = False,
) -> State:
    """Evaluation (child run ``evaluation``): every metric suite on the methods, classifiers and samples;
    the metrics go to this run and, at the end, to the parent run. With ``point_runs``, also one child run per
    sampled method carrying its loss, lambda, alpha and seed as params (:func:`log_points`)."""
    with run.tracker.stage(run.parent_id, "evaluation"):
        t0 = time.perf_counter()
        ev = _evaluation(run, state)
        for suite in suites:
            state.metrics.update(suite(ev))
        run.tracker.log_metrics(state.metrics)
        log_artifacts(run.tracker, ev.artifacts, also_to=run.tracker.stage_run_id(run.parent_id, "sampling"))
        for name in ev.artifacts:
            if name.endswith(".md"):
                print(ev.artifacts[name])
        run.timings["time/evaluation_s"] = time.perf_counter() - t0
        run.tracker.log_metrics({"wall_seconds": run.timings["time/evaluation_s"]})
    if point_runs:
        log_points(run, state)
    return state


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


@gin.configurable(denylist=["run", "state"])
def figures(run: Run, state: State, *, plots: Sequence[Callable] = ()) -> State:
    """Figures (child run ``figures``): each figure function once per classifier shape, as
    ``plots/{figure}[-{shape}].png``, and the stage-2 loss curves (``plots/stage2_losses.png``)."""
    with run.tracker.stage(run.parent_id, "figures"):
        t0 = time.perf_counter()
        ev = _evaluation(run, state)
        for fig_fn in plots:
            name = getattr(fig_fn, "__name__", "figure")
            for shape in run.spec.classifiers:
                run.tracker.log_figure(fig_fn(_shape_view(ev, shape, run.spec.classifiers)),
                                       f"plots/{method_key(name, shape)}.png")
        if any(state.curves.values()):
            run.tracker.log_figure(loss_curves(state.curves, "stage 2: classifier losses"), "plots/stage2_losses.png")
        run.timings["time/figures_s"] = time.perf_counter() - t0
    return state
