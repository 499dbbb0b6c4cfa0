"""Ranks, devices and seeds of a multi-process run, in one small place.

``torchrun --nproc_per_node N -m dlsm.launch --gin FILE`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment; :func:`init` (called by :mod:`dlsm.launch`) joins them in one process
group (backend ``cpu:gloo,cuda:nccl``: gloo for CPU tensors and Python objects, NCCL for CUDA tensors, so a
gin file that pins the CPU also runs under torchrun on a GPU machine) and makes ``cuda:LOCAL_RANK`` each
process's current GPU, which ``device.name = 'auto'`` or ``'cuda'`` then resolves to. A plain
``python -m dlsm.launch`` (or any code that never calls :func:`init`) is a world of one: the same code path
with no process group, where every helper here is the identity or a no-op, so one-process numbers are those of
a program that knows nothing of ranks.

Who does what, everywhere in dlsm:

- Training stages run on every rank in lockstep (:func:`dlsm.train.loop.train`): ``train.batch_size`` is the
  *global* batch; every rank draws the whole batch (indices, flips, sigmas, noise) from the same generator,
  exactly as one process would, and keeps its own slice of it (:func:`shard`): that slice is the rank's data
  shard. Gradients are averaged across ranks by DistributedDataParallel (:func:`wrap`), so N processes give
  the numbers of one process with the same gin file, up to float rounding.
- Rank 0 alone talks to MLflow (the other ranks hold a :class:`dlsm.tracking.NullTracker`) and writes
  checkpoints and files. Decisions taken on rank 0 (resume which run, is a stage finished, where a checkpoint was
  downloaded) reach the other ranks through :func:`from_main` / :func:`share`. Every rank reads the checkpoints
  rank 0 writes, so ``experiment.workdir`` must be shared (one machine, or a shared file system).
- Sampling runs on every rank, each drawing its share of the units; evaluation and figures run on rank 0 alone
  (:func:`dlsm.experiment.run_experiment`).
- Errors: one found on rank 0 in work it does for all (:func:`from_main`) or in work the ranks do apart
  (:func:`settle`) is raised on every rank at the same point, so every rank stops together and rank 0 prints it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from dlsm.errors import ConfigError

__all__ = [
    "any_rank", "barrier", "cleanup", "from_main", "init", "is_main", "local_rank", "main_first", "mean", "rank",
    "rank_seed", "settle", "share", "shard", "world_size", "wrap",
]

T = TypeVar("T")
GRACE_S = 30.0  # how long a rank leaving on an error waits for the others (see cleanup)
_control: dist.ProcessGroup | None = None  # a gloo group for leaving together, with a short timeout


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def init(timeout: timedelta | None = None) -> None:
    """Join the process group that torchrun's ``WORLD_SIZE`` > 1 announces (no-op for one process or when
    already joined). On a CUDA machine the current device becomes ``cuda:LOCAL_RANK`` first (if that GPU exists;
    :func:`dlsm.train.device.resolve_device` refuses CUDA to a process without a GPU of its own). Needs torchrun's
    ``MASTER_ADDR``/``MASTER_PORT`` (or another ``env://`` rendezvous)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available() and _env_int("LOCAL_RANK", 0) < torch.cuda.device_count():
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend=backend, rank=_env_int("RANK", 0), world_size=world, **kwargs)
    global _control
    _control = dist.new_group(backend="gloo", timeout=timedelta(seconds=GRACE_S))


def cleanup(*, failed: bool = False) -> None:
    """Leave the process group (``destroy_process_group``); no-op without one. Call it on every way out: a
    process that exits with its group alive aborts (SIGABRT).

    ``failed``: this rank leaves on an error (a user error, a NaN loss, Ctrl-C: every rank raises it together).
    Every rank then first waits, at most ``GRACE_S`` seconds, until all have got here, because torchrun stops every
    process as soon as one has exited with an error, which could cut rank 0 short while it prints the error and
    closes its MLflow run. (An error on one rank alone, which :func:`from_main` or :func:`settle` did not share,
    costs that wait, then torchrun stops the others.)"""
    global _control
    if not dist.is_initialized():
        return
    if failed and _control is not None:
        try:
            dist.barrier(group=_control)
        except Exception:  # noqa: BLE001  (a rank gone or out of step: leave anyway)
            pass
    _control = None
    dist.destroy_process_group()


def world_size() -> int:
    """How many processes train together: 1 unless :func:`init` joined a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the group, 0 for one process."""
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``, its GPU), 0 for one process."""
    return _env_int("LOCAL_RANK", 0) if dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the rank that tracks in MLflow, writes files and prints."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here; no-op for one process."""
    if world_size() > 1:
        dist.barrier()


def share(value: T | None) -> T:
    """Rank 0's ``value`` on every rank (a picklable object; the others pass anything, e.g. None)."""
    if world_size() == 1:
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def _survives_pickling(err: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(err))
        return True
    except Exception:
        return False


def _picklable(err: BaseException) -> BaseException:
    """``err``, to be sent to the other ranks. An error raised inside a gin configurable is gin's proxy, a class made
    on the fly that pickle cannot find: it is sent as the class it stands for, with its first line (the line that
    :func:`dlsm.errors.print_error` prints). Anything else that does not pickle becomes a RuntimeError naming it."""
    if _survives_pickling(err):
        return err
    base = type(err).__mro__[1]
    if base.__name__ == type(err).__name__:  # gin's ExceptionProxy takes the name of the class it subclasses
        try:
            copy = base(str(err).splitlines()[0])
        except Exception:
            copy = None
        if copy is not None and _survives_pickling(copy):
            return copy
    return RuntimeError(f"on rank {rank()}: {type(err).__name__}: {err}")


def from_main(fn: Callable[[], T]) -> T:
    """Call ``fn()`` on rank 0 only; every rank returns its result, or raises the exception it raised (so a user
    error found on rank 0, e.g. a missing MLflow run, stops every rank with the same one-line message instead of
    leaving them waiting). For one process: ``fn()``."""
    if world_size() == 1:
        return fn()
    outcome: tuple[bool, object] | None = None
    if is_main():
        try:
            outcome = (True, fn())
        except BaseException as err:  # KeyboardInterrupt too: every rank stops
            outcome = (False, _picklable(err))
    ok, value = share(outcome)
    if not ok:
        raise value
    return value


def settle(error: BaseException | None) -> None:
    """Every rank says whether its own work failed (``error``, or None); if any did, every rank raises the error of
    the lowest rank that failed, so rank 0 prints it even when another rank's disk filled up, and every rank leaves
    together instead of waiting for one that is gone. A collective: every rank must call it at the same point, after
    work the ranks do apart (drawing their sampling units, reading a file rank 0 wrote). For one process: ``error``
    is raised if there is one."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    errors: list[BaseException | None] = [None] * world_size()
    dist.all_gather_object(errors, None if error is None else _picklable(error))
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise error if error is not None and first is errors[rank()] else first


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then on the other ranks (a dataset that rank 0 downloads and the others then read);
    an exception on rank 0 is raised on every rank."""
    box: list[T] = []
    from_main(lambda: box.append(fn()))
    return box[0] if box else fn()


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True when ``flag`` is true on any rank (a NaN loss, a Ctrl-C): every rank then takes the same branch.
    A collective: every rank must call it at the same point. For one process: ``bool(flag)``."""
    if world_size() == 1:
        return bool(flag)
    t = torch.as_tensor(flag).detach().reshape(()).to(torch.int32)  # stays on its device (NCCL or gloo)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (a new tensor; a collective). For one process: ``value`` itself."""
    if world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def shard(batch_size: int, what: str = "train.batch_size") -> slice:
    """This rank's slice ``[rank * b, (rank + 1) * b)`` of a global batch of ``batch_size``, b = batch_size / world
    (``slice(0, batch_size)`` for one process). A batch that does not split evenly is a ConfigError."""
    world = world_size()
    if batch_size % world:
        raise ConfigError(f"{what} = {batch_size} is the global batch and must split evenly across the {world} "
                          f"processes; make it a multiple of {world}")
    b = batch_size // world
    return slice(rank() * b, (rank() + 1) * b)


def rank_seed(seed: int) -> int:
    """A seed for what each rank must draw differently (dropout masks): ``seed`` on rank 0, so one process keeps
    its numbers, and ``seed + 1_000_003 * rank`` on the others."""
    return seed + 1_000_003 * rank()


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel for a world > 1 (gradients averaged across ranks during backward,
    rank 0's parameters and buffers broadcast at the start, its buffers at every forward); ``model`` itself for
    one process. The model must already be on its device (``cuda:LOCAL_RANK`` or the CPU).

    Default DDP settings: ``find_unused_parameters=False`` and ``static_graph=False``. Checked on CPU/gloo with
    DLSM' and Total (double backward through ``torch.autograd.grad(..., create_graph=True)``): the inner
    ``autograd.grad`` w.r.t. the input runs no gradient hooks, the outer ``backward`` reduces every gradient once,
    and ranks stay identical. ``static_graph=True`` is wrong with double backward (ranks drift apart): not used.
    BatchNorm layers are not converted to SyncBatchNorm (it has no double backward, and no CPU kernels): each
    rank normalises its own shard in training mode, with rank 0's running statistics.
    """
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)
