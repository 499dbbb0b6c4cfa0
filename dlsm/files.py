"""Atomic file writes that turn a full disk into one line.

:func:`write_atomic` writes through a temporary file in the target's folder, fsyncs it, then renames it over the
target, so a write that fails (a full disk, a quota, Ctrl-C) leaves the previous file byte-identical. A write that
fails with ``ENOSPC`` or ``EDQUOT`` (also when a library such as ``torch.save`` wraps it in another error) removes
the temporary file and raises :class:`~dlsm.errors.DiskFullError`, whose one line names the folder, the space the
file needs and the space free now. Every other error is re-raised unchanged.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dlsm.errors import DiskFullError

__all__ = ["copy_atomic", "disk_full_cause", "full_disk_error", "serialized_size", "write_atomic"]

FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _open(fd: int) -> BinaryIO:
    """The temporary file as a binary file object (the tests replace this to simulate a full disk)."""
    return os.fdopen(fd, "wb")


class _Counter(io.RawIOBase):
    """A seekable sink that keeps no bytes, only the size of what a writer would leave in a file."""

    def __init__(self) -> None:
        self.pos = self.size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        self.pos += n
        self.size = max(self.size, self.pos)
        return n

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = offset + (0, self.pos, self.size)[whence]
        return self.pos


def serialized_size(write: Callable[[BinaryIO], None]) -> int:
    """How many bytes ``write(f)`` writes into a file, found by writing into a sink that keeps nothing."""
    sink = _Counter()
    write(sink)  # type: ignore[arg-type]
    return sink.size


def disk_full_cause(err: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT ``OSError`` behind ``err`` (itself, or in its ``__cause__`` / ``__context__`` chain), or
    None. ``torch.save`` reports a failed ``write`` as a RuntimeError whose context is the OSError."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL:
            return e
        todo += [e.__cause__, e.__context__]
    return None


def _mb(n: int, *, up: bool) -> str:
    """Bytes as MB with one decimal, rounded up (space needed) or down (space free): never "needs 0.0 MB"."""
    tenths = -(-n // 100_000) if up else n // 100_000
    return f"{tenths / 10:.1f} MB"


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it and rename it over ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was. A full disk or quota (ENOSPC,
    EDQUOT) raises :class:`DiskFullError`: ``<reason> writing <name> in <folder> (needs about N MB free, M MB free
    now); free space and relaunch the same command to resume``, N being the size of the file (``write`` is run
    once more into a sink that counts bytes; rounded up to 0.1 MB) and M what ``shutil.disk_usage`` reports once
    the partial file is gone. ``write`` must therefore be callable twice with the same result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with _open(fd) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = disk_full_cause(err)
        if cause is None:
            raise
        raise full_disk_error(cause, f"writing {path.name} in", path.parent, serialized_size(write)) from err


def full_disk_error(cause: OSError, doing: str, folder: str | os.PathLike, needed: int | None) -> DiskFullError:
    """The one line of a full disk: ``<reason> <doing> <folder> (needs about N MB free, M MB free now); free space
    and relaunch the same command to resume``; without ``needed`` (bytes), only the free space is given. The free
    space is that of ``folder`` or of its nearest existing parent."""
    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = _mb(shutil.disk_usage(where).free, up=False)
    room = f"needs about {_mb(needed, up=True)} free, {free} free now" if needed is not None else f"{free} free now"
    return DiskFullError(f"{FULL[cause.errno]} {doing} {folder} ({room}); free space and relaunch the same command "
                         "to resume")


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file ``src`` to ``dst`` with :func:`write_atomic`: a full disk never leaves a truncated ``dst``."""

    def write(f: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)

    write_atomic(dst, write)
