"""The sampling stage with 1 and with 2 processes (torchrun, gloo on the CPU), side by side in one run.

    python bench/sampling_procs.py                      # digits32's networks, 2 per class, 20 PC levels
    python bench/sampling_procs.py --levels 100 --per-class 4

Trains ``gin/digits32.gin``'s networks (its widths) for a few steps once, then samples from them twice, from the
same MLflow runs (``experiment.stage1_run_id`` / ``stage2_run_id``): with one process and with ``torchrun
--nproc_per_node 2``, each process on ``--threads`` threads (default 1: the two processes then use this machine's
two cores). Prints each sampling stage's wall time (``time/sampling_s``), the speed-up against the ideal 2x, and
whether the ``samples-*.npz`` are byte-identical (they must be: a unit's images depend on the unit alone).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cwd: Path, params: list[str], *, procs: int, threads: int) -> dict[str, float]:
    head = [sys.executable, "-m", "dlsm.launch"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
        "--master_port", str(_port()), "-m", "dlsm.launch"]
    cmd = head + ["--gin", str(ROOT / "gin" / "digits32.gin")] + [x for p in params for x in ("--gin_param", p)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "DLSM_TEST_THREADS": str(threads),
           "MLFLOW_DISABLE_TELEMETRY": "true", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"launch failed ({' '.join(cmd[:6])} ...):\n{proc.stderr[-3000:]}")
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("time/"):
            out[parts[0]] = float(parts[1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, default=20, help="PC levels (digits32.gin: 100)")
    p.add_argument("--per-class", type=int, default=2, help="samples per class and method (digits32.gin: 20)")
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    args = p.parse_args()
    cwd = Path(tempfile.mkdtemp(prefix="dlsm-bench-"))
    common = [f"NUM_LEVELS = {args.levels}", f"N_PER_CLASS = {args.per_class}", "SCORE_ITERS = 20",
              "CLASSIFIER_ITERS = 10", "score/train.warmup = 0",
              "experiment.stages = [@train_score_model, @train_classifiers, @sample]"]
    launch(cwd, [*common, "experiment.stop_after = 'stage2'", "experiment.workdir = '.dlsm-train'"], procs=1,
           threads=args.threads)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    (run,) = c.search_runs([c.get_experiment_by_name("digits32").experiment_id],
                           filter_string="tags.`dlsm.kind` = 'parent'")
    reuse = [f"experiment.stage1_run_id = '{run.info.run_id}'", f"experiment.stage2_run_id = '{run.info.run_id}'"]
    times = {}
    for procs in (1, 2):
        t = launch(cwd, [*common, *reuse, f"experiment.workdir = '.dlsm-{procs}'"], procs=procs, threads=args.threads)
        times[procs] = t["time/sampling_s"]
    def npz(procs: int, method: str) -> bytes:
        return next((cwd / f".dlsm-{procs}").glob(f"*/*/samples-{method}.npz")).read_bytes()

    same = all(npz(1, m) == npz(2, m) for m in ("base", "scaling", "ours"))
    n = 3 * 10 * args.per_class
    print(f"digits32 networks, {args.levels} PC levels, {n} images (3 methods x 10 classes x {args.per_class}), "
          f"{args.threads} thread(s) per process")
    print("| processes | sampling wall (s) | images/s | speed-up | ideal |\n|---|---|---|---|---|")
    for procs in (1, 2):
        print(f"| {procs} | {times[procs]:.1f} | {n / times[procs]:.2f} | {times[1] / times[procs]:.2f}x | "
              f"{procs}.00x |")
    print(f"samples-*.npz byte-identical for 1 and 2 processes: {same}")


if __name__ == "__main__":
    main()
