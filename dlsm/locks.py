"""Exclusive locks for what two processes must not do at once: train into the same checkpoint folder, or create the
same MLflow sqlite store.

A lock is an OS file lock (``filelock``: ``flock`` on Linux) on ``<path>``: the kernel drops it when its process
ends, however it ends, so a lock left by a killed process (kill -9, a lost node) is free again and is taken over
without a flag. Beside it, ``<path>.json`` names the holder (pid, host, start time) for the one-line message that a
second process prints; a clean exit removes it, so finding it when taking the lock means the last holder died, and
that is said in one line. Within one process a lock is re-entrant (a sweep driver holds the lock of its shared
stages while :func:`dlsm.experiment.run_experiment` takes it again).

On a shared folder across hosts the lock holds only where the file system passes ``flock`` between hosts (NFSv4,
Lustre with ``flock``); elsewhere use one ``experiment.workdir`` per host.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from dlsm.errors import LockedError

__all__ = ["exclusive", "holder"]

_depth: dict[str, int] = {}  # locks this process holds: path -> re-entry depth


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, as the message shows it: 'pid 123 on host h since 2026-12-04 13:05:09'."""
    try:
        info = json.loads(Path(f"{path}.json").read_text())
        return f"pid {info['pid']} on host {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


def _write_holder(path: Path) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = Path(f"{path}.json.{os.getpid()}")
    tmp.write_text(json.dumps(info))
    tmp.replace(f"{path}.json")


@contextlib.contextmanager
def exclusive(
    path: str | os.PathLike, *, what: str, hint: str = "", wait: bool = False,
    say: Callable[[str], None] = print,
) -> Iterator[None]:
    """Hold the lock at ``path`` for the ``with`` block.

    Taken: :class:`~dlsm.errors.LockedError` in one line ('<what> is in use by <holder>; <hint>'), or with ``wait``
    one line through ``say`` and a wait until it is free. A lock whose holder died is taken over with one line."""
    path = Path(path).absolute()
    key = str(path)
    if key in _depth:  # re-entry in this process
        _depth[key] += 1
        try:
            yield
        finally:
            _depth[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise LockedError(f"{what} is in use by {holder(path)}; {hint}".rstrip("; ")) from None
        say(f"dlsm: {what} is in use by {holder(path)}; waiting for it")
        lock.acquire()
    try:
        if Path(f"{path}.json").exists():  # the last holder did not release it: it was killed
            say(f"dlsm: taking over {what} from {holder(path)}, which ended without releasing it")
        _write_holder(path)
        _depth[key] = 1
        try:
            yield
        finally:
            del _depth[key]
            Path(f"{path}.json").unlink(missing_ok=True)
    finally:
        lock.release()
