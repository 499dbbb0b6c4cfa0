"""Stage-2 step cost: DLSM' and Total against CE on the same classifier, batch and score model.

    python bench/stage2_step.py [--batch 512] [--iters 200] [--device cpu|cuda] [--shape mlp|branch|both]

Prints the median time of one optimiser step for each loss and the ratios to CE, measured
side by side in one process (interleaved rounds, so drift hits every loss alike).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dlsm.math.losses import ce_loss, dlsm_loss, total_loss
from dlsm.nets.mlp import BranchClassifier, ClassifierMLP, ScoreMLP

SHAPES = {
    "mlp": lambda: ClassifierMLP(2, 2, sigma_data=14.0),
    "branch": lambda: BranchClassifier(2, 2, x_widths=(256, 128, 64), sigma_widths=(64, 32, 16)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=[*SHAPES, "both"], default="both", help="classifier shape(s) to time")
    args = p.parse_args()
    for shape in SHAPES if args.shape == "both" else [args.shape]:
        bench(args, shape)


def bench(args: argparse.Namespace, shape: str) -> None:
    dev = torch.device(args.device)
    torch.manual_seed(0)
    score = ScoreMLP(2, sigma_data=14.0).to(dev).requires_grad_(False)
    x = 20 * torch.randn(args.batch, 2, device=dev)
    y = torch.randint(0, 2, (args.batch,), device=dev)
    sigma = torch.exp(torch.empty(args.batch, device=dev).uniform_(-4.6, 4.1))
    noise = torch.randn_like(x)
    losses = {"ce": ce_loss, "dlsm'": dlsm_loss, "total": total_loss}
    clfs = {k: SHAPES[shape]().to(dev) for k in losses}
    opts = {k: torch.optim.Adam(c.parameters(), lr=1e-4) for k, c in clfs.items()}

    def step(k: str) -> None:
        loss = losses[k](clfs[k], score, x, y, sigma, noise).mean()
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()

    times: dict[str, list[float]] = {k: [] for k in losses}
    for k in losses:  # warm-up
        for _ in range(10):
            step(k)
    for _ in range(args.rounds):
        for k in losses:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.iters):
                step(k)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t) / args.iters)
    ce = statistics.median(times["ce"])
    print(f"classifier={shape} device={dev} batch={args.batch} threads={torch.get_num_threads()}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:>6}: {med * 1e3:7.3f} ms/step   ratio to CE {med / ce:5.2f}x")


if __name__ == "__main__":
    main()
