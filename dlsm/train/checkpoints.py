"""Checkpoints and EMA weights: atomic writes, one-line errors for bad files and a full disk, strict loading.

A checkpoint is a dict ``{step, model, ema, optimizer, generator, device, base_lrs, warmup}`` written
by :func:`dlsm.train.loop.train` every ``train.ckpt_every`` steps; :func:`load_ema_weights` reuses the
EMA network of a finished stage (NCSNv2 Technique 5).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dlsm.errors import CheckpointError
from dlsm.files import write_atomic

__all__ = ["ema_model", "load_checkpoint", "load_ema_weights", "load_into", "restore_generator", "save_checkpoint"]


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """Exponential moving average of the weights and buffers (NCSNv2 Technique 5)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` atomically: a temporary file in the same folder, fsync, then rename over ``path``
    (:func:`dlsm.files.write_atomic`). A full disk leaves the previous checkpoint as it was and raises a one-line
    :class:`~dlsm.errors.DiskFullError` naming the folder and the space needed."""
    write_atomic(path, lambda f: torch.save(state, f))


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


def load_into(module: nn.Module, weights: dict, path: Path, what: str) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match the {what}: {first}") from None


def restore_generator(gen: torch.Generator, state: dict, path: Path) -> None:
    try:
        gen.set_state(state["generator"])
    except (RuntimeError, TypeError, ValueError):
        was = state.get("device", "cpu")  # checkpoints written before train.device existed were all CPU runs
        raise CheckpointError(
            f"checkpoint {path} holds the random-number state of a {was} run, which a {gen.device.type} "
            f"generator cannot continue; set train.device to {was!r} to resume it, or relaunch with --fresh"
        ) from None


def load_ema_weights(module: nn.Module, path: str | os.PathLike, *, decay: float = 0.999) -> nn.Module:
    """Load the EMA weights of a dlsm checkpoint into ``module`` (for reuse of a finished stage)."""
    path = Path(path)
    state = load_checkpoint(path)
    ema = ema_model(module, decay)
    load_into(ema, state["ema"], path, "EMA model")
    ema.module.eval()
    return ema.module
