"""How long each experiment file takes under gin/smoke.gin, the promise being "well under 3 minutes" on 2 cores.

    python bench/smoke_times.py                      # moons, digits, cifar10, cifar100 (tiny archives written here)
    python bench/smoke_times.py moons.gin digits.gin # some of them

Each file runs as users run it (``python -m dlsm.launch --gin FILE --gin gin/smoke.gin``, a fresh folder, the
machine's default threads), one after another; CIFAR on small archives in the real format (tests/cifar_archives.py),
without Inception weights (smoke.gin binds ``image_features.networks = [@evaluator_network]``). Prints wall and
CPU seconds per file and the ratio to the 180 s budget. The tests do not assert times (tests/budget.py keeps only
fast-failure bounds).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
BUDGET_S = 180.0
RUNNER = ("import os, sys, torchvision.datasets.cifar as c; "
          "c.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath); "
          "from dlsm.launch import main; sys.exit(main(sys.argv[1:]))")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(gin_file: str, folder: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, exit code) of one smoke launch of ``gin_file`` in ``folder``."""
    from cifar_archives import make_cifar10, make_cifar100

    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-c", RUNNER, "--gin", str(ROOT / "gin" / gin_file),
           "--gin", str(ROOT / "gin" / "smoke.gin")]
    if gin_file.startswith("cifar"):
        data = folder / "data"
        if gin_file.startswith("cifar100"):
            make_cifar100(data, n_train=400, n_test=400, balanced=True)
        else:
            make_cifar10(data, per_batch=20, n_test=40, balanced=True)
        env["DATA_ROOT"] = str(data)
    wall0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    return time.perf_counter() - wall0, _children_cpu() - cpu0, proc.returncode


def main(files: list[str]) -> None:
    print(f"{'file':<16} {'wall s':>8} {'CPU s':>8} {'wall / 180 s':>13}  exit")
    for gin_file in files:
        with tempfile.TemporaryDirectory() as tmp:
            wall, cpu, rc = run(gin_file, Path(tmp))
        print(f"{gin_file:<16} {wall:8.1f} {cpu:8.1f} {wall / BUDGET_S:13.2f}  {rc}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["moons.gin", "digits.gin", "cifar10.gin", "cifar100.gin"])
