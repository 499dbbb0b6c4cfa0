"""Sweep overhead: Ray start and per-trial set-up against the trials' own compute.

    python bench/sweep_overhead.py [--values 0.05 0.5 5.0] [--gin_param BINDING ...]

Runs ``tune/sweep_lambda.py`` in-process on a small moons configuration in a scratch folder and
prints, from one run: the shared stage-1 time, Ray's start-up, the wall time of ``Tuner.fit``, the
sum of the trials' own compute (``run_experiment`` inside each trial) and the overhead ratio
fit wall x concurrency / trial compute (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "score/train.n_iters = 1000", "classifier/train.n_iters = 500", "NUM_SCALES = 20", "STEPS_PER_SCALE = 2",
    "sample.n_per_class = 256", "score_error_metrics.n_points = 256", "classifier_metrics.n_points = 512",
    "sweep.cpus_per_trial = 1",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--values", nargs="+", default=["0.05", "0.5", "5.0", "50.0"])
    p.add_argument("--gin_param", action="append", default=[])
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from dlsm.sweep.driver import run_sweep

    os.environ["TQDM_DISABLE"] = "1"
    with tempfile.TemporaryDirectory(prefix="dlsm-bench-") as cwd:
        os.chdir(cwd)
        os.environ["PYTHONPATH"] = str(ROOT)
        res = run_sweep([str(ROOT / "gin" / "moons.gin")], [*SMALL, *args.gin_param], param="LAM",
                        values=args.values, share="stage1")
    t = res.timings
    compute = sum(r["compute_s"] for r in res.rows)
    in_ray = sum(r["ray_s"] for r in res.rows)
    slots = min(len(res.rows), os.cpu_count() or 1)
    print(f"{len(res.rows)} trials on {os.cpu_count()} CPU cores ({slots} at a time), {res.failed} failed")
    print(f"  shared stage 1 (driver)       {t.get('shared_stages_s', 0):7.1f} s")
    print(f"  ray.init                      {t['ray_init_s']:7.1f} s")
    print(f"  Tuner.fit wall                {t['tune_fit_s']:7.1f} s")
    print(f"  trials' own compute (sum)     {compute:7.1f} s   (inside the trial function: {in_ray:.1f} s)")
    print(f"  per-trial set-up              {(in_ray - compute) / len(res.rows):7.1f} s   (gin parse, imports, "
          "stage-1 fetch)")
    print(f"  fit wall x {slots} / compute      {t['tune_fit_s'] * slots / compute:7.2f}x  (1.0 = no overhead)")
    print(f"  whole sweep / trial compute   {t['total_s'] / (compute / slots):7.2f}x")


if __name__ == "__main__":
    main()
