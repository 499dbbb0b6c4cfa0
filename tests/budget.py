"""Fast-failure bounds of subprocess tests.

Timed assertions do not belong in tests (DEVELOPERS.md): how long an experiment file takes under gin/smoke.gin is
measured by bench/smoke_times.py. What stays here is a hang guard for the errors that must be one line and quick
("a bad store is one line, not minutes of retries"): the failure to catch is a child that sleeps between retries,
which costs no CPU, so the bound is on wall time (:attr:`Took.wall_s`), with room for start-up on busy cores:
:data:`FAST_FAIL_S` against the minutes the retries take. The children's CPU time is recorded beside it.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass

FAST_FAIL_S = 60  # a one-line error before any work: start-up only (MLflow's and Ray's retries take minutes)


@dataclass
class Took:
    wall_s: float = 0.0
    cpu_s: float = 0.0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def took() -> Iterator[Took]:
    """``with took() as t: subprocess.run(...)``; then ``t.wall_s`` and ``t.cpu_s`` (the child must have been waited
    for)."""
    t, wall0, cpu0 = Took(), time.perf_counter(), _children_cpu()
    try:
        yield t
    finally:
        t.wall_s, t.cpu_s = time.perf_counter() - wall0, _children_cpu() - cpu0
