"""Command line: ``python -m dlsm.evaluate --run RUN_ID [--gin_param 'BINDING' ...]``.

Recomputes the image metrics (``image_metrics``: Table 2, Figure 4) of a finished experiment from the samples its
sampling stage saved (``samples/samples-{method}.npz``, uint8), without sampling again: with other feature networks
(``--gin_param 'image_features.networks = [@inception_network]'``), another k (``'image_metrics.k = 3'``), and so on.
``RUN_ID`` is the experiment's parent run or its sampling run. The experiment's gin config (the parent run's
``config/config.gin``) is read back, the bindings given here are applied on top, and the results go to a new child
run ``re-evaluation`` of the same parent (the table also beside the samples, in the sampling run). User errors (an
unknown run, a run without samples, samples of the wrong shape or type, a bad binding) print one line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dlsm.errors import ConfigError, DataError, DlsmError, print_error

__all__ = ["evaluate_run", "main"]


def _runs(client, run_id: str) -> tuple[object, object]:
    """(parent run, sampling run) for a parent or sampling run id; ConfigError otherwise."""
    try:
        run = client.get_run(run_id)
    except Exception:
        from dlsm.tracking import default_tracking_uri

        raise ConfigError(f"--run {run_id}: no such MLflow run in {default_tracking_uri()}") from None
    tags = run.data.tags
    if tags.get("dlsm.stage") == "sampling":
        return client.get_run(tags["mlflow.parentRunId"]), run
    if tags.get("dlsm.kind") == "parent":
        found = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`dlsm.stage` = 'sampling'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if not found:
            raise ConfigError(f"--run {run_id}: this experiment has no sampling run (did its sampling stage run?)")
        return run, found[0]
    raise ConfigError(f"--run {run_id}: neither an experiment's parent run nor its sampling run")


def load_samples(path: Path, data) -> dict[int, torch.Tensor]:
    """A saved ``samples-{method}.npz`` (uint8 ``x`` (N, C, H, W), labels ``y``) as {class: float images in the data's
    model space}; one-line DataError for anything else."""
    from dlsm.data.images import to_model_space
    from dlsm.eval.images import check_samples

    method = path.stem.removeprefix("samples-")
    try:
        with np.load(path) as f:
            x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"]).to(torch.int64)
    except (KeyError, ValueError, OSError) as err:
        raise DataError(f"{path}: not an image sample file with arrays x and y ({type(err).__name__})") from None
    check_samples(method, x, y, data)
    return {c: to_model_space(x[y == c], centered=data.centered) for c in range(data.num_classes) if (y == c).any()}


def evaluate_run(run_id: str, bindings: list[str]) -> dict[str, float]:
    """Recompute ``image_metrics`` for the samples of ``run_id`` (see the module docstring); returns the metrics."""
    import gin

    from dlsm import components  # noqa: F401  (registers every configurable)
    from dlsm.config import call_configurable, parse_config
    from dlsm.eval.images import image_features, image_metrics
    from dlsm.eval.points import Evaluation
    from dlsm.experiment import experiment
    from dlsm.math.schedules import noise_schedule
    from dlsm.stages.evaluate import log_artifacts
    from dlsm.tracking import MlflowClient, Tracker, check_tracking_uri, mlflow  # telemetry off before mlflow loads
    from dlsm.train.device import device as device_binding

    client = MlflowClient(check_tracking_uri())
    parent, sampling = _runs(client, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config = Path(client.download_artifacts(parent.info.run_id, "config/config.gin", tmp))
        except Exception:
            raise ConfigError(f"--run {run_id}: the parent run has no config/config.gin artifact") from None
        parse_config([str(config)], bindings, check=True)
        spec = call_configurable(experiment)
        data = spec.dataset()
        if len(tuple(getattr(data, "shape", ()))) != 3:
            raise ConfigError(f"--run {run_id}: not an image experiment ({spec.name}); dlsm.evaluate scores images")
        try:
            folder = Path(client.download_artifacts(sampling.info.run_id, "samples", tmp))
        except Exception:
            folder = Path(tmp) / "none"
        files = sorted(folder.glob("samples-*.npz")) if folder.is_dir() else []
        if not files:
            raise DataError(f"--run {run_id}: the sampling run {sampling.info.run_id} has no samples/samples-*.npz")
        samples = {f.stem.removeprefix("samples-"): load_samples(f, data) for f in files}
    device = device_binding()
    cache = Path(spec.workdir) / "cache"
    test = spec.dataset(split="test")
    nets = image_features(data, test, device=device, cache_dir=cache)
    ev = Evaluation(data, noise_schedule(data), {}, samples=samples, seed=spec.seed + 31,
                    test_data=lambda: test, device=device, cache_dir=cache,
                    feature_nets=lambda: nets)
    tracker = Tracker(spec.name)
    with mlflow.start_run(run_id=parent.info.run_id), mlflow.start_run(
        run_name="re-evaluation", nested=True, tags={"dlsm.stage": "re-evaluation"}
    ):
        t0 = time.perf_counter()
        tracker.log_params({"source_sampling_run": sampling.info.run_id, **{f"binding{i}": b
                                                                             for i, b in enumerate(bindings)}})
        tracker.log_text(gin.config_str(), "config/config.gin")
        metrics = image_metrics(ev)
        metrics["wall_seconds"] = time.perf_counter() - t0
        tracker.log_metrics(metrics)
        log_artifacts(tracker, ev.artifacts, also_to=sampling.info.run_id)
    for name, obj in ev.artifacts.items():
        if name.endswith(".md"):
            print(obj)
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlsm.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, metavar="RUN_ID", help="the experiment's parent run or its sampling run")
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING",
                   help="a gin binding applied on top of the run's config, e.g. 'image_metrics.k = 3' (repeatable)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors")
    args = p.parse_args(argv)
    try:
        metrics = evaluate_run(args.run, args.gin_param)
    except DlsmError as err:
        if args.traceback:
            raise
        return print_error(err)
    width = max((len(k) for k in metrics), default=0)
    for k in sorted(metrics):
        print(f"{k:<{width}}  {metrics[k]:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
