"""Where tensors live and where random numbers come from: one small place for the device and the generators.

Gin files choose the experiment's device with ``device.name = 'auto'`` (CUDA when a GPU is visible, else
the CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``. Every random stream of dlsm is a ``torch.Generator`` made
by :func:`make_generator` on the device where its numbers are used, so sampling and training draw their
noise there, without host round trips; on the CPU the streams are those of ``torch.Generator().manual_seed``.
"""

from __future__ import annotations

import os
import re
import sys

import gin
import torch

from dlsm.errors import ConfigError
from dlsm.train.distributed import local_rank, world_size

__all__ = ["device", "make_generator", "resolve_device"]

_NAME = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch.device named by ``name``: ``'auto'`` (CUDA when available, else CPU), ``'cpu'``, ``'cuda'``
    or ``'cuda:N'``; a torch.device is checked the same way.

    CUDA devices come back with their index (``'cuda'`` -> ``cuda:<current device>``), so that they compare
    equal to ``tensor.device``. Asking for CUDA without a visible GPU, for a GPU index that does not exist,
    or for an unknown name is a one-line ConfigError. Under torchrun (:mod:`dlsm.train.distributed`) the current device
    is ``cuda:LOCAL_RANK``, so ``'auto'`` and ``'cuda'`` give each process its own GPU; ``'cuda:N'`` naming
    another GPU than the process's own is a ConfigError there.
    """
    text = str(name).strip().lower() if isinstance(name, (str, torch.device)) else None
    match = _NAME.fullmatch(text) if text is not None else None
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise ConfigError(f"device = {name!r} is not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
        if kind == "cpu":
            _say_cpu_fallback()
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device = {name!r} but no CUDA GPU is visible (torch.cuda.is_available() is False); "
            "use device = 'auto' or 'cpu'"
        )
    count = torch.cuda.device_count()
    if world_size() > 1 and local_rank() >= count:
        raise ConfigError(f"device = {name!r} but torchrun runs this process as LOCAL_RANK={local_rank()} and only "
                          f"{count} CUDA GPU(s) are visible; lower --nproc_per_node to {count} (one process per GPU)")
    i = torch.cuda.current_device() if index is None else int(index)
    if i >= count:
        raise ConfigError(f"device = {name!r} but only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    if index is not None and world_size() > 1 and i != local_rank():
        raise ConfigError(f"device = {name!r} names one GPU, but torchrun runs {world_size()} processes, one per GPU; "
                          "use device = 'auto' or 'cuda' (process k then uses cuda:k)")
    return torch.device("cuda", i)


_SAID: set[str] = set()


def _say_cpu_fallback() -> None:
    """One line, once per process, when GPUs were assigned (``CUDA_VISIBLE_DEVICES``, e.g. by Ray for a trial with
    ``sweep.gpus_per_trial``) but torch sees none: ``'auto'`` runs on the CPU instead of failing."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible and visible not in _SAID:
        _SAID.add(visible)
        print(f"dlsm: device 'auto': CUDA_VISIBLE_DEVICES={visible} but torch sees no CUDA GPU (a CPU build, no "
              "driver, or logical GPUs); running on the CPU", file=sys.stderr)


@gin.configurable
def device(name: str = "auto") -> torch.device:
    """The experiment's device, bound in gin as ``device.name = 'auto'`` (see :func:`resolve_device`)."""
    return resolve_device(name)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``: ``torch.Generator(device).manual_seed(seed)``.

    On the CPU its stream is that of ``torch.Generator().manual_seed(seed)``; CUDA generators (Philox) give
    other numbers for the same seed, reproducibly on the same GPU model and PyTorch version.
    """
    return torch.Generator(device=resolve_device(device)).manual_seed(seed)
