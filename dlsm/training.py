"""The training loop shared by both stages: EMA, atomic resumable checkpoints, NaN guard, progress bar.

One ``train`` configurable serves both stages through gin scopes (``score/train.n_iters``,
``classifier/train.n_iters``). The loss is a closure ``loss_fn(model, x, y, sigma, noise)``
returning a per-example loss; the trainer draws the batch, sigma and noise from its own generator,
whose state is checkpointed, so an interrupted run resumes on the same random stream.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gin
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from dlsm.data import LabelledData
from dlsm.errors import CheckpointError, ConfigError, NonFiniteLossError
from dlsm.schedules import NoiseSchedule, log_uniform_sigmas

__all__ = ["TrainResult", "ema_model", "load_checkpoint", "save_checkpoint", "train"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LogFn = Callable[[dict[str, float], int], None]

gin.external_configurable(torch.optim.Adam, module="torch.optim")
gin.external_configurable(torch.optim.AdamW, module="torch.optim")
gin.external_configurable(torch.optim.SGD, module="torch.optim")


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """Exponential moving average of the weights and buffers (NCSNv2 Technique 5)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` atomically: a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True``; any failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or not a torch file
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}); delete it or relaunch with --fresh"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a dlsm checkpoint (no 'model' entry)")
    return state


def _load_into(module: nn.Module, weights: dict, path: Path, what: str) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match the {what}: {first}") from None


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


@gin.configurable(
    denylist=["model", "loss_fn", "data", "schedule", "ckpt_path", "log_fn", "seed", "stage", "eval_fn"]
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
) -> TrainResult:
    """Minimise mean(loss_fn(model, x, y, sigma, noise)) over minibatches; resume from ``ckpt_path``.

    sigma is drawn log-uniformly on [sigma_min, sigma_max] (``sigma_distribution='log_uniform'``)
    or uniformly from the discrete ``schedule.sigmas`` (``'discrete'``).
    A NaN/Inf loss stops training with NonFiniteLossError; the last good checkpoint is left in place.
    ``eval_fn(model)`` (if given) runs at step 0 and every ``eval_every`` steps on the weights being
    trained (not the EMA), in eval mode; its metrics go to ``log_fn`` at that step (training curves).
    """
    n_iters = _check_positive_int("n_iters", n_iters)
    batch_size = _check_positive_int("batch_size", batch_size)
    ckpt_every = _check_positive_int("ckpt_every", ckpt_every)
    log_every = _check_positive_int("log_every", log_every)
    eval_every = _check_positive_int("eval_every", eval_every)
    if sigma_distribution not in ("log_uniform", "discrete"):
        raise ConfigError(f"train.sigma_distribution must be 'log_uniform' or 'discrete', got {sigma_distribution!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {ema_decay!r}")

    ckpt_path = Path(ckpt_path)
    opt = optimizer(model.parameters())
    ema = ema_model(model, ema_decay)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        _load_into(model, state["model"], ckpt_path, f"{stage} model")
        _load_into(ema, state["ema"], ckpt_path, f"{stage} EMA model")
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step = int(state["step"])

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_path,
            {
                "step": step,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
            },
        )

    x_all, y_all = data.x, data.y
    sigmas = schedule.sigmas
    losses: list[tuple[int, float]] = []
    running, count = torch.zeros(()), 0
    bad = torch.zeros((), dtype=torch.bool)
    def evaluate() -> None:
        if eval_fn is None:
            return
        model.eval()
        metrics = eval_fn(model)
        model.train()
        if log_fn is not None:
            log_fn(metrics, step)

    model.train()
    if step == 0:
        evaluate()
    bar = tqdm(total=n_iters, initial=step, desc=stage, disable=disable_progress, leave=False)
    while step < n_iters:
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        if sigma_distribution == "log_uniform":
            sigma = log_uniform_sigmas(batch_size, schedule.sigma_min, schedule.sigma_max, generator=gen)
        else:
            sigma = sigmas[torch.randint(0, len(sigmas), (batch_size,), generator=gen)]
        noise = torch.randn(x.shape, generator=gen)
        loss = loss_fn(model, x, y, sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        bad |= ~torch.isfinite(loss.detach())
        opt.step()
        ema.update_parameters(model)
        running += loss.detach()
        count += 1
        step += 1
        bar.update(1)
        at_log, at_ckpt = step % log_every == 0 or step == n_iters, step % ckpt_every == 0 or step == n_iters
        if at_log or at_ckpt:
            if bool(bad):
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
            mean = float(running) / count
            running.zero_()
            count = 0
            losses.append((step, mean))
            bar.set_postfix(loss=f"{mean:.4g}")
            if log_fn is not None:
                log_fn({f"{stage}/loss": mean}, step)
        if at_ckpt:
            checkpoint()
        if step % eval_every == 0 or step == n_iters:
            evaluate()
    bar.close()
    model.eval()
    ema.module.eval()
    return TrainResult(model=model, ema=ema.module, step=step, losses=losses)


def load_ema_weights(module: nn.Module, path: str | os.PathLike, *, decay: float = 0.999) -> nn.Module:
    """Load the EMA weights of a dlsm checkpoint into ``module`` (for reuse of a finished stage)."""
    path = Path(path)
    state = load_checkpoint(path)
    ema = ema_model(module, decay)
    _load_into(ema, state["ema"], path, "EMA model")
    ema.module.eval()
    return ema.module
