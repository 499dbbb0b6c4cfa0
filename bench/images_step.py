"""CIFAR-10 image steps: an eager fp32 baseline written as score_sde does against dlsm's fast path, side by side.

    python bench/images_step.py                       # reduced width, CPU-sized batches (this machine: 2 cores)
    python bench/images_step.py --full --device cuda  # NCSN++ deep (nf 128, 8 blocks) + ResNet-18, published batches

Times, for the networks of gin/cifar10.gin: one stage-1 step (DSM on NCSN++), one stage-2 step with CE and with
Total = DLSM' + CE (ResNet classifier, NCSN++ frozen), and one guided PC step (Langevin corrector + reverse-diffusion
predictor, alpha grad log p(y|x) in both) and one guided Heun step (EDM, 2 levels: 3 guided evaluations) for a
batch of images.

(a) baseline, as score_sde / the official DLSM code write it: fp32, NCHW, eager; every step draws its batch indices,
    sigma and noise on the host and copies them (and the batch) to the device; the loss is read with .item() each step.
(b) fast path, each switch separately (the same switches as ``train``): data kept on the device as uint8, every random
    number drawn by a device generator, no host sync inside the loop (dlsm.train.loop.train); ``--bf16`` autocast with
    the losses accumulated in float32 (dlsm.math.losses); ``--channels-last``; ``--compile`` (torch.compile
    of the networks;
    DLSM' needs a double backward through the compiled classifier, which torch.compile does not support: the Total
    row then runs the classifier eager and says so).

Prints images/s, (b)/(a) speed-ups, Total/CE (goal <= 2.5x), the PC and Heun steps' overhead over their bare
network calls (goal <= 15 %), peak memory (CUDA: max_memory_allocated; CPU: the process's peak RSS), and the
bf16 - fp32 difference of the DSM and DLSM' values on one batch. Rounds are interleaved so drift hits every variant
alike.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from dlsm.math.heun import heun_sampler
from dlsm.math.losses import ce_loss, dsm_loss, total_loss
from dlsm.math.samplers import predictor_corrector
from dlsm.math.scores import ModelScores
from dlsm.nets import ConvClassifier, NCSNpp

SHAPE = (3, 32, 32)


def networks(args: argparse.Namespace, dev: torch.device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    score = NCSNpp(SHAPE, channels=args.width, num_res_blocks=args.score_blocks).to(dev)
    w = args.clf_width
    clf = ConvClassifier(SHAPE, 10, channels=(w, 2 * w, 4 * w, 8 * w), blocks_per_stage=(2, 2, 2, 2), norm="batch",
                         condition="stage", emb_dim=128, num_frequencies=32).to(dev)
    return score, clf


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], dev: torch.device, iters: int) -> float:
    sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / iters


def log_uniform(u: torch.Tensor, lo: float = 0.01, hi: float = 50.0) -> torch.Tensor:
    return lo * (hi / lo) ** u


class Variant:
    """One way of running the steps: baseline (host RNG, fp32, .item()) or a fast-path combination."""

    def __init__(self, name: str, *, fast: bool, bf16: bool = False, channels_last: bool = False,
                 compile_nets: bool = False) -> None:
        self.name, self.fast, self.bf16, self.channels_last, self.compile_nets = (
            name, fast, bf16, channels_last, compile_nets)

    def amp(self, dev: torch.device):
        return torch.autocast(dev.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def build_steps(args, dev, v: Variant, data_u8: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable[[], None]]:
    score, clf_ce = networks(args, dev)
    _, clf_total = networks(args, dev)
    if v.channels_last:
        for m in (score, clf_ce, clf_total):
            m.to(memory_format=torch.channels_last)
    frozen = NCSNpp(SHAPE, channels=args.width, num_res_blocks=args.score_blocks).to(dev).eval().requires_grad_(False)
    if v.channels_last:
        frozen.to(memory_format=torch.channels_last)
    run_score, run_frozen, run_ce = score, frozen, clf_ce
    if v.compile_nets:
        run_score, run_frozen, run_ce = torch.compile(score), torch.compile(frozen), torch.compile(clf_ce)
    opts = {k: torch.optim.Adam(m.parameters(), lr=2e-4) for k, m in
            (("dsm", score), ("ce", clf_ce), ("total", clf_total))}
    gen = torch.Generator(dev).manual_seed(0)
    host_gen = torch.Generator().manual_seed(0)
    on_dev = data_u8.to(dev)
    labels_dev = labels.to(dev)
    n_data = data_u8.shape[0]

    def batch(n: int) -> tuple[torch.Tensor, ...]:
        if v.fast:  # dlsm.train.loop.train: indices, sigma, noise from the device generator; uint8 gathered there
            idx = torch.randint(0, n_data, (n,), generator=gen, device=dev)
            x = v.layout(on_dev[idx].float() / 255.0)
            sigma = log_uniform(torch.rand(n, generator=gen, device=dev))
            noise = v.layout(torch.randn(x.shape, generator=gen, device=dev))
            return x, labels_dev[idx], sigma, noise
        idx = torch.randint(0, n_data, (n,), generator=host_gen)  # score_sde: host batch, host RNG, copies
        x = (data_u8[idx].float() / 255.0).to(dev)
        sigma = log_uniform(torch.rand(n, generator=host_gen)).to(dev)
        noise = torch.randn(x.shape, generator=host_gen).to(dev)
        return x, labels[idx].to(dev), sigma, noise

    def optimise(key: str, model: nn.Module, loss: torch.Tensor) -> None:
        opt = opts[key]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if not v.fast:
            loss.item()  # the baseline reads the loss every step (a host sync)

    def dsm_step() -> None:
        x, _, sigma, noise = batch(args.score_batch)
        with v.amp(dev):
            per = dsm_loss(run_score, x, sigma, noise)
        optimise("dsm", score, per.float().mean())

    def ce_step() -> None:
        x, y, sigma, noise = batch(args.clf_batch)
        with v.amp(dev):
            per = ce_loss(run_ce, None, x, y, sigma, noise)
        optimise("ce", clf_ce, per.float().mean())

    def total_step() -> None:
        x, y, sigma, noise = batch(args.clf_batch)
        with v.amp(dev):  # the classifier runs eager here: no double backward through torch.compile
            per = total_loss(clf_total, run_frozen, x, y, sigma, noise, weight_power=0.0, reduce="mean")
        optimise("total", clf_total, per.float().mean())

    # guided PC: 2 levels = one step of each of (corrector, predictor) per level; the images/s count PC *steps*
    clf_eval = clf_ce.eval()
    sigmas = torch.tensor([1.0, 0.5])
    y = torch.arange(args.pc_batch, device=dev) % 10

    def pc_fast() -> None:
        scores = ModelScores(run_frozen, clf_eval, alpha=1.0)
        x0 = v.layout(torch.randn((args.pc_batch, *SHAPE), generator=gen, device=dev))
        with v.amp(dev):
            predictor_corrector(lambda x, s: scores.prior(x, s) + scores.alpha * _lik(clf_eval, x, s, y), x0, sigmas,
                                generator=gen, disable=True)

    def pc_baseline() -> None:
        x = torch.randn((args.pc_batch, *SHAPE), generator=host_gen).to(dev)
        for i, s in enumerate(sigmas.tolist()):
            sig = torch.full((args.pc_batch,), s, device=dev)
            # corrector, as the official LangevinCorrector: score + alpha grad log(softmax + 1e-8)
            g = _official_guided(frozen, clf_eval, x, sig, y)
            z = torch.randn(x.shape, generator=host_gen).to(dev)
            step = 2 * (0.16 * z.reshape(len(x), -1).norm(dim=1).mean() / g.reshape(len(x), -1).norm(dim=1).mean()) ** 2
            x = x + step * g + (2 * step).sqrt() * z
            nxt = sigmas[i + 1].item() if i + 1 < len(sigmas) else 0.0
            g = _official_guided(frozen, clf_eval, x, sig, y)
            x = x + (s**2 - nxt**2) * g + (s**2 - nxt**2) ** 0.5 * torch.randn(x.shape, generator=host_gen).to(dev)
        x.sum().item()

    def heun() -> None:  # EDM Heun on 2 levels: 2N - 1 = 3 guided score evaluations (Euler + Heun, then Euler to 0)
        scores = ModelScores(run_frozen, clf_eval, alpha=1.0)
        x0 = v.layout(torch.randn((args.pc_batch, *SHAPE), generator=gen, device=dev))
        with v.amp(dev):
            heun_sampler(lambda x, s: scores.prior(x, s) + scores.alpha * _lik(clf_eval, x, s, y), x0, sigmas,
                         n_steps=2, generator=gen, disable=True)

    def bare() -> None:  # the network work of one PC level: 2 x (score forward + classifier input gradient)
        x = v.layout(torch.randn((args.pc_batch, *SHAPE), generator=gen, device=dev))
        sig = torch.full((args.pc_batch,), 0.5, device=dev)
        for _ in range(2):
            with v.amp(dev), torch.no_grad():
                run_frozen(x, sig)
            with v.amp(dev):
                _lik(clf_eval, x, sig, y)

    return {"stage1 DSM": dsm_step, "stage2 CE": ce_step, "stage2 Total": total_step,
            "PC step": pc_fast if v.fast else pc_baseline, "Heun step": heun, "PC bare nets": bare}


def _lik(clf: nn.Module, x: torch.Tensor, sigma, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        log_p = torch.log_softmax(clf(x, sigma).float(), dim=-1).gather(-1, y[:, None]).sum()
        return torch.autograd.grad(log_p, x)[0]


def _official_guided(score: nn.Module, clf: nn.Module, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor):
    with torch.no_grad():
        s = score(x, sigma)
    with torch.enable_grad():
        xv = x.detach().requires_grad_(True)
        log_prob = torch.log(torch.softmax(clf(xv, sigma), dim=1) + 1e-8)
        mask = nn.functional.one_hot(y, num_classes=log_prob.shape[1]).float()
        (g,) = torch.autograd.grad(log_prob, xv, grad_outputs=mask)
    return s + g


def loss_agreement(args, dev, data_u8, labels) -> tuple[float, float]:
    """|bf16 - fp32| / |fp32| of the batch-mean DSM and DLSM' (per-pixel, official) on one batch. NCSN++ starts with
    an output of ~0 (init_scale 0), which would make DSM = 1/2 ||z||^2 exactly in any precision: its weights are
    re-drawn with init_scale 1 here so that the network's bf16 error shows."""
    score, clf = networks(args, dev)
    score.reset_parameters(1.0)
    gen = torch.Generator(dev).manual_seed(1)
    idx = torch.randint(0, data_u8.shape[0], (args.clf_batch,), generator=gen, device=dev)
    x, y = data_u8.to(dev)[idx].float() / 255.0, labels.to(dev)[idx]
    sigma = log_uniform(torch.rand(len(x), generator=gen, device=dev))
    noise = torch.randn(x.shape, generator=gen, device=dev)
    out = []
    for fn in (lambda: dsm_loss(score, x, sigma, noise),
               lambda: total_loss(clf, score.eval(), x, y, sigma, noise, lam=0.0, weight_power=0.0, reduce="mean")):
        ref = fn().detach().double().mean()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            low = fn().detach().double().mean()
        out.append(float((low - ref).abs() / ref.abs()))
    return out[0], out[1]


def peak_memory(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="published widths and batches (GPU)")
    p.add_argument("--width", type=int, default=16, help="NCSN++ nf (published: 128)")
    p.add_argument("--score-blocks", type=int, default=1, help="NCSN++ blocks per level (published deep: 8)")
    p.add_argument("--clf-width", type=int, default=16, help="ResNet first-stage width (published: 64)")
    p.add_argument("--score-batch", type=int, default=16)
    p.add_argument("--clf-batch", type=int, default=16)
    p.add_argument("--pc-batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="add the bf16-autocast variant")
    p.add_argument("--channels-last", action="store_true", help="add the channels_last variant")
    p.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    args = p.parse_args()
    if args.full:
        args.width, args.score_blocks, args.clf_width = 128, 8, 64
        args.score_batch, args.clf_batch, args.pc_batch = 128, 150, 500
    dev = torch.device(args.device)
    torch.manual_seed(0)
    data_u8 = torch.randint(0, 256, (2048, *SHAPE), dtype=torch.uint8)  # stand-in CIFAR batch (timing only)
    labels = torch.randint(0, 10, (2048,))

    variants = [Variant("(a) eager fp32, host RNG", fast=False), Variant("(b) device RNG, no sync", fast=True)]
    if args.bf16:
        variants.append(Variant("(b) + bf16", fast=True, bf16=True))
    if args.channels_last:
        variants.append(Variant("(b) + channels_last", fast=True, channels_last=True))
    if args.bf16 and args.channels_last:
        variants.append(Variant("(b) + bf16 + channels_last", fast=True, bf16=True, channels_last=True))
    if args.compile:
        variants.append(Variant("(b) + compile", fast=True, compile_nets=True))
    steps = {v.name: build_steps(args, dev, v, data_u8, labels) for v in variants}
    batch_of = {"stage1 DSM": args.score_batch, "stage2 CE": args.clf_batch, "stage2 Total": args.clf_batch,
                "PC step": args.pc_batch, "Heun step": args.pc_batch, "PC bare nets": args.pc_batch}
    times: dict[tuple[str, str], list[float]] = {}
    for v in variants:  # warm-up (and compilation)
        for fn in steps[v.name].values():
            fn()
    for _ in range(args.rounds):
        for v in variants:
            for key, fn in steps[v.name].items():
                times.setdefault((v.name, key), []).append(timed(fn, dev, args.iters))
    med = {k: statistics.median(t) for k, t in times.items()}

    print(f"device={dev} threads={torch.get_num_threads()} NCSN++ nf={args.width} blocks={args.score_blocks} "
          f"ResNet width={args.clf_width}; batches: score {args.score_batch}, classifier {args.clf_batch}, "
          f"PC {args.pc_batch}; median of {args.rounds} rounds x {args.iters} steps")
    base = variants[0].name
    print("| variant | step | ms/step | images/s | vs (a) |\n|---|---|---|---|---|")
    for v in variants:
        for key in steps[v.name]:
            t = med[(v.name, key)]
            print(f"| {v.name} | {key} | {t * 1e3:.1f} | {batch_of[key] / t:.1f} | {med[(base, key)] / t:.2f}x |")
    for v in variants:
        ratio = med[(v.name, "stage2 Total")] / med[(v.name, "stage2 CE")]
        # one PC step = 2 levels here, each a corrector and a predictor step: bare = the same network calls
        overhead = med[(v.name, "PC step")] / (2 * med[(v.name, "PC bare nets")]) - 1
        # the Heun step: 3 evaluations, each one score forward + one classifier gradient = 1.5 x a bare PC level
        heun_overhead = med[(v.name, "Heun step")] / (1.5 * med[(v.name, "PC bare nets")]) - 1
        print(f"{v.name}: Total/CE = {ratio:.2f}x (goal <= 2.5x); over bare network calls: PC "
              f"{100 * overhead:+.1f} %, Heun {100 * heun_overhead:+.1f} % (goal <= 15 %)")
    dsm_rel, dlsm_rel = loss_agreement(args, dev, data_u8, labels)
    print(f"bf16 vs fp32 on one batch: DSM relative difference {dsm_rel:.2e}, DLSM' (per-pixel) {dlsm_rel:.2e}")
    print(f"peak memory: {peak_memory(dev)}")


if __name__ == "__main__":
    main()
