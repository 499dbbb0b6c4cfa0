"""The project's own evaluator: a plain (not noise-conditional) classifier trained on the real training split,
whose penultimate features and logits stand in for Inception's where Inception cannot be used (digits, offline).

Settings (:class:`EvaluatorSettings`): one frozen object holds every training setting, ``seed``, ``n_iters``,
``batch_size``, ``lr``, ``augment``, ``width``, ``depth``, ``network`` and ``lr_schedule`` (the last two let CAS
train the official protocol's ResNet-50 at a constant rate); it is a gin configurable bound once
(``EvaluatorSettings.width = 32``), and the CAS protocol (:mod:`dlsm.eval.cas`) trains with the same object, read in
the gin scope ``cas`` (``cas/EvaluatorSettings.n_iters = ...`` changes CAS alone) and seeded by the experiment.

Network (:class:`EvaluatorNet`, in :mod:`dlsm.eval.evaluator_net`): the CIFAR ResNet-(6 depth + 2) of He et al.
2016 with widths ``(w, 2w, 4w)``; ``features(x)`` is the global average pool of the last stage (``4 w``
dimensions, >= 0), ``logits(x)`` a linear head on it. H and W must be divisible by 4. The defaults,
``width=16, depth=1`` (ResNet-8, 78 k parameters, 64 features), 200 steps of batch 64 at ``lr=2e-3``, reach 0.99
test accuracy on scikit-learn's digits at 8x8 (2 s on one CPU core) and at 32x32 (15 s). For CIFAR use a larger
net and schedule, e.g. ``width=32, depth=3`` (ResNet-20 at twice its width, 1.1 M parameters, 128 features),
``augment=True`` and tens of thousands of steps of batch 128 on a GPU.

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
each split's uint8 pixels and int64 labels, and every field of the :class:`EvaluatorSettings`, the seed included
(the device is not a setting: the checkpoint records where it was trained). The checkpoint, written atomically by
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gin
import torch
import torch.nn.functional as F
from torch import nn

from dlsm.config import constrain
from dlsm.data.images import ImageData, random_hflip, to_model_space
from dlsm.errors import CheckpointError, ConfigError, DataError
from dlsm.eval.evaluator_net import DEFAULT_DEPTH, DEFAULT_WIDTH, EvaluatorNet, random_crop
from dlsm.train.checkpoints import load_checkpoint, load_into, save_checkpoint
from dlsm.train.device import make_generator, resolve_device

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_WIDTH",
    "EVALUATOR_VERSION",
    "EvaluatorNet",
    "EvaluatorSettings",
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

log = logging.getLogger(__name__)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What each setting must be: EvaluatorSettings.__post_init__ raises with it, and the same test runs on gin bindings
# at parse time (dlsm.config.constrain), so a bad bound value fails before anything trains.
_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "seed": ("an integer", _is_int),
    "n_iters": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "batch_size": ("an integer >= 2 (for BatchNorm)", lambda v: _is_int(v) and v >= 2),
    "lr": ("a positive number, e.g. 0.002",
           lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0),
    "augment": ("True or False", lambda v: isinstance(v, bool)),
    "width": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "depth": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "network": ("'evaluator' or 'resnet50'", lambda v: v in ("evaluator", "resnet50")),
    "lr_schedule": ("'cosine' or 'constant'", lambda v: v in ("cosine", "constant")),
}
# fields added after the key was first written: keyed only when they differ from these defaults, so the caches of
# the default settings keep their file names (tests/test_evaluator.py pins that key)
_LATER_FIELDS = {"network": "evaluator", "lr_schedule": "cosine"}



@gin.configurable
@dataclass(frozen=True)
class EvaluatorSettings:
    """Every training setting of the evaluator (protocol in the module docstring), shared by the evaluator network
    of the metric suite (``evaluator_network``) and the CAS protocol (:func:`dlsm.eval.cas.cas`). Bind it once in
    gin, ``EvaluatorSettings.width = 32``; ``cas/EvaluatorSettings.<field>`` overrides a field for CAS alone. As any
    configurable, a field not passed takes its gin binding (``dataclasses.replace`` passes them all).

    Args:
        seed: initial weights (``torch.manual_seed``), batches and augmentation (``make_generator``).
        n_iters: Adam steps.
        batch_size: images per step (>= 2, for BatchNorm), drawn uniformly with replacement.
        lr: peak learning rate, decayed to 0 by a half cosine.
        augment: random mirroring and crops (CIFAR; not for digits).
        width: channels of the network's first stage (features: ``4 * width``).
        depth: basic blocks per stage (ResNet-(6 depth + 2)).
        network: 'evaluator' (:class:`EvaluatorNet`) or 'resnet50', for CAS alone: torchvision's ResNet-50 from
            scratch with its 7x7 stride-2 stem on the data's channels, as the official DLSM CAS
            (``models/classifier_cas.py``); ``width`` and ``depth`` do not apply to it.
        lr_schedule: 'cosine' (decayed to 0) or 'constant' (the official CAS: Adam at 2e-4 throughout).
    """

    seed: int = 0
    n_iters: int = 200
    batch_size: int = 64
    lr: float = 2e-3
    augment: bool = False
    width: int = DEFAULT_WIDTH
    depth: int = DEFAULT_DEPTH
    network: str = "evaluator"
    lr_schedule: str = "cosine"

    def __post_init__(self) -> None:
        for name, (what, ok) in _RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise ConfigError(f"evaluator {name} must be {what}, got {value!r}")


for _name, (_what, _ok) in _RULES.items():
    constrain(EvaluatorSettings, _name, lambda v, what=_what, ok=_ok: None if ok(v) else f"must be {what}")


def _check_settings(fn: str, settings: object) -> EvaluatorSettings:
    if not isinstance(settings, EvaluatorSettings):
        raise TypeError(f"{fn} takes an EvaluatorSettings, got {type(settings).__name__}")
    return settings


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


def _network(s: EvaluatorSettings, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network ``s.network`` names, freshly initialised from the global stream."""
    if s.network == "evaluator":
        return EvaluatorNet(shape, num_classes, width=s.width, depth=s.depth)
    from torchvision.models import resnet50

    net = resnet50(weights=None, num_classes=num_classes)  # nothing downloads
    net.conv1 = nn.Conv2d(shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def train_evaluator(
    train: ImageData, test: ImageData, settings: EvaluatorSettings, *, device: str | torch.device = "cpu"
) -> tuple[EvaluatorNet, float]:
    """Train an :class:`EvaluatorNet` from scratch on ``train`` with ``settings`` (protocol in the module docstring);
    returns the net in eval mode on ``device`` and its accuracy on ``test`` (argmax of the logits, eval mode).

    Per step: ``idx ~ U{0..N-1}^batch_size`` (with replacement), then with ``augment`` the flip coins
    (:func:`dlsm.data.images.random_hflip`) and the crop offsets (:func:`random_crop`), all from
    ``make_generator(seed, device)``; loss = mean cross-entropy; Adam step at
    ``lr_t = lr (1 + cos(pi t / n_iters)) / 2``, t = 0..n_iters-1 (``lr_schedule = 'constant'``: ``lr_t = lr``).
    ``network = 'resnet50'`` trains torchvision's ResNet-50 instead (CAS only), returned in place of the EvaluatorNet.
    """
    s = _check_settings("train_evaluator", settings)
    _check_data(train, test)
    dev = resolve_device(device)
    data = train.to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = _network(s, train.shape, train.num_classes)
    net.to(dev).train()
    gen = make_generator(s.seed, dev)
    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    cosine = s.lr_schedule == "cosine"
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / s.n_iters)) if cosine else 1.0)
    pad = max(1, train.shape[1] // 8)
    for _ in range(s.n_iters):
        idx = torch.randint(0, len(data), (s.batch_size,), generator=gen, device=dev)
        u, y = data.x_uint8[idx], data.y[idx]
        if s.augment:
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


def evaluator_cache_key(train: ImageData, test: ImageData, settings: EvaluatorSettings) -> dict:
    """The fields that identify a trained evaluator: version, data identity (name, classes, model space, shape,
    sizes, SHA-256 of each split's pixels and labels) and every field of ``settings`` (``network`` and
    ``lr_schedule`` only where they differ from their defaults, which keeps the default key of evaluator-v1)."""
    s = _check_settings("evaluator_cache_key", settings)
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
        "seed": int(s.seed),
        "n_iters": int(s.n_iters),
        "batch_size": int(s.batch_size),
        "lr": float(s.lr),
        "augment": bool(s.augment),
        "width": int(s.width),
        "depth": int(s.depth),
        **{f: getattr(s, f) for f, default in _LATER_FIELDS.items() if getattr(s, f) != default},
    }


def _path_for(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key["dataset"]) or "data"
    c, h, w = key["image_shape"]
    return Path(cache_dir) / f"evaluator-{name}-{c}x{h}x{w}-{digest}.pt"


def evaluator_cache_path(
    train: ImageData, test: ImageData, settings: EvaluatorSettings, *, cache_dir: str | Path
) -> Path:
    """Where :func:`load_or_train_evaluator` keeps the evaluator for these data and settings (nothing is read)."""
    return _path_for(cache_dir, evaluator_cache_key(train, test, settings))


def load_or_train_evaluator(
    train: ImageData,
    test: ImageData,
    settings: EvaluatorSettings,
    *,
    cache_dir: str | Path,
    device: str | torch.device = "cpu",
) -> tuple[EvaluatorNet, float, Path]:
    """The evaluator for ``train``/``test`` and ``settings``: loaded from ``cache_dir`` when it was trained
    before, else trained by :func:`train_evaluator` and saved there atomically. Returns (net in eval mode on
    ``device``, its test accuracy, the cache file); the accuracy is logged (``logging``, this module's logger).

    A cache file that is unreadable, not an evaluator of these data and settings, or whose weights do not fit the
    network is a one-line CheckpointError (delete the file to retrain).
    """
    s = _check_settings("load_or_train_evaluator", settings)
    if s.network != "evaluator":
        raise ConfigError(f"EvaluatorSettings.network = {s.network!r} has no feature layer for the metrics: bind it "
                          f"for CAS alone, cas/EvaluatorSettings.network = {s.network!r}")
    _check_data(train, test)
    key = evaluator_cache_key(train, test, s)
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
        net = EvaluatorNet(train.shape, train.num_classes, width=s.width, depth=s.depth)
        load_into(net, state["model"], path, "evaluator network")
        acc = state["test_accuracy"]
        net.to(resolve_device(device)).eval()
        log.info("%s: loaded from %s, test accuracy %.4f", what, path, acc)
        return net, acc, path
    t0 = time.perf_counter()
    net, acc = train_evaluator(train, test, s, device=device)
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
