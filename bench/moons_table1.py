"""Table 1 end to end for one classifier shape: ``gin/moons_table1.gin`` launched fresh in a scratch folder.

    python bench/moons_table1.py [--shape branch|mlp] [--gin_param BINDING ...]

Prints the wall time of the whole launch (process start to exit, imports included) and the time
of each stage as the run logged it. Issue 4's target on 2 CPU cores is 5 minutes per shape.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"branch": "@BranchClassifier", "mlp": "@ClassifierMLP"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="branch")
    p.add_argument("--gin_param", action="append", default=[])
    args = p.parse_args()
    params = [f"experiment.classifier = {{'{args.shape}': {SHAPES[args.shape]}}}", *args.gin_param]
    cmd = [sys.executable, "-m", "dlsm.launch", "--gin", str(ROOT / "gin" / "moons_table1.gin")]
    cmd += [x for b in params for x in ("--gin_param", b)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory(prefix="dlsm-bench-") as cwd:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"launch failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    stages = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("time/")]
    print(f"Table 1, classifier shape {args.shape!r}, {os.cpu_count()} CPU cores: {wall:.1f} s end to end "
          f"({wall / 60:.2f} min; target 5 min)")
    for name, value in stages:
        print(f"  {name.removeprefix('time/').removesuffix('_s'):<24} {float(value):7.1f} s")


if __name__ == "__main__":
    main()
