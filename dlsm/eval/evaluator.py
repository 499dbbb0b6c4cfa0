"""The project's own evaluator: a plain (not noise-conditional) classifier trained on the real training split,
whose penultimate features and logits stand in for Inception's where Inception cannot be used (digits, offline).

Network (:class:`EvaluatorNet`): the CIFAR ResNet-(6n+2) of He et al. 2016 ("Deep Residual Learning for Image
Recognition", Sec. 4.2) with widths ``(w, 2w, 4w)`` instead of (16, 32, 64) and projection shortcuts (their
option B): a 3x3 conv + BatchNorm + ReLU stem, three stages of ``depth`` basic blocks at H, H/2 and H/4 (the
first block of stages 2 and 3 has stride 2), global average pooling and a linear head::

    features(x) = mean_{h,w} stage3(stage2(stage1(stem(x))))     in R^{4 w}   (after the last ReLU, so >= 0)
    logits(x)   = W features(x) + b                              in R^{num_classes}

H and W must be divisible by 4. The defaults, ``width=16, depth=1`` (ResNet-8, 78 k parameters, 64 features),
200 steps of batch 64 at ``lr=2e-3``, reach 0.99 test accuracy on scikit-learn's digits at 8x8 (2 s on one CPU
core) and at 32x32 (15 s). For CIFAR use a larger net and schedule, e.g. ``width=32, depth=3`` (ResNet-20 at twice
its width, 1.1 M parameters, 128 features), ``augment=True`` and tens of thousands of steps of batch 128 on a GPU.

Training (:func:`train_evaluator`): ``n_iters`` steps of Adam (Kingma & Ba 2015; betas (0.9, 0.999), no weight
decay) on the cross-entropy, learning rate ``lr`` decayed to 0 by a half cosine (Loshchilov & Hutter 2017, SGDR
without restarts), batches of ``batch_size`` indices drawn uniformly with replacement. With ``augment`` each
image is mirrored with probability 1/2 and randomly cropped from its zero-padded copy (pad ``max(1, H // 8)``,
4 at 32x32), as He et al. 2016 train on CIFAR; leave it off for digits (a mirrored 2, 3 or 7 is not that digit).
The initial weights are drawn from ``torch.manual_seed(seed)`` on the CPU (inside ``torch.random.fork_rng``,
the global stream is left as it was); the batch indices, flips and crops from ``make_generator(seed, device)``,
in that order per step. On the CPU two runs with the same arguments give bitwise equal weights; on CUDA as far
as cuDNN's kernels are deterministic.

Cache (:func:`load_or_train_evaluator`): ``cache_dir / evaluator-{dataset}-{C}x{H}x{W}-{key16}.pt`` where
``key16`` is the first 16 hex digits of the SHA-256 of a JSON dict (:func:`evaluator_cache_key`) of
:data:`EVALUATOR_VERSION`, the dataset's name, class count, model space, image shape, split sizes, the SHA-256 of
each split's uint8 pixels and int64 labels, and every training setting including the seed (the device is not a
setting: the checkpoint records where it was trained). The checkpoint, written atomically by
:func:`dlsm.train.checkpoints.save_checkpoint`, holds ``{model, test_accuracy, key, trained_on, train_seconds}``.
A cache file that cannot be read, or whose stored key differs from the requested one, is a one-line
:class:`~dlsm.errors.CheckpointError` that says to delete it: a damaged evaluator is never silently replaced,
since every metric computed with it would change.

Use (:func:`features_and_logits`, :func:`sample_accuracy`): images in the model space of the training data
(``ImageData.batch``'s output), run in eval mode (BatchNorm with its running statistics) without gradients,
so a set of samples can be fed batch by batch as it is generated and the pieces concatenated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dlsm.data.images import ImageData, random_hflip, to_model_space
from dlsm.errors import CheckpointError, ConfigError, DataError
from dlsm.nets.common import check_image_shape, check_input, count_parameters
from dlsm.train.checkpoints import load_checkpoint, load_into, save_checkpoint
from dlsm.train.device import make_generator, resolve_device

__all__ = [
    "EVALUATOR_VERSION",
    "EvaluatorNet",
    "evaluator_cache_key",
    "evaluator_cache_path",
    "features_and_logits",
    "load_or_train_evaluator",
    "random_crop",
    "sample_accuracy",
    "test_accuracy",
    "train_evaluator",
]

EVALUATOR_VERSION = "evaluator-v1"  # bump when the network, the training loop or the key changes

# Training defaults, shared with the CAS protocol (dlsm.eval.cas).
DEFAULT_WIDTH = 16
DEFAULT_DEPTH = 1
DEFAULT_N_ITERS = 200
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 2e-3

log = logging.getLogger(__name__)


class _Block(nn.Module):
    """He et al. 2016 basic block: ``ReLU(BN(conv(ReLU(BN(conv_s(x))))) + shortcut(x))``, shortcut = 1x1 conv + BN
    (option B) when the stride or width changes, else the identity."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class EvaluatorNet(nn.Module):
    """Plain image classifier for evaluation: CIFAR ResNet-(6 depth + 2) of He et al. 2016 (Sec. 4.2), widths
    ``(width, 2 width, 4 width)``; ``features(x)`` (B, 4 width) is the global average pool of the last stage and
    ``forward(x)`` the logits (B, num_classes) = ``head(features(x))``.

    Args:
        shape: (C, H, W) of the images, H and W divisible by 4.
        num_classes: number of classes (>= 2).
        width: channels of the first stage; the features have ``4 * width`` dimensions.
        depth: basic blocks per stage (n of ResNet-(6n+2)).
    """

    def __init__(
        self, shape: tuple[int, int, int], num_classes: int, *, width: int = DEFAULT_WIDTH, depth: int = DEFAULT_DEPTH
    ) -> None:
        super().__init__()
        name = "EvaluatorNet"
        for what, v, low in (("num_classes", num_classes, 2), ("width", width, 1), ("depth", depth, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name}: {what} must be an integer >= {low}, got {v!r}")
        self.shape = check_image_shape(name, shape, 2)
        self.num_classes = num_classes
        self.feature_dim = 4 * width
        self.stem = nn.Sequential(
            nn.Conv2d(self.shape[0], width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        cur = width
        for stage, w in enumerate((width, 2 * width, 4 * width)):
            for i in range(depth):
                blocks.append(_Block(cur, w, 2 if stage > 0 and i == 0 else 1))
                cur = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 4 width): global average pool of the last stage's output (after its ReLU)."""
        check_input("EvaluatorNet", x, self.shape)
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) = ``head(features(x))``."""
        return self.head(self.features(x))

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return count_parameters(self)


def random_crop(u: torch.Tensor, pad: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of (N, C, H, W) cropped back to H x W at a random offset from its copy zero-padded by ``pad`` on
    every side (He et al. 2016's CIFAR augmentation, pad 4). Offsets (dy, dx) are uniform on {0, ..., 2 pad}^2, drawn
    on ``u.device`` from ``generator`` as one (N, 2) ``randint``; an offset of (pad, pad) returns the image itself."""
    n, c, h, w = u.shape
    off = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=u.device)
    padded = F.pad(u, (pad, pad, pad, pad))
    rows = (off[:, 0:1] + torch.arange(h, device=u.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (off[:, 1:2] + torch.arange(w, device=u.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=u.device)[:, None, None, None]
    chan = torch.arange(c, device=u.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def _check_settings(n_iters: int, batch_size: int, lr: float) -> None:
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ConfigError(f"evaluator n_iters must be an integer >= 1, got {n_iters!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ConfigError(f"evaluator batch_size must be an integer >= 2 (for BatchNorm), got {batch_size!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"evaluator lr must be a positive number, e.g. {DEFAULT_LR}, got {lr!r}")


def _check_data(train: ImageData, test: ImageData) -> None:
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"evaluator: empty data ({len(train)} training and {len(test)} test images)")
    if train.shape != test.shape or train.num_classes != test.num_classes or train.centered != test.centered:
        raise DataError(f"evaluator: training data {train.name} {train.shape} with {train.num_classes} classes "
                        f"(centered={train.centered}) does not match test data {test.name} {test.shape} with "
                        f"{test.num_classes} classes (centered={test.centered})")
    for what, d in (("training", train), ("test", test)):
        y = d.y
        if int(y.min()) < 0 or int(y.max()) >= d.num_classes:
            raise DataError(f"evaluator: {what} labels must lie in [0, {d.num_classes}), got "
                            f"[{int(y.min())}, {int(y.max())}]")


@contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """``net`` in eval mode without gradients; its previous mode is restored afterwards."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was)


def test_accuracy(net: EvaluatorNet, data: ImageData, *, batch_size: int = 500) -> float:
    """Fraction of ``data``'s images whose argmax logit (eval mode) is their label, read in uint8 batches."""
    dev = next(net.parameters()).device
    correct = 0
    with _eval_mode(net):
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)), device=data.device)
            x, y = data.batch(idx)
            correct += int((net(x.to(dev)).argmax(dim=1) == y.to(dev)).sum())
    return correct / len(data)


test_accuracy.__test__ = False  # not a pytest test, despite its name


def train_evaluator(
    train: ImageData,
    test: ImageData,
    *,
    seed: int = 0,
    n_iters: int = DEFAULT_N_ITERS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    augment: bool = False,
    width: int = DEFAULT_WIDTH,
    depth: int = DEFAULT_DEPTH,
    device: str | torch.device = "cpu",
) -> tuple[EvaluatorNet, float]:
    """Train an :class:`EvaluatorNet` from scratch on ``train`` (protocol in the module docstring); returns the net
    in eval mode on ``device`` and its accuracy on ``test`` (argmax of the logits, eval mode).

    Per step: ``idx ~ U{0..N-1}^batch_size`` (with replacement), then with ``augment`` the flip coins
    (:func:`dlsm.data.images.random_hflip`) and the crop offsets (:func:`random_crop`), all from
    ``make_generator(seed, device)``; loss = mean cross-entropy; Adam step at
    ``lr_t = lr (1 + cos(pi t / n_iters)) / 2``, t = 0..n_iters-1.
    """
    _check_settings(n_iters, batch_size, lr)
    _check_data(train, test)
    dev = resolve_device(device)
    data = train.to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = EvaluatorNet(train.shape, train.num_classes, width=width, depth=depth)
    net.to(dev).train()
    gen = make_generator(seed, dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / n_iters)))
    pad = max(1, train.shape[1] // 8)
    for _ in range(n_iters):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen, device=dev)
        u, y = data.x_uint8[idx], data.y[idx]
        if augment:
            u = random_crop(random_hflip(u, generator=gen), pad, generator=gen)
        loss = F.cross_entropy(net(to_model_space(u, centered=data.centered)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    return net, test_accuracy(net, test)


def _sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def evaluator_cache_key(
    train: ImageData,
    test: ImageData,
    *,
    seed: int = 0,
    n_iters: int = DEFAULT_N_ITERS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    augment: bool = False,
    width: int = DEFAULT_WIDTH,
    depth: int = DEFAULT_DEPTH,
) -> dict:
    """The fields that identify a trained evaluator: version, data identity (name, classes, model space, shape,
    sizes, SHA-256 of each split's pixels and labels) and every training setting of :func:`train_evaluator`."""
    return {
        "version": EVALUATOR_VERSION,
        "dataset": train.name,
        "num_classes": int(train.num_classes),
        "centered": bool(train.centered),
        "image_shape": list(train.shape),
        "train_size": len(train),
        "test_size": len(test),
        "train_sha256": _sha256(train.x_uint8, train.y),
        "test_sha256": _sha256(test.x_uint8, test.y),
        "seed": int(seed),
        "n_iters": int(n_iters),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "augment": bool(augment),
        "width": int(width),
        "depth": int(depth),
    }


def _path_for(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key["dataset"]) or "data"
    c, h, w = key["image_shape"]
    return Path(cache_dir) / f"evaluator-{name}-{c}x{h}x{w}-{digest}.pt"


def evaluator_cache_path(train: ImageData, test: ImageData, *, cache_dir: str | Path, **settings: object) -> Path:
    """Where :func:`load_or_train_evaluator` keeps the evaluator for these data and settings (nothing is read)."""
    return _path_for(cache_dir, evaluator_cache_key(train, test, **settings))


def load_or_train_evaluator(
    train: ImageData,
    test: ImageData,
    *,
    cache_dir: str | Path,
    seed: int = 0,
    n_iters: int = DEFAULT_N_ITERS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    augment: bool = False,
    width: int = DEFAULT_WIDTH,
    depth: int = DEFAULT_DEPTH,
    device: str | torch.device = "cpu",
) -> tuple[EvaluatorNet, float, Path]:
    """The evaluator for ``train``/``test`` and these settings: loaded from ``cache_dir`` when it was trained
    before, else trained by :func:`train_evaluator` and saved there atomically. Returns (net in eval mode on
    ``device``, its test accuracy, the cache file); the accuracy is logged (``logging``, this module's logger).

    A cache file that is unreadable, not an evaluator of these data and settings, or whose weights do not fit the
    network is a one-line CheckpointError (delete the file to retrain).
    """
    settings = dict(seed=seed, n_iters=n_iters, batch_size=batch_size, lr=lr, augment=augment, width=width,
                    depth=depth)
    _check_settings(n_iters, batch_size, lr)
    _check_data(train, test)
    key = evaluator_cache_key(train, test, **settings)
    path = _path_for(cache_dir, key)
    what = f"evaluator for {train.name} {'x'.join(map(str, train.shape))}"
    if path.exists():
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            raise CheckpointError(f"evaluator cache {path} is unreadable or not a checkpoint: delete it and the "
                                  "evaluator is trained again") from None
        if state.get("key") != key or not isinstance(state.get("test_accuracy"), float):
            raise CheckpointError(f"evaluator cache {path} holds another evaluator than its name says (other data, "
                                  "settings or version): delete it and the evaluator is trained again")
        net = EvaluatorNet(train.shape, train.num_classes, width=width, depth=depth)
        load_into(net, state["model"], path, "evaluator network")
        acc = state["test_accuracy"]
        net.to(resolve_device(device)).eval()
        log.info("%s: loaded from %s, test accuracy %.4f", what, path, acc)
        return net, acc, path
    t0 = time.perf_counter()
    net, acc = train_evaluator(train, test, device=device, **settings)
    seconds = time.perf_counter() - t0
    weights = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    save_checkpoint(path, {"model": weights, "test_accuracy": float(acc), "key": key,
                           "trained_on": str(resolve_device(device)), "train_seconds": seconds})
    log.info("%s: trained in %.1f s, test accuracy %.4f, saved to %s", what, seconds, acc, path)
    return net, acc, path


def features_and_logits(
    net: EvaluatorNet, images: torch.Tensor, *, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, net.feature_dim), logits (N, num_classes)) of float ``images`` (N, C, H, W) in the training
    data's model space, computed ``batch_size`` images at a time on the net's device in eval mode without
    gradients, returned as float32 on ``images.device``.

    Each image's outputs depend on that image alone, so calling this on the batches of a sample stream and
    concatenating gives the result of one call on all of them (up to floating-point summation order).
    """
    if not images.is_floating_point():
        raise TypeError(f"features_and_logits takes float images in model space, got {images.dtype}; "
                        "convert uint8 with dlsm.data.images.to_model_space")
    dev = next(net.parameters()).device
    feats, logits = [], []
    with _eval_mode(net):
        for chunk in images.split(batch_size):
            f = net.features(chunk.to(dev, torch.float32))
            feats.append(f.to(images.device))
            logits.append(net.head(f).to(images.device))
    if not feats:
        return images.new_zeros(0, net.feature_dim), images.new_zeros(0, net.num_classes)
    return torch.cat(feats), torch.cat(logits)


def sample_accuracy(net: EvaluatorNet, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500) -> float:
    """The evaluator's accuracy on conditional samples: the fraction of ``images`` (float, model space) whose
    argmax logit equals ``labels``, the class each was generated for."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"sample_accuracy needs as many labels as images (> 0), got {tuple(images.shape)} images "
                         f"and {tuple(labels.shape)} labels")
    _, logits = features_and_logits(net, images, batch_size=batch_size)
    return (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()
