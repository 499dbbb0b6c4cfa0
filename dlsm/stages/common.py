"""What the training stages share: train one network in its gin scope inside a child run, or reuse one."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gin
from torch import nn

from dlsm.files import copy_atomic
from dlsm.report.plots import loss_curves
from dlsm.stages.base import Run, seed_everything
from dlsm.train import distributed as dist
from dlsm.train.checkpoints import load_ema_weights
from dlsm.train.loop import train

__all__ = ["STAGE1", "fit", "load_published", "reuse"]

STAGE1 = "stage1-score"


def fit(
    run: Run,
    stage: str,
    scope: str,
    ckpt: Path,
    *,
    build: Callable[[], nn.Module],
    loss_fn: Callable,
    data,
    schedule,
    params: dict,
    seed_offset: int,
    train_seed_offset: int = 11,
    stage_label: str = "score",
    eval_fn: Callable | None = None,
    snapshot_fn: Callable | None = None,
) -> tuple[nn.Module, list[tuple[int, float]], str]:
    """Train one network in its gin ``scope`` inside the child run ``stage``; returns
    (EMA network, losses, MLflow run id).

    Every network of a stage starts from the same seed (``seed_offset``), so methods compare fairly.
    A stage FINISHED in MLflow whose local checkpoint is gone fetches it from its run's artifacts.
    Under torchrun every rank trains (same seed, same network); rank 0 fetches, prints and logs.
    """
    tracker = run.tracker
    with tracker.stage(run.parent_id, stage) as answer:
        run_id, done = dist.share(answer)  # rank 0's run and "already finished" (torchrun)
        t0 = time.perf_counter()
        tracker.log_params(params)
        seed_everything(run.seed(seed_offset))
        with gin.config_scope(scope):
            model = build()

            def fetch() -> None:
                if done and not ckpt.exists():
                    with tempfile.TemporaryDirectory(prefix="dlsm-ckpt-") as tmp:
                        fetched = tracker.download_checkpoint(run_id, stage, ckpt.name, key=stage,
                                                              require_finished=False, dst=Path(tmp))
                        copy_atomic(fetched, ckpt)  # a full disk leaves no truncated checkpoint behind

            dist.from_main(fetch)
            if not done and dist.is_main():
                n = sum(p.numel() for p in model.parameters() if p.requires_grad)  # trainable (not fixed Fourier w)
                tracker.log_params({"num_parameters": n, "network": type(model).__name__})
                print(f"dlsm: {stage}: {type(model).__name__} with {n:,} parameters on {run.device}")
            res = train(
                model, loss_fn, data, schedule, ckpt_path=ckpt, seed=run.seed(train_seed_offset),
                stage=stage_label, log_fn=tracker.log_metrics, eval_fn=eval_fn, device=run.device,
                snapshot_fn=snapshot_fn,
            )
        if not done:
            tracker.log_artifact(ckpt, "checkpoints")
            if res.losses:
                tracker.log_figure(loss_curves({stage_label: res.losses}, stage), "plots/loss.png")
        run.timings[f"time/{stage}_s"] = time.perf_counter() - t0
        tracker.log_metrics({"wall_seconds": run.timings[f"time/{stage}_s"]})
    return res.ema, res.losses, run_id


def reuse(run: Run, stage: str, build: Callable[[], nn.Module]) -> tuple[nn.Module, list, str]:
    """Load the EMA network of ``stage`` from the finished run named by ``experiment.stage1_run_id``
    (stage 1) or ``experiment.stage2_run_id`` (stage-2 classifiers), recorded as a child run here."""
    spec, tracker = run.spec, run.tracker
    key = "experiment.stage1_run_id" if stage == STAGE1 else "experiment.stage2_run_id"
    source = spec.stage1_run_id if stage == STAGE1 else spec.stage2_run_id
    name = "score.pt" if stage == STAGE1 else f"classifier-{stage.removeprefix('stage2-')}.pt"
    with tracker.stage(run.parent_id, stage) as answer:
        run_id, _ = dist.share(answer)
        tracker.log_params({**run.params, f"reused_{key.split('.')[1]}": source})
        seed_everything(run.seed(1))
        with gin.config_scope("score" if stage == STAGE1 else "classifier"):
            model = build()
        # rank 0 downloads; every rank reads the file (one machine, or a shared temporary folder); rank 0 then
        # removes the folder once every rank has read it
        tmp = Path(dist.from_main(lambda: tempfile.mkdtemp(prefix="dlsm-ckpt-")))
        try:
            path = dist.from_main(lambda: tracker.download_checkpoint(source, stage, name, key=key, dst=tmp))
            ema = load_ema_weights(model, path)
            dist.barrier()
        finally:
            if dist.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
    return ema.to(run.device), [], run_id


def load_published(run: Run, stage: str, scope: str, build: Callable[[], nn.Module],
                   importer: Callable[[str, nn.Module], int], path: str) -> tuple[nn.Module, str]:
    """Take ``stage`` from an official checkpoint file instead of training it (``train_score_model.checkpoint``,
    ``train_classifiers.checkpoints``): build the network in its gin ``scope`` and ``importer(path, network)`` it
    (:mod:`dlsm.train.official`: every key mapped and checked, the file already checked by
    :func:`dlsm.preflight.check_published`), recorded as the child run ``stage`` with the file's path, SHA-256 and
    step. Every rank (torchrun) reads the file itself. Returns (network in eval mode on the run's device, run id)."""
    tracker, path = run.tracker, str(Path(path).expanduser())  # as dlsm.preflight.check_published read it
    with tracker.stage(run.parent_id, stage) as answer:
        run_id, done = dist.share(answer)
        t0 = time.perf_counter()
        seed_everything(run.seed(1))
        with gin.config_scope(scope):
            model = build()
        step = importer(path, model)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if not done and dist.is_main():
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            tracker.log_params({**run.params, "checkpoint": str(path), "checkpoint_sha256": digest,
                                "checkpoint_step": step, "network": type(model).__name__, "num_parameters": n})
            print(f"dlsm: {stage}: {type(model).__name__} with {n:,} parameters from {path} "
                  f"(official checkpoint, step {step})")
        run.timings[f"time/{stage}_s"] = time.perf_counter() - t0
        tracker.log_metrics({"wall_seconds": run.timings[f"time/{stage}_s"]})
    return model.eval().to(run.device), run_id
