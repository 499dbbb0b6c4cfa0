"""What the training stages share: train one network in its gin scope inside a child run, or reuse one; and the
child run of a stage that every rank runs (:func:`every_rank_stage`, sampling uses it too)."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gin
from torch import nn

from dlsm.errors import DlsmError
from dlsm.files import copy_atomic
from dlsm.report.plots import loss_curves
from dlsm.stages.base import Run, seed_everything
from dlsm.train import distributed as dist
from dlsm.train.checkpoints import load_ema_weights
from dlsm.train.loop import train

__all__ = ["STAGE1", "every_rank_stage", "fit", "load_published", "reuse"]

STAGE1 = "stage1-score"


@contextlib.contextmanager
def every_rank_stage(run: Run, stage: str) -> Iterator[tuple[str, bool]]:
    """``run.tracker.stage(run.parent_id, stage)`` for a stage that every rank runs (torchrun): yields rank 0's
    (run id, already finished) on every rank, and the child run's start and end, on rank 0, are collectives, so that
    an error there (its MLflow store lost: a TrackingError) stops every rank at once with the line rank 0 prints,
    instead of leaving the other ranks waiting for a rank that is gone.

    The body must do the same with the work that rank 0 does alone and that can fail (:func:`fit` logs the
    checkpoint and the loss figure through :func:`~dlsm.train.distributed.from_main`, and the sampling stage gathers
    and writes its samples so), and ranks that work apart share their errors with
    :func:`~dlsm.train.distributed.settle`. An error raised on every rank at once ends rank 0's child run FAILED.
    One process: ``tracker.stage`` itself."""
    if dist.world_size() == 1:
        with run.tracker.stage(run.parent_id, stage) as answer:
            yield answer
        return
    with contextlib.ExitStack() as held:  # rank 0's child run
        yield dist.from_main(lambda: held.enter_context(run.tracker.stage(run.parent_id, stage)))
        dist.from_main(held.close)  # the run ends on rank 0: a lost store's error there reaches every rank


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
    with every_rank_stage(run, stage) as (run_id, done):  # rank 0's run and "already finished" (torchrun)
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

        def log_files() -> None:  # rank 0; a full disk in MLflow's artifact folder stops every rank (torchrun)
            if not done:
                tracker.log_artifact(ckpt, "checkpoints")
                if res.losses:
                    tracker.log_figure(loss_curves({stage_label: res.losses}, stage), "plots/loss.png")

        dist.from_main(log_files)
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
    with every_rank_stage(run, stage) as (run_id, _):
        tracker.log_params({**run.params, f"reused_{key.split('.')[1]}": source})
        seed_everything(run.seed(1))
        with gin.config_scope("score" if stage == STAGE1 else "classifier"):
            model = build()
        # rank 0 downloads; every rank reads the file (one machine, or a shared temporary folder); rank 0 then
        # removes the folder once every rank has read it
        tmp = Path(dist.from_main(lambda: tempfile.mkdtemp(prefix="dlsm-ckpt-")))
        try:
            path = dist.from_main(lambda: tracker.download_checkpoint(source, stage, name, key=key, dst=tmp))
            error: DlsmError | None = None
            try:
                ema = load_ema_weights(model, path)
            except DlsmError as err:  # e.g. a rank that cannot read rank 0's folder: every rank stops with it
                error = err
            dist.settle(error)  # and every rank has read the file before rank 0 removes it
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
    with every_rank_stage(run, stage) as (run_id, done):
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
