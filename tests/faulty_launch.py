"""``python -m dlsm.launch`` with a fault on one rank: the script that the multi-process tests of a full disk and of
a lost MLflow store give torchrun (``torchrun ... tests/faulty_launch.py --gin FILE ...``).

A full disk, set by the environment:
- ``DLSM_FULL_RANK``: the rank (torchrun's ``RANK``, 0 for one process) whose disk fills up;
- ``DLSM_FULL_FILE``: an ``fnmatch`` pattern of the file names whose writes fail (``score.pt``, ``c*-b*.pt``);
- ``DLSM_FULL_AFTER``: how many writes of such files succeed first (default 0).
The fault is the one of tests/test_disk_full.py (:class:`FullDiskFile`, which it imports from here), at the same
level: the temporary file that :func:`dlsm.files.write_atomic` writes into takes 1,000 bytes and then raises
``OSError(ENOSPC)``.

``DLSM_EXITS``: a folder where each rank that returns from ``dlsm.launch`` by itself writes its exit code
(file ``rank<N>``); a rank that torchrun stopped, or that died of an uncaught exception, writes nothing.

A lost store: ``DLSM_LOSE_STORE_IN`` names a stage; from the first metrics or params that rank 0 sends in it,
``MlflowClient.log_batch`` raises ``ConnectionError``, as a server gone for good does once MLflow's retries give up.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import sys
from pathlib import Path


class FullDiskFile:
    """A real temporary file on a disk with ``room`` bytes left: the write that crosses it writes what fits, then
    raises ENOSPC (or ``err``) like the kernel does. At close, what the file holds is appended to ``seen``."""

    def __init__(self, f, room: int, err: int = errno.ENOSPC, seen: list[bytes] | None = None) -> None:
        self.f, self.room, self.err, self.seen = f, room, err, seen

    def write(self, b) -> int:
        data = bytes(memoryview(b).cast("B"))
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(self.err, os.strerror(self.err))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name: str):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.seen is not None:
            self.f.flush()
            self.seen.append(Path(f"/proc/self/fd/{self.f.fileno()}").read_bytes())
        self.f.close()


def fill_disk() -> None:
    """Make :func:`dlsm.files._open` fail as a full disk does on the rank and files the environment names."""
    from dlsm import files

    if os.environ.get("RANK", "0") != os.environ.get("DLSM_FULL_RANK"):
        return
    pattern, left = os.environ["DLSM_FULL_FILE"], [int(os.environ.get("DLSM_FULL_AFTER", "0"))]
    real_open = files._open

    def _open(fd: int):
        tmp = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))  # <name>.<random>.tmp beside the file
        if not fnmatch.fnmatch(tmp.rsplit(".", 2)[0], pattern):
            return real_open(fd)
        left[0] -= 1
        return real_open(fd) if left[0] >= 0 else FullDiskFile(real_open(fd), room=1000)

    files._open = _open


def lose_store() -> None:
    """Make every ``log_batch`` fail from the stage ``DLSM_LOSE_STORE_IN`` on (it is called on rank 0 alone)."""
    stage = os.environ.get("DLSM_LOSE_STORE_IN")
    if not stage:
        return
    import mlflow
    import requests
    from mlflow.tracking import MlflowClient

    real, lost = MlflowClient.log_batch, []

    def log_batch(self, *args, **kwargs):
        if lost or (mlflow.active_run() and mlflow.active_run().data.tags.get("dlsm.stage") == stage):
            lost.append(True)
            raise requests.exceptions.ConnectionError("Connection refused")
        return real(self, *args, **kwargs)

    MlflowClient.log_batch = log_batch


if __name__ == "__main__":
    fill_disk()
    lose_store()
    from dlsm.launch import main

    code = main(sys.argv[1:])
    if os.environ.get("DLSM_EXITS"):  # how this rank left dlsm.launch, if it left by itself (torchrun kills the rest)
        with open(os.path.join(os.environ["DLSM_EXITS"], f"rank{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(str(code))
    sys.exit(code)
