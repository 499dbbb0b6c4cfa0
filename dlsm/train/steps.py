"""The pieces that :func:`dlsm.train.loop.train` assembles: its arguments checked (:class:`_Args`), the run set up or
resumed from a checkpoint (:func:`_start`: the data and model on the device, the optimizer, EMA and generator in
a :class:`_LoopState`), and one training step (:func:`_train_step`: batch, flips, sigma and noise drawn by
:class:`_Batches` in the documented order, the loss under autocast / torch.compile, backward, clipping, warm-up,
the update and the EMA), with the sigma samplers and the learning-rate warm-up.

These are the loop's own parts, not an API: ``train`` is the entry point, and the periodic work between steps
(logging, ``eval_fn``, snapshots, checkpoint writes, the NaN check, deferred Ctrl-C) stays in
:mod:`dlsm.train.loop`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from dlsm.data.points import LabelledData
from dlsm.errors import ConfigError
from dlsm.math.schedules import NoiseSchedule
from dlsm.train import distributed as dist
from dlsm.train.checkpoints import ema_model, load_checkpoint, load_into, restore_generator
from dlsm.train.device import make_generator, resolve_device

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LogFn = Callable[[dict[str, float], int], None]
SnapshotFn = Callable[[nn.Module, int], None]

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


def warmup_factor(step: int, warmup: int) -> float:
    """Linear learning-rate warm-up: the update with 0-based index ``step`` uses lr * min(1, (step + 1) / warmup).

    After score_sde's ``losses.optimization_manager`` (Song et al., 2021), which sets
    ``lr * np.minimum(step / warmup, 1.0)`` with step counted from 0, so that its first update has lr = 0;
    here the first update has lr / warmup and the full lr is reached at step ``warmup - 1`` (one step earlier).
    ``warmup = 0`` means no warm-up (factor 1).
    """
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


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


@dataclass
class _Args:
    """The arguments of :func:`dlsm.train.loop.train`, checked on construction (in this order, first error raised)
    and with the device resolved (``dev``). The checks return their values unchanged."""

    model: nn.Module
    loss_fn: LossFn
    data: LabelledData
    schedule: NoiseSchedule
    ckpt_path: str | os.PathLike
    seed: int
    stage: str
    n_iters: int
    batch_size: int
    optimizer: Callable[..., torch.optim.Optimizer]
    ema_decay: float
    grad_clip: float | None
    sigma_distribution: str
    ckpt_every: int
    log_every: int
    log_fn: LogFn | None
    eval_fn: Callable[[nn.Module], dict[str, float]] | None
    eval_every: int
    disable_progress: bool | None
    device: str | torch.device
    warmup: int
    autocast: bool
    compile: bool
    flip: bool
    channels_last: bool
    snapshot_every: int
    snapshot_fn: SnapshotFn | None
    dev: torch.device = field(init=False)

    def __post_init__(self) -> None:
        for name in ("n_iters", "batch_size", "ckpt_every", "log_every", "eval_every"):
            _check_positive_int(name, getattr(self, name))
        _check_count("warmup", self.warmup, "no warm-up")
        _check_count("snapshot_every", self.snapshot_every, "no snapshots")
        for name in ("autocast", "compile", "flip", "channels_last"):
            _check_bool(name, getattr(self, name))
        if self.sigma_distribution not in _SIGMA_DISTRIBUTIONS:
            raise ConfigError("train.sigma_distribution must be 'log_uniform' or 'discrete', got "
                              f"{self.sigma_distribution!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        self.dev = resolve_device(self.device)


@dataclass
class _Batches:
    """Where each step's examples come from: the data on the device, read through ``data.batch(idx, flip,
    generator)`` (``batched``) or as ``x_all[idx], y_all[idx]``; ``mine`` is this rank's slice of the global batch."""

    data: LabelledData
    batched: bool
    x_all: torch.Tensor | None
    y_all: torch.Tensor | None
    n_data: int
    mine: slice
    batch_size: int
    flip: bool
    channels_last: bool
    dev: torch.device
    draw_sigma: Callable[[int, torch.Generator | None], torch.Tensor] | None = None

    def draw(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole global batch ``x, y, sigma, noise``, drawn from ``gen`` in the documented order: the batch
        indices, the flip coins (only with ``flip``), sigma, then the noise."""
        idx = torch.randint(0, self.n_data, (self.batch_size,), generator=gen, device=self.dev)
        if self.batched:
            x, y = self.data.batch(idx, flip=self.flip, generator=gen)
        else:
            x, y = self.x_all[idx], self.y_all[idx]
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        sigma = self.draw_sigma(self.batch_size, gen)
        noise = torch.randn(x.shape, generator=gen, device=self.dev)
        return x, y, sigma, noise


def _batches(a: _Args) -> _Batches:
    """The data moved to ``a.dev`` and checked (flips possible, a batch no larger than the data, a batch that the
    ranks can split); the sigma sampler is added by :func:`_start`."""
    data, dev, x_all, y_all = a.data, a.dev, None, None
    batched = callable(getattr(data, "batch", None))
    if batched:
        if data.device != dev:
            data = data.to(dev)
        if a.flip:  # a dataset that cannot flip says so now, not at the first step; draws nothing from the stream
            data.batch(torch.zeros(0, dtype=torch.long, device=dev), flip=True, generator=torch.Generator(dev))
        n_data = len(data)
    else:
        if a.flip:
            raise ConfigError(f"train.flip = True but the {a.stage} data ({type(data).__name__}) have no batch(idx, "
                              "flip=...) method to mirror images with; set train.flip = False")
        x_all, y_all = data.x.to(dev), data.y.to(dev)
        n_data = x_all.shape[0]
    if a.batch_size > n_data:
        raise ConfigError(f"{a.stage}: train.batch_size = {a.batch_size} is larger than the data ({n_data} examples); "
                          "lower the batch size in this stage's scope")
    mine = dist.shard(a.batch_size, f"{a.stage}: train.batch_size")
    return _Batches(data, batched, x_all, y_all, n_data, mine, a.batch_size, a.flip, a.channels_last, dev)


@dataclass
class _LoopState:
    """What the loop carries from step to step: the model (``net`` is what the loss calls: the DDP wrapper, compiled
    with ``train.compile``), optimizer, EMA and generator, the step count, and the loss summed since the last log
    (``running`` over ``count`` steps) with the NaN flag ``bad``, both kept on the device (no sync per step)."""

    model: nn.Module
    net: nn.Module
    opt: torch.optim.Optimizer
    ema: AveragedModel
    gen: torch.Generator
    ckpt_path: Path
    base_lrs: list[float]
    step: int
    running: torch.Tensor
    bad: torch.Tensor
    count: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)


def _start(a: _Args) -> tuple[_Batches, _LoopState]:
    """Data and model on the device, then the optimizer, EMA and generator, restored from ``a.ckpt_path`` if rank 0
    finds it there (every rank loads the file rank 0 wrote)."""
    batches = _batches(a)
    model, dev = a.model, a.dev
    model.to(dev)
    if a.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D weights only; other parameters are unchanged
    if dist.rank():
        torch.manual_seed(dist.rank_seed(a.seed))
    batches.draw_sigma = _sigma_sampler(a.schedule, a.sigma_distribution, dev)

    ckpt_path = Path(a.ckpt_path)
    opt = a.optimizer(model.parameters())
    base_lrs = [float(g["lr"]) for g in opt.param_groups]
    ema = ema_model(model, a.ema_decay)
    gen = make_generator(a.seed, dev)
    step = 0
    if dist.share(ckpt_path.exists()):  # rank 0's answer: every rank loads the file it wrote
        state = load_checkpoint(ckpt_path)
        load_into(model, state["model"], ckpt_path, f"{a.stage} model")
        load_into(ema, state["ema"], ckpt_path, f"{a.stage} EMA model")
        opt.load_state_dict(state["optimizer"])
        restore_generator(gen, state, ckpt_path)
        step = int(state["step"])
        # checkpoints from before train.warmup hold no base rates: their optimizer's rates are the base rates
        base_lrs = list(state.get("base_lrs") or [float(g["lr"]) for g in opt.param_groups])
    ddp = dist.wrap(model)  # the model itself for one process
    net = _compile(ddp) if a.compile else ddp
    running, bad = torch.zeros((), device=dev), torch.zeros((), dtype=torch.bool, device=dev)
    return batches, _LoopState(model, net, opt, ema, gen, ckpt_path, base_lrs, step, running, bad)


def _compile(model: nn.Module) -> nn.Module:
    """``torch.compile(model)``: shares the parameters; only the loss calls it (checkpoints, EMA and eval_fn use
    ``model`` itself)."""
    try:
        return torch.compile(model)
    except Exception as err:  # e.g. an unsupported Python version
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"train.compile = True but torch.compile is unusable here ({type(err).__name__}: "
                          f"{first}); set train.compile = False") from None


def _double_backward_error(err: RuntimeError, compiled: bool, stage: str) -> None:
    """A one-line ConfigError for DLSM' / Total under ``train.compile``: their loss differentiates the classifier's
    input gradient again (create_graph=True), and torch.compile's AOTAutograd has no double backward."""
    if compiled and "double backward" in str(err):
        raise ConfigError(f"{stage}: train.compile = True cannot train a loss that differentiates the network's input "
                          "gradient (DLSM', Total): torch.compile does not support double backward; set "
                          "classifier/train.compile = False (the score model's scope may keep it)") from None


def _compute_loss(a: _Args, net: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """mean(loss_fn(net, x, y, sigma, noise)), under bf16 autocast (averaged in float32) with ``train.autocast``;
    torch.compile failures and double backward under ``train.compile`` are one-line ConfigErrors."""
    amp = torch.autocast(a.dev.type, dtype=torch.bfloat16) if a.autocast else contextlib.nullcontext()
    try:
        with amp:
            per_example = a.loss_fn(net, x, y, sigma, noise)
    except torch._dynamo.exc.TorchDynamoException as err:
        if not a.compile:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"train.compile = True but torch.compile failed on the {a.stage} model on {a.dev} "
                          f"({type(err).__name__}: {first}); set train.compile = False") from None
    except RuntimeError as err:
        _double_backward_error(err, a.compile, a.stage)
        raise
    return per_example.float().mean() if a.autocast else per_example.mean()


def _train_step(a: _Args, s: _LoopState, batches: _Batches) -> None:
    """One update: draw the batch, the loss on this rank's slice, backward, clip, warm-up, step, EMA; the loss is
    added to ``s.running`` and a NaN/Inf to ``s.bad`` (checked by the caller at log and checkpoint steps)."""
    x, y, sigma, noise = batches.draw(s.gen)
    mine = batches.mine
    loss = _compute_loss(a, s.net, x[mine], y[mine], sigma[mine], noise[mine])  # one process: the whole batch
    s.opt.zero_grad(set_to_none=True)
    try:
        loss.backward()
    except RuntimeError as err:
        _double_backward_error(err, a.compile, a.stage)
        raise
    if a.grad_clip is not None:
        nn.utils.clip_grad_norm_(s.model.parameters(), a.grad_clip)
    s.bad |= ~torch.isfinite(loss.detach())
    if a.warmup:
        factor = warmup_factor(s.step, a.warmup)
        for group, base in zip(s.opt.param_groups, s.base_lrs, strict=True):
            group["lr"] = base * factor
    s.opt.step()
    s.ema.update_parameters(s.model)
    s.running += loss.detach()
    s.count += 1
    s.step += 1
