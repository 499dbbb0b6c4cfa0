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
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gin
import torch
from torch import nn
from tqdm.auto import tqdm

from dlsm.data.points import LabelledData
from dlsm.errors import ConfigError, NonFiniteLossError
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
from dlsm.train.device import make_generator, resolve_device

__all__ = [
    "TrainResult",
    "draw_sigmas",
    "ema_model",
    "load_checkpoint",
    "save_checkpoint",
    "train",
    "warmup_factor",
]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LogFn = Callable[[dict[str, float], int], None]
SnapshotFn = Callable[[nn.Module, int], None]

gin.external_configurable(torch.optim.Adam, module="torch.optim")
gin.external_configurable(torch.optim.AdamW, module="torch.optim")
gin.external_configurable(torch.optim.SGD, module="torch.optim")


_SIGMA_DISTRIBUTIONS = ("log_uniform", "discrete")


def _sigma_sampler(
    schedule: NoiseSchedule, distribution: str, device: torch.device
) -> Callable[[int, torch.Generator | None], torch.Tensor]:
    """``draw(n, generator)`` for :func:`draw_sigmas`, with the schedule's numbers read or copied to ``device`` once."""
    if distribution == "log_uniform":
        lo, hi = math.log(schedule.sigma_min), math.log(schedule.sigma_max)

        def draw(n: int, generator: torch.Generator | None) -> torch.Tensor:
            # dlsm.math.schedules.log_uniform_sigmas' formula, with u drawn on ``device``
            u = torch.rand(n, generator=generator, device=device)
            return torch.exp(lo + u * (hi - lo))

        return draw
    if distribution == "discrete":
        levels = schedule.sigmas.to(device)

        def draw(n: int, generator: torch.Generator | None) -> torch.Tensor:
            return levels[torch.randint(0, len(levels), (n,), generator=generator, device=device)]

        return draw
    raise ConfigError(f"train.sigma_distribution must be 'log_uniform' or 'discrete', got {distribution!r}")


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


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
    return value


def _check_count(name: str, value: object, off: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"train.{name} must be a non-negative integer (0 = {off}), got {value!r}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"train.{name} must be True or False, got {value!r}")
    return value


def warmup_factor(step: int, warmup: int) -> float:
    """Linear learning-rate warm-up: the update with 0-based index ``step`` uses lr * min(1, (step + 1) / warmup).

    After score_sde's ``losses.optimization_manager`` (Song et al., 2021), which sets
    ``lr * np.minimum(step / warmup, 1.0)`` with step counted from 0, so that its first update has lr = 0;
    here the first update has lr / warmup and the full lr is reached at step ``warmup - 1`` (one step earlier).
    ``warmup = 0`` means no warm-up (factor 1).
    """
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


def _compile(model: nn.Module) -> nn.Module:
    """``torch.compile(model)``: shares the parameters; only the loss calls it (checkpoints, EMA and eval_fn use
    ``model`` itself)."""
    try:
        return torch.compile(model)
    except Exception as err:  # e.g. an unsupported Python version
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"train.compile = True but torch.compile is unusable here ({type(err).__name__}: "
                          f"{first}); set train.compile = False") from None


DOUBLE_PRESS_S = 1.0  # under torchrun, a second SIGINT sooner than this after the first is the same Ctrl-C


def _double_backward_error(err: RuntimeError, compiled: bool, stage: str) -> None:
    """A one-line ConfigError for DLSM' / Total under ``train.compile``: their loss differentiates the classifier's
    input gradient again (create_graph=True), and torch.compile's AOTAutograd has no double backward."""
    if compiled and "double backward" in str(err):
        raise ConfigError(f"{stage}: train.compile = True cannot train a loss that differentiates the network's input "
                          "gradient (DLSM', Total): torch.compile does not support double backward; set "
                          "classifier/train.compile = False (the score model's scope may keep it)") from None


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
    n_iters = _check_positive_int("n_iters", n_iters)
    batch_size = _check_positive_int("batch_size", batch_size)
    ckpt_every = _check_positive_int("ckpt_every", ckpt_every)
    log_every = _check_positive_int("log_every", log_every)
    eval_every = _check_positive_int("eval_every", eval_every)
    warmup = _check_count("warmup", warmup, "no warm-up")
    snapshot_every = _check_count("snapshot_every", snapshot_every, "no snapshots")
    autocast, compile, flip, channels_last = (
        _check_bool(k, v) for k, v in (("autocast", autocast), ("compile", compile), ("flip", flip),
                                       ("channels_last", channels_last)))
    if sigma_distribution not in _SIGMA_DISTRIBUTIONS:
        raise ConfigError(f"train.sigma_distribution must be 'log_uniform' or 'discrete', got {sigma_distribution!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {ema_decay!r}")
    dev = resolve_device(device)

    batched = callable(getattr(data, "batch", None))
    if batched:
        if data.device != dev:
            data = data.to(dev)
        if flip:  # a dataset that cannot flip says so now, not at the first step; draws nothing from the stream
            data.batch(torch.zeros(0, dtype=torch.long, device=dev), flip=True, generator=torch.Generator(dev))
        n_data = len(data)
    else:
        if flip:
            raise ConfigError(f"train.flip = True but the {stage} data ({type(data).__name__}) have no batch(idx, "
                              "flip=...) method to mirror images with; set train.flip = False")
        x_all, y_all = data.x.to(dev), data.y.to(dev)
        n_data = x_all.shape[0]
    if batch_size > n_data:
        raise ConfigError(f"{stage}: train.batch_size = {batch_size} is larger than the data ({n_data} examples); "
                          "lower the batch size in this stage's scope")
    mine = dist.shard(batch_size, f"{stage}: train.batch_size")
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D weights only; other parameters are unchanged
    if dist.rank():
        torch.manual_seed(dist.rank_seed(seed))
    draw_sigma = _sigma_sampler(schedule, sigma_distribution, dev)

    ckpt_path = Path(ckpt_path)
    opt = optimizer(model.parameters())
    base_lrs = [float(g["lr"]) for g in opt.param_groups]
    ema = ema_model(model, ema_decay)
    gen = make_generator(seed, dev)
    step = 0
    if dist.share(ckpt_path.exists()):  # rank 0's answer: every rank loads the file it wrote
        state = load_checkpoint(ckpt_path)
        load_into(model, state["model"], ckpt_path, f"{stage} model")
        load_into(ema, state["ema"], ckpt_path, f"{stage} EMA model")
        opt.load_state_dict(state["optimizer"])
        restore_generator(gen, state, ckpt_path)
        step = int(state["step"])
        # checkpoints from before train.warmup hold no base rates: their optimizer's rates are the base rates
        base_lrs = list(state.get("base_lrs") or [float(g["lr"]) for g in opt.param_groups])
    ddp = dist.wrap(model)  # the model itself for one process
    net = _compile(ddp) if compile else ddp

    def checkpoint() -> None:
        if not dist.is_main():
            return
        save_checkpoint(
            ckpt_path,
            {
                "step": step,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "device": dev.type,
                "base_lrs": base_lrs,
                "warmup": warmup,
            },
        )

    losses: list[tuple[int, float]] = []
    running, count = torch.zeros((), device=dev), 0
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    def evaluate() -> None:
        if eval_fn is None or not dist.is_main():
            return
        model.eval()
        metrics = eval_fn(model)
        model.train()
        if log_fn is not None:
            log_fn(metrics, step)

    def snapshot() -> None:
        module = ema.module
        was_training = module.training
        module.eval()
        snapshot_fn(module, step)
        module.train(was_training)

    def compute_loss(x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        try:
            with amp:
                per_example = loss_fn(net, x, y, sigma, noise)
        except torch._dynamo.exc.TorchDynamoException as err:
            if not compile:
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            raise ConfigError(f"train.compile = True but torch.compile failed on the {stage} model on {dev} "
                              f"({type(err).__name__}: {first}); set train.compile = False") from None
        except RuntimeError as err:
            _double_backward_error(err, compile, stage)
            raise
        return per_example.float().mean() if autocast else per_example.mean()

    model.train()
    if step == 0:
        evaluate()
    bar = tqdm(total=n_iters, initial=step, desc=stage, disable=disable_progress if dist.is_main() else True,
               leave=False)
    with deferred_interrupt() as interrupted:
        while step < n_iters:
            idx = torch.randint(0, n_data, (batch_size,), generator=gen, device=dev)
            x, y = data.batch(idx, flip=flip, generator=gen) if batched else (x_all[idx], y_all[idx])
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            sigma = draw_sigma(batch_size, gen)
            noise = torch.randn(x.shape, generator=gen, device=dev)
            loss = compute_loss(x[mine], y[mine], sigma[mine], noise[mine])  # one process: the whole batch
            opt.zero_grad(set_to_none=True)
            try:
                loss.backward()
            except RuntimeError as err:
                _double_backward_error(err, compile, stage)
                raise
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            bad |= ~torch.isfinite(loss.detach())
            if warmup:
                factor = warmup_factor(step, warmup)
                for group, base in zip(opt.param_groups, base_lrs, strict=True):
                    group["lr"] = base * factor
            opt.step()
            ema.update_parameters(model)
            running += loss.detach()
            count += 1
            step += 1
            bar.update(1)
            at_log, at_ckpt = step % log_every == 0 or step == n_iters, step % ckpt_every == 0 or step == n_iters
            if at_log or at_ckpt:
                if dist.any_rank(bad):
                    bar.close()
                    last = (step - 1) // ckpt_every * ckpt_every
                    kept = (
                        f"last good checkpoint (step {last}) kept at {ckpt_path}"
                        if ckpt_path.exists()
                        else "no checkpoint was written"
                    )
                    raise NonFiniteLossError(
                        f"{stage}: the loss became NaN or Inf by step {step}; {kept}; "
                        "lower the learning rate or set train.grad_clip"
                    )
            if at_log:
                mean = float(dist.mean(running)) / count
                running.zero_()
                count = 0
                losses.append((step, mean))
                bar.set_postfix(loss=f"{mean:.4g}")
                if log_fn is not None and dist.is_main():
                    log_fn({f"{stage}/loss": mean}, step)
            if at_ckpt:
                checkpoint()
            if step % eval_every == 0 or step == n_iters:
                evaluate()
            if snapshot_fn is not None and snapshot_every and step % snapshot_every == 0 and dist.is_main():
                snapshot()
            if dist.any_rank(interrupted()):  # keep this step's work; stop where MLflow can be closed cleanly
                bar.close()
                if not dist.any_rank(bad):
                    checkpoint()
                raise KeyboardInterrupt
    bar.close()
    model.eval()
    ema.module.eval()
    return TrainResult(model=model, ema=ema.module, step=step, losses=losses)
