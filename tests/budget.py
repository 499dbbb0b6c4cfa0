"""Time budgets of subprocess tests that hold on a busy machine.

A budget in a test is a promise to users, not a benchmark (benchmarks live in bench/).

- Work ("any experiment file runs under gin/smoke.gin in well under 3 minutes"): measured as wall time alone it
  fails when another pytest-xdist worker or job shares the two cores, and as CPU time alone it doubles when the
  child runs two threads. So it is checked on the smaller of the two (:attr:`Took.seconds`): load inflates the wall
  time, threads inflate the CPU time (user + system of the children this process waited for), and neither makes the
  other smaller than it would be on an idle machine.
- Failing fast ("a bad store is one line, not minutes of retries"): the failure to catch is a child that sleeps
  between retries, which costs no CPU, so this is wall time (:attr:`Took.wall_s`), with room for start-up on busy
  cores: :data:`FAST_FAIL_S` against the minutes the retries take.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass

SMOKE_S = 180  # gin/smoke.gin: every experiment file in well under 3 minutes, start-up included
FAST_FAIL_S = 60  # a one-line error before any work: start-up only (MLflow's and Ray's retries take minutes)


@dataclass
class Took:
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def seconds(self) -> float:
        """What a budget is checked on: min(wall, children's CPU)."""
        return min(self.wall_s, self.cpu_s)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def took() -> Iterator[Took]:
    """``with took() as t: subprocess.run(...)``; then ``t.seconds`` (the child must have been waited for)."""
    t, wall0, cpu0 = Took(), time.perf_counter(), _children_cpu()
    try:
        yield t
    finally:
        t.wall_s, t.cpu_s = time.perf_counter() - wall0, _children_cpu() - cpu0
