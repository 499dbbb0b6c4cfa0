"""Evaluation and figures: metric suites ``suite(evaluation) -> {name: value}`` and figure functions
``figure(evaluation) -> matplotlib figure``, each stage a child run (``evaluation``, ``figures``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import gin

from dlsm.experiment import Run, State, method_key
from dlsm.metrics import Evaluation, classifier_metrics, sample_metrics
from dlsm.plots import loss_curves

__all__ = ["cache_dir", "evaluate", "feature_nets", "figures", "log_artifacts", "test_split"]


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
        from dlsm.eval.suite import image_features

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


@gin.configurable(denylist=["run", "state"])
def evaluate(run: Run, state: State, *, suites: Sequence[Callable] = (classifier_metrics, sample_metrics)) -> State:
    """Evaluation (child run ``evaluation``): every metric suite on the methods, classifiers and samples;
    the metrics go to this run and, at the end, to the parent run."""
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
