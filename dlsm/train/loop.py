"""The training loop shared by both stages: EMA, atomic resumable checkpoints, NaN guard, progress bar.

One ``train`` configurable serves both stages through gin scopes (``score/train.n_iters``,
``classifier/train.n_iters``). The loss is a closure ``loss_fn(model, x, y, sigma, noise)``
returning a per-example loss; the trainer draws the batch, sigma and noise from its own generator,
whose state is checkpointed, so an interrupted run resumes on the same random stream.

Everything of one run lives on one device (``train.device``): the model, the data, the generator and
every random number; on the CPU the streams are those of ``torch.Generator().manual_seed(seed)``.

Under torchrun (:mod:`dlsm.train.distributed`) every rank runs this same loop in lockstep: ``train.batch_size`` is the
global batch, each rank keeps its slice of it, DistributedDataParallel averages the gradients, rank 0 alone logs
and checkpoints; one process is the world of one, with the same numbers as before.

The setup, the resume from a checkpoint and one training step are in :mod:`dlsm.train.steps`; the periodic work
between steps (logging, ``eval_fn``, snapshots, checkpoint writes, the NaN check, deferred Ctrl-C) is here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gin
import torch
from torch import nn
from tqdm.auto import tqdm

from dlsm.data.points import LabelledData
from dlsm.errors import NonFiniteLossError
from dlsm.math.schedules import NoiseSchedule
from dlsm.train import distributed as dist
from dlsm.train.checkpoints import (  # noqa: F401  (re-exported: the trainer's checkpoint API)
    ema_model,
    load_checkpoint,
    load_ema_weights,
    load_into,
    restore_generator,
    save_checkpoint,
)
from dlsm.train.steps import (
    LogFn,
    LossFn,
    SnapshotFn,
    _Args,
    _LoopState,
    _sigma_sampler,
    _start,
    _train_step,
    warmup_factor,
)

__all__ = [
    "TrainResult",
    "draw_sigmas",
    "ema_model",
    "load_checkpoint",
    "save_checkpoint",
    "train",
    "warmup_factor",
]

gin.external_configurable(torch.optim.Adam, module="torch.optim")
gin.external_configurable(torch.optim.AdamW, module="torch.optim")
gin.external_configurable(torch.optim.SGD, module="torch.optim")


def draw_sigmas(
    n: int,
    schedule: NoiseSchedule,
    distribution: str,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training noise levels for one minibatch, shape (n,), drawn from ``generator`` on ``device``.

    ``'log_uniform'``: log sigma ~ U(log sigma_min, log sigma_max), continuous (the formula of
    :func:`dlsm.math.schedules.log_uniform_sigmas`, whose numbers it reproduces on the CPU).
    ``'discrete'``: sigma uniform over all L levels of ``schedule.sigmas``, sigma_1 (largest) to sigma_L
    (smallest) inclusive, as in NCSN/NCSNv2 training (``labels = torch.randint(0, len(sigmas), ...)``).
    ``device`` defaults to the generator's device, else the CPU.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return _sigma_sampler(schedule, distribution, torch.device(device))(n, generator)


@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module  # the averaged network itself (AveragedModel.module)
    step: int
    losses: list[tuple[int, float]] = field(default_factory=list)


DOUBLE_PRESS_S = 1.0  # under torchrun, a second SIGINT sooner than this after the first is the same Ctrl-C


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Ctrl-C during a training step (or an MLflow write) is acted on between steps: yields a function
    telling whether one came. A second Ctrl-C interrupts at once; under torchrun only one ``DOUBLE_PRESS_S`` or
    more after the first, as a terminal's Ctrl-C reaches each worker twice at once (from the terminal and from
    torchrun). Only in the main thread (elsewhere, e.g. in a Ray trial, signals are not delivered to this code
    and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[float] = []
    previous = signal.getsignal(signal.SIGINT)
    window = DOUBLE_PRESS_S if dist.world_size() > 1 else 0.0

    def handler(signum, frame):  # noqa: ARG001
        hits.append(time.monotonic())
        if len(hits) > 1 and hits[-1] - hits[0] >= window:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


@gin.configurable(
    denylist=[
        "model", "loss_fn", "data", "schedule", "ckpt_path", "log_fn", "seed", "stage", "eval_fn", "snapshot_fn"
    ]
)
def train(
    model: nn.Module,
    loss_fn: LossFn,
    data: LabelledData,
    schedule: NoiseSchedule,
    *,
    ckpt_path: str | os.PathLike,
    seed: int,
    stage: str = "train",
    n_iters: int = 1000,
    batch_size: int = 256,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
    ema_decay: float = 0.999,
    grad_clip: float | None = None,
    sigma_distribution: str = "log_uniform",
    ckpt_every: int = 500,
    log_every: int = 50,
    log_fn: LogFn | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 100,
    disable_progress: bool | None = None,
    device: str | torch.device = "cpu",
    warmup: int = 0,
    autocast: bool = False,
    compile: bool = False,  # shadows the builtin: the gin binding is train.compile
    flip: bool = False,
    channels_last: bool = False,
    snapshot_every: int = 0,
    snapshot_fn: SnapshotFn | None = None,
) -> TrainResult:
    """Minimise mean(loss_fn(model, x, y, sigma, noise)) over minibatches; resume from ``ckpt_path``.

    sigma is drawn log-uniformly on [sigma_min, sigma_max] (``sigma_distribution='log_uniform'``)
    or uniformly from the discrete ``schedule.sigmas`` (``'discrete'``).
    A NaN/Inf loss stops training with NonFiniteLossError; the last good checkpoint is left in place.
    ``eval_fn(model)`` (if given) runs at step 0 and every ``eval_every`` steps on the weights being
    trained (not the EMA), in eval mode; its metrics go to ``log_fn`` at that step (training curves).

    ``device`` ('cpu', 'cuda', 'cuda:N' or 'auto', see :func:`dlsm.train.device.resolve_device`): the model, the data
    (moved there whole with ``data.to``), the generator and every random number live there; the default 'cpu'
    keeps the CPU streams of earlier versions, and the pipeline passes the experiment's resolved device.
    Per step the generator draws, in order: the batch indices (on the data's device), the flip coins (only
    with ``flip``), sigma, then the noise. Data with a ``batch(idx, *, flip, generator)`` method
    (:class:`dlsm.data.points.LabelledData`, :class:`dlsm.data.images.ImageData`) are read through it, others as
    ``data.x[idx], data.y[idx]``; for LabelledData both give the same numbers.
    ``warmup``: the update with 0-based index k uses lr * min(1, (k + 1) / warmup) (:func:`warmup_factor`); the
    base learning rates are checkpointed, so a resumed run continues the schedule. ``grad_clip``: max global
    gradient norm. ``autocast``: the loss runs under ``torch.autocast(device, torch.bfloat16)`` and is averaged
    in float32. ``compile``: the loss calls ``torch.compile(model)`` (same parameters). ``flip``: mirror each
    image horizontally with probability 1/2 (ImageData only; points raise a ConfigError). ``channels_last``: the
    model's 4-D weights and each image batch in ``torch.channels_last`` memory layout (NHWC; faster convolutions on
    tensor-core GPUs; numbers equal up to float rounding).
    ``snapshot_fn(ema_module, step)`` (not gin-bound; the pipeline's sample grid) is called, with the EMA module
    in eval mode, after every ``snapshot_every``-th step; ``snapshot_every = 0`` or no ``snapshot_fn``: never.

    Several processes (torchrun, :mod:`dlsm.train.distributed`): ``batch_size`` is the *global* batch, so a gin file
    trains the same way on any number of GPUs (and a checkpoint resumes on another number). Every rank draws the
    whole batch from the same generator as one process would and keeps its slice ``[rank b, (rank + 1) b)``,
    b = batch_size / world (which must be whole): that slice is the rank's data shard. The loss is the mean over the
    rank's slice and DistributedDataParallel averages the gradients, so the update is that of one process with the
    whole batch, up to float rounding (see tests/test_distributed.py); parameters, optimizer state and EMA stay
    identical on all ranks. Ranks other than 0 reseed torch's global RNG (dropout) with
    :func:`dlsm.train.distributed.rank_seed`. Rank 0 alone writes checkpoints, calls ``eval_fn``, ``snapshot_fn`` and
    ``log_fn`` (the logged loss is the mean over ranks) and shows the progress bar; every rank resumes from the
    checkpoint rank 0 wrote. A NaN loss or a Ctrl-C on any rank stops every rank after the same step.
    """
    return _run(_Args(model=model, loss_fn=loss_fn, data=data, schedule=schedule, ckpt_path=ckpt_path, seed=seed,
                      stage=stage, n_iters=n_iters, batch_size=batch_size, optimizer=optimizer, ema_decay=ema_decay,
                      grad_clip=grad_clip, sigma_distribution=sigma_distribution, ckpt_every=ckpt_every,
                      log_every=log_every, log_fn=log_fn, eval_fn=eval_fn, eval_every=eval_every,
                      disable_progress=disable_progress, device=device, warmup=warmup, autocast=autocast,
                      compile=compile, flip=flip, channels_last=channels_last, snapshot_every=snapshot_every,
                      snapshot_fn=snapshot_fn))


def _run(a: _Args) -> TrainResult:
    """The body of :func:`train`: set up or resume, evaluate at step 0, then step until ``a.n_iters`` with the
    periodic work after each step; Ctrl-C is deferred to the end of a step."""
    batches, s = _start(a)
    s.model.train()
    if s.step == 0:
        _evaluate(a, s)
    bar = tqdm(total=a.n_iters, initial=s.step, desc=a.stage, disable=a.disable_progress if dist.is_main() else True,
               leave=False)
    with deferred_interrupt() as interrupted:
        while s.step < a.n_iters:
            _train_step(a, s, batches)
            bar.update(1)
            _after_step(a, s, bar, interrupted)
    bar.close()
    s.model.eval()
    s.ema.module.eval()
    return TrainResult(model=s.model, ema=s.ema.module, step=s.step, losses=s.losses)


def _after_step(a: _Args, s: _LoopState, bar: tqdm, interrupted: Callable[[], bool]) -> None:
    """The periodic work after step ``s.step``: the NaN check (at log and checkpoint steps), the logged loss, the
    checkpoint, ``eval_fn``, ``snapshot_fn``, and a Ctrl-C that came during the step. Every rank calls this in
    lockstep: ``dist.any_rank`` and ``dist.mean`` are collectives."""
    at_log = s.step % a.log_every == 0 or s.step == a.n_iters
    at_ckpt = s.step % a.ckpt_every == 0 or s.step == a.n_iters
    if at_log or at_ckpt:
        if dist.any_rank(s.bad):
            bar.close()
            last = (s.step - 1) // a.ckpt_every * a.ckpt_every
            kept = (
                f"last good checkpoint (step {last}) kept at {s.ckpt_path}"
                if s.ckpt_path.exists()
                else "no checkpoint was written"
            )
            raise NonFiniteLossError(
                f"{a.stage}: the loss became NaN or Inf by step {s.step}; {kept}; "
                "lower the learning rate or set train.grad_clip"
            )
    if at_log:
        _log_loss(a, s, bar)
    if at_ckpt:
        _checkpoint(a, s)
    if s.step % a.eval_every == 0 or s.step == a.n_iters:
        _evaluate(a, s)
    if a.snapshot_fn is not None and a.snapshot_every and s.step % a.snapshot_every == 0 and dist.is_main():
        _snapshot(a, s)
    if dist.any_rank(interrupted()):  # keep this step's work; stop where MLflow can be closed cleanly
        bar.close()
        if not dist.any_rank(s.bad):
            _checkpoint(a, s)
        raise KeyboardInterrupt


def _log_loss(a: _Args, s: _LoopState, bar: tqdm) -> None:
    """The mean loss since the last log (over steps and ranks) into ``s.losses``, the progress bar and ``log_fn``."""
    mean = float(dist.mean(s.running)) / s.count
    s.running.zero_()
    s.count = 0
    s.losses.append((s.step, mean))
    bar.set_postfix(loss=f"{mean:.4g}")
    if a.log_fn is not None and dist.is_main():
        a.log_fn({f"{a.stage}/loss": mean}, s.step)


def _checkpoint(a: _Args, s: _LoopState) -> None:
    """Rank 0 writes the resumable state, and a failed write (a full disk) stops every rank with its one line
    (``dist.from_main``; every rank calls this in lockstep). ``save_checkpoint`` is looked up in this module when
    called (the distributed tests count the writes by replacing ``dlsm.train.loop.save_checkpoint``)."""
    dist.from_main(lambda: save_checkpoint(
        s.ckpt_path,
        {
            "step": s.step,
            "model": s.model.state_dict(),
            "ema": s.ema.state_dict(),
            "optimizer": s.opt.state_dict(),
            "generator": s.gen.get_state(),
            "device": a.dev.type,
            "base_lrs": s.base_lrs,
            "warmup": a.warmup,
        },
    ))


def _evaluate(a: _Args, s: _LoopState) -> None:
    """``eval_fn`` on rank 0, on the weights being trained in eval mode; its metrics go to ``log_fn`` at this step."""
    if a.eval_fn is None or not dist.is_main():
        return
    s.model.eval()
    metrics = a.eval_fn(s.model)
    s.model.train()
    if a.log_fn is not None:
        a.log_fn(metrics, s.step)


def _snapshot(a: _Args, s: _LoopState) -> None:
    """``snapshot_fn`` on the EMA module in eval mode, which is then put back in the mode it was in."""
    module = s.ema.module
    was_training = module.training
    module.eval()
    a.snapshot_fn(module, s.step)
    module.train(was_training)
