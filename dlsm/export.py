"""Command line: ``python -m dlsm.export --run RUN_ID --out DIR``.

Writes the score model and the stage-2 classifiers of a finished experiment in the official score_sde / DLSM layout
(:mod:`dlsm.train.official`), so that they load in the official code (``restore_checkpoint``, DataParallel names)
and come back here through ``train_score_model.checkpoint`` / ``train_classifiers.checkpoints`` bit for bit::

    DIR/score/checkpoint.pth    stage1-score: 'model' (the trained weights), 'ema' (the EMA weights, which the
                                official sampler and DLSM's classifier training use), 'step', a fresh Adam state
    DIR/<name>/checkpoint.pth   stage2-<name> (ce: the base classifier, total: ours): 'model' (the weights sampled
                                here: the EMA, which is the trained weights at classifier/train.ema_decay = 0), 'step'

``RUN_ID`` is the experiment's parent run (or one of its stage runs). The networks are rebuilt from the parent run's
``config/config.gin`` (its dataset is loaded for the image shape and class count) and filled from the stage runs'
``checkpoints/*.pt``; with several classifier seeds, the first (the one sampled) is written. A stage that was itself
loaded from an official file is not written again (its file is named instead). User errors (an unknown run, a stage
without its checkpoint, a network with no official counterpart) print one line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from dlsm.errors import CheckpointError, ConfigError, DlsmError, print_error

__all__ = ["export_run", "main"]


def _parent(client, run_id: str):
    from dlsm.tracking import default_tracking_uri

    try:
        run = client.get_run(run_id)
    except Exception:
        raise ConfigError(f"--run {run_id}: no such MLflow run in {default_tracking_uri()}") from None
    if run.data.tags.get("dlsm.kind") == "parent":
        return run
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if run.data.tags.get("dlsm.stage") and parent_id:
        return client.get_run(parent_id)
    raise ConfigError(f"--run {run_id}: neither an experiment's parent run nor one of its stage runs")


def _scoped(scope: str, name: str, default: float) -> float:
    import gin

    try:
        return float(gin.query_parameter(f"{scope}/train.{name}"))
    except ValueError:
        return default


def export_run(run_id: str, out: str | Path) -> dict[str, Path]:
    """Write the networks of ``run_id`` under ``out`` (see the module docstring); returns {name: file written}."""
    import gin

    from dlsm import components  # noqa: F401  (registers every configurable)
    from dlsm.config import call_configurable, parse_config
    from dlsm.experiment import experiment
    from dlsm.math.schedules import noise_schedule
    from dlsm.nets.convnet import ConvClassifier
    from dlsm.nets.ncsnpp import NCSNpp
    from dlsm.stages.base import build_network, method_key
    from dlsm.stages.common import STAGE1
    from dlsm.tracking import MlflowClient, Tracker, check_tracking_uri
    from dlsm.train.checkpoints import load_checkpoint, load_ema_weights, load_into
    from dlsm.train.official import export_classifier_checkpoint, export_score_checkpoint

    client = MlflowClient(check_tracking_uri())
    parent = _parent(client, run_id)
    parent_id, out, written = parent.info.run_id, Path(out), {}
    with tempfile.TemporaryDirectory(prefix="dlsm-export-") as tmp:
        try:
            config = Path(client.download_artifacts(parent_id, "config/config.gin", tmp))
        except Exception:
            raise ConfigError(f"--run {run_id}: the parent run has no config/config.gin artifact") from None
        parse_config([str(config)], [], check=True)
        spec = call_configurable(experiment)
        data = spec.dataset()
        tracker = Tracker(spec.name)

        def fetch(stage: str, name: str, scope: str, make, **kw):
            """(network built in ``scope``, our checkpoint's state, its path), or None where the stage was loaded
            from an official file."""
            child = tracker.child(parent_id, stage)
            if child is not None and "checkpoint" in child.data.params:
                print(f"dlsm: {stage} was loaded from {child.data.params['checkpoint']} (the official layout "
                      "already); not written")
                return None
            path = tracker.download_checkpoint(parent_id, stage, name, key=f"--run {run_id}", dst=Path(tmp))
            with gin.config_scope(scope):
                net = build_network(make, data, **kw)
            return net, load_checkpoint(path), path

        got = fetch(STAGE1, "score.pt", "score", spec.score_model)
        if got is not None:
            net, state, path = got
            if not isinstance(net, NCSNpp):
                raise CheckpointError(f"the score model is {type(net).__name__}: only NCSNpp has an official "
                                      "(score_sde) counterpart")
            ema = load_ema_weights(net, path)  # AveragedModel copies net: its EMA, net itself left as built
            load_into(net, state["model"], path, "score model")
            sched = noise_schedule(data)
            written["score"] = out / "score" / "checkpoint.pth"
            export_score_checkpoint(net, written["score"], ema_net=ema, step=int(state["step"]),
                                    ema_decay=_scoped("score", "ema_decay", 0.999), sigma_min=sched.sigma_min,
                                    sigma_max=sched.sigma_max, num_scales=len(sched.sigmas))
        seeds = gin.get_bindings("train_classifiers").get("seeds", 1)
        for shape, make in spec.classifiers.items():
            for loss in spec.classifier_losses:
                key = method_key(loss, shape)
                stage = f"stage2-{key}" + ("-seed0" if seeds > 1 else "")
                got = fetch(stage, f"classifier-{stage.removeprefix('stage2-')}.pt", "classifier", make,
                            num_classes=data.num_classes)
                if got is None:
                    continue
                net, state, path = got
                if not isinstance(net, ConvClassifier):
                    raise CheckpointError(f"classifier {key} is {type(net).__name__}: only ConvClassifier has an "
                                          "official (resnet_cond) counterpart")
                ema = load_ema_weights(net, path)
                written[key] = out / key / "checkpoint.pth"
                export_classifier_checkpoint(ema, written[key], step=int(state["step"]))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlsm.export", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, metavar="RUN_ID", help="the experiment's parent run (or a stage run)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for <name>/checkpoint.pth")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors")
    args = p.parse_args(argv)
    try:
        written = export_run(args.run, args.out)
    except DlsmError as err:
        if args.traceback:
            raise
        return print_error(err)
    for name, path in written.items():
        print(f"{name:<8}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
