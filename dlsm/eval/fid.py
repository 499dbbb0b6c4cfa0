"""FID, KID and Inception Score from precomputed features, via torchmetrics; Inception-v3 features offline.

The metrics are torchmetrics' own classes (``FrechetInceptionDistance``, ``KernelInceptionDistance``,
``InceptionScore``) fed through an identity "feature extractor" (``_Precomputed``): torchmetrics accepts
any ``nn.Module`` as ``feature`` and calls it on what ``update`` receives, so handing it (N, D) feature
rows reuses its tested maths unchanged. With a custom module torchmetrics applies no ``normalize``
rescaling or uint8 check (FID/KID skip them for custom models; IS does rescale when ``normalize=True``,
so it is left False), and it does not require 4-D inputs; FID reads ``num_features`` from the module
instead of probing it with a dummy image. Features are passed in float64, so the returned numbers are
computed (and returned) in float64.

Features come from ``inception_features`` (torch-fidelity's Inception-v3, the network torchmetrics'
``FrechetInceptionDistance(feature=2048)`` wraps), which never downloads: the weights are a local file,
``weights_path`` (gin: ``inception_network.weights_path`` for the suite), else torch-hub's cache. Only
``inception_weights_path(download=True)`` (gin: ``inception_network.download = True``) fetches the published file,
checked against a SHA-256 prefix.

The official DLSM evaluation (``run_lib_evaluation.py``) computes the same quantities with tensorflow-gan
on the TF-Hub Inception (pool_3 / logits): FID over all samples and class-wise, IS over all samples at
once (one split), per class averaged over classes.
"""

from __future__ import annotations

import http.client
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dlsm.errors import ConfigError, DataError

__all__ = [
    "INCEPTION_SHA256_PREFIX",
    "INCEPTION_WEIGHTS_URL",
    "fid_from_features",
    "inception_features",
    "inception_score_from_logits",
    "inception_score_from_probs",
    "inception_weights_path",
    "kid_from_features",
    "load_inception",
    "sha256_problem",
]

# torch-fidelity's Inception-v3, converted from TF's inception-2015-12-05 graph (the one behind FID/IS).
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]
# What a download is checked against: the SHA-256 prefix in the published file's name (torch-hub's naming convention).
INCEPTION_SHA256_PREFIX = "6726825d"
_HEX = re.compile(r"[0-9a-fA-F]{8,64}")
_BATCH = 10_000  # feature rows per torchmetrics update: bounds the float64 copy to 10,000 x D
# The features are already every sample's (rank 0 gathers them, dlsm.stages.units): a metric must not gather across
# torchrun ranks in compute(), which the other ranks, not evaluating, would never join (gloo "Connection closed").
_LOCAL = {"sync_on_compute": False}


class _Precomputed(nn.Module):
    """Identity feature extractor: torchmetrics' "images" are already (N, D) feature rows."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # FID reads this instead of running a dummy image through

    def forward(self, x: Tensor) -> Tensor:
        return x


def _features(x: Tensor, name: str, *, min_rows: int = 2) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"{name} must be a tensor of shape (N, D), got {shape}")
    if x.shape[0] < min_rows:
        raise ConfigError(f"{name} needs at least {min_rows} feature vectors, got {x.shape[0]}")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name} contain NaN or Inf: check the samples or the feature extractor")
    return x


def _pair(real: Tensor, fake: Tensor, *, min_rows: int = 2) -> tuple[Tensor, Tensor]:
    real = _features(real, "real features", min_rows=min_rows)
    fake = _features(fake, "fake features", min_rows=min_rows)
    if real.shape[1] != fake.shape[1]:
        raise ConfigError(f"real and fake features differ in dimension: {tuple(real.shape)} vs {tuple(fake.shape)}")
    if real.device != fake.device:
        raise ConfigError(f"real features are on {real.device} but fake on {fake.device}: move both with .to(device)")
    return real, fake


def _feed(metric, x: Tensor, **kw) -> None:
    for i in range(0, x.shape[0], _BATCH):
        metric.update(x[i : i + _BATCH], **kw)


def _quiet(make):
    """torchmetrics warns that KID/IS keep every feature in memory: expected here, the features are ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*will save all extracted features in buffer.*")
        return make()


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to real (N, D) and fake (M, D) features (Heusel et al., 2017):

        FID = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2}),

    sample means and unbiased (1/(n-1)) covariances; torchmetrics' ``FrechetInceptionDistance`` in float64
    (its trace term sums sqrt of the eigenvalues of S_r S_f). Needs at least 2 vectors per set; with fewer
    vectors than dimensions the covariances are singular and FID is biased upwards (the paper uses 50,000).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _pair(real, fake)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), normalize=False, **_LOCAL).to(real.device)
    _feed(metric, real, real=True)
    _feed(metric, fake, real=False)
    return float(metric.compute())


def kid_from_features(
    real: Tensor,
    fake: Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int | None = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., 2018): unbiased MMD^2 with k(x, y) = (gamma x.y + coef)^degree,

        MMD^2 = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2,

    on ``subsets`` random subsets of ``subset_size`` real and fake vectors each; gamma defaults to 1/D.
    Returns (mean, std) over subsets (std with 1/subsets, as torchmetrics and torch-fidelity). The estimator
    is unbiased, so it can be negative when both sets come from one distribution. ``seed`` fixes the
    subsets (torchmetrics draws them with the global CPU generator; it is forked, not disturbed);
    ``None`` uses the global generator as is.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _pair(real, fake)
    most = min(len(real), len(fake))
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or not 2 <= subset_size <= most:
        raise ConfigError(f"kid.subset_size must be an integer in [2, {most}] (at most the smaller set), "
                          f"got {subset_size!r}")
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise ConfigError(f"kid.subsets must be a positive integer, e.g. 100, got {subsets!r}")
    metric = _quiet(lambda: KernelInceptionDistance(
        feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=subset_size, degree=degree,
        gamma=None if gamma is None else float(gamma), coef=float(coef), **_LOCAL))
    metric = metric.to(real.device)
    _feed(metric, real, real=True)
    _feed(metric, fake, real=False)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score_from_logits(logits: Tensor, *, splits: int = 10, seed: int | None = 0) -> tuple[float, float]:
    """Inception Score (Salimans et al., 2016) of class logits (N, C), p(y|x) = softmax(logits):

        IS = exp( E_x KL(p(y|x) || p(y)) ),  p(y) = E_x p(y|x),

    on ``splits`` random equal parts (torchmetrics' ``InceptionScore``, float64); returns (mean, std) over
    the parts. std uses 1/splits like Salimans et al.'s code and torch-fidelity (torchmetrics' own std
    divides by splits - 1; it is rescaled by sqrt((splits - 1) / splits)), so ``splits=1`` gives std 0.
    The official DLSM code (tensorflow-gan's ``classifier_score_from_logits``) uses one split.
    ``seed`` fixes the random partition (global CPU generator forked); ``None`` uses it as is.
    """
    from torchmetrics.image.inception import InceptionScore

    logits = _features(logits, "logits", min_rows=1)
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= logits.shape[0]:
        raise ConfigError(f"inception_score.splits must be an integer in [1, {logits.shape[0]}] (the number of "
                          f"samples), got {splits!r}")
    metric = _quiet(lambda: InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits, normalize=False,
                                           **_LOCAL))
    metric = metric.to(logits.device)
    _feed(metric, logits)
    with torch.random.fork_rng(devices=[], enabled=seed is not None), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*degrees of freedom.*")  # torch's std of one split
        if seed is not None:
            torch.manual_seed(seed)
        mean, std = metric.compute()
    parts = len(torch.arange(logits.shape[0]).chunk(splits))  # torch.chunk may make fewer than ``splits``
    std = 0.0 if parts == 1 else float(std) * math.sqrt((parts - 1) / parts)
    return float(mean), std


def inception_score_from_probs(probs: Tensor, *, splits: int = 10, seed: int | None = 0) -> tuple[float, float]:
    """Inception Score of class probabilities p(y|x) (N, C), rows summing to 1: see
    ``inception_score_from_logits``, fed with log p (softmax(log p) = p).

    Zero probabilities are clamped to the smallest normal float64 (2.2e-308) before the log, which
    realises 0 log 0 = 0 (torchmetrics would give NaN = 0 * -inf) and moves IS by less than 1e-300.
    """
    probs = _features(probs, "probs", min_rows=1)
    row_sums = probs.sum(dim=1)
    if bool((probs < 0).any()) or not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-6, rtol=0):
        raise DataError("probs must be non-negative with rows summing to 1 (logits go to inception_score_from_logits)")
    logits = probs.clamp_min(torch.finfo(torch.float64).tiny).log()
    return inception_score_from_logits(logits, splits=splits, seed=seed)


def sha256_problem(value: object) -> str | None:
    """What is wrong with ``value`` as ``inception_network.sha256`` (8 to 64 hex digits), or None."""
    if isinstance(value, str) and _HEX.fullmatch(value):
        return None
    return "must be 8 to 64 hexadecimal digits (a SHA-256 or its prefix)"


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _download(target: Path, sha256: str) -> None:
    """Fetch ``INCEPTION_WEIGHTS_URL`` into ``target`` unless it is there once the lock is held (two launches or
    torchrun ranks download once). torch-hub's downloader hashes while it writes a temporary file beside ``target``
    and moves it into place only when the SHA-256 starts with ``sha256``; it removes the file otherwise."""
    from filelock import FileLock

    url = INCEPTION_WEIGHTS_URL  # read now: tests point it at a local server
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target) + ".lock")
        lock.acquire()
    except OSError as err:
        raise ConfigError(f"cannot download Inception-v3 weights into {target} ({_reason(err)}): bind "
                          "inception_network.weights_path to a writable place") from None
    try:
        if target.is_file():  # another process downloaded it while this one waited
            return
        torch.hub.download_url_to_file(url, str(target), hash_prefix=sha256, progress=True)
    except RuntimeError as err:
        if "invalid hash value" not in str(err):
            raise
        raise ConfigError(f"downloaded Inception-v3 weights from {url} fail the checksum (SHA-256 should start with "
                          f"{sha256}): the file was removed; if the published file changed and you trust it, set "
                          "inception_network.sha256 to its SHA-256") from None
    except (OSError, http.client.HTTPException) as err:  # URLError, socket errors, timeouts, a cut transfer
        raise ConfigError(f"could not download Inception-v3 weights from {url} into {target} ({_reason(err)}): with "
                          "no internet, download it elsewhere and set inception_network.weights_path to the file"
                          ) from None
    finally:
        lock.release()


def inception_weights_path(
    weights_path: str | os.PathLike | None = None, *, download: bool = False, sha256: str = INCEPTION_SHA256_PREFIX
) -> Path:
    """The local Inception-v3 weights file: ``weights_path`` if given, else torch-hub's cache
    (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``, where torch-fidelity would
    download it). A missing file is a one-line ``ConfigError`` naming the binding to set, unless ``download``:
    then ``INCEPTION_WEIGHTS_URL`` is fetched there, its SHA-256 checked to start with ``sha256`` (8 to 64 hex
    digits; default the prefix in the published name). An existing file is used as is, not hashed.
    """
    problem = sha256_problem(sha256)
    if problem:
        raise ConfigError(f"inception_network.sha256 {problem}, got {sha256!r}")
    if weights_path is not None:
        path = Path(weights_path).expanduser().absolute()
        if download and path.is_dir():
            raise ConfigError(f"inception_network.weights_path={path} is a folder: bind the weights file's path")
        if not path.is_file() and download:
            _download(path, sha256.lower())
        if not path.is_file():
            raise ConfigError(f"inception_network.weights_path={path} does not exist: download "
                              f"{INCEPTION_WEIGHTS_URL} there (or set inception_network.download = True, with "
                              "internet), or fix the binding")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / _WEIGHTS_FILE
    if not cached.is_file() and download:
        _download(cached, sha256.lower())
    if not cached.is_file():
        raise ConfigError(f"Inception-v3 weights not found (nothing is downloaded): download {INCEPTION_WEIGHTS_URL} "
                          f"and set inception_network.weights_path to that file, or put it at {cached}, or set "
                          "inception_network.download = True (with internet)")
    return cached


def load_inception(
    weights_path: str | os.PathLike | None = None, features: Sequence[str] = ("2048", "logits_unbiased")
) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (eval mode, float32) with local weights (see
    ``inception_weights_path``); ``model(uint8 images (N, 3, H, W))`` returns one tensor per name in
    ``features`` ('64', '192', '768', '2048', 'logits_unbiased', 'logits'). Images are resized to 299 x 299
    with TF1's bilinear resize, as tensorflow-gan did for the paper's numbers; this is torchmetrics'
    ``NoTrainInceptionV3(antialias=False)`` network, which returns only one feature per pass.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path(weights_path)
    try:
        return FeatureExtractorInceptionV3(
            "inception-v3-compat", list(features), feature_extractor_weights_path=str(path)
        )
    except Exception as err:  # a truncated download, another network's checkpoint, a bad feature name
        raise ConfigError(f"cannot load Inception-v3 weights from {path} ({_reason(err)}): expected "
                          f"{_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL} and features among "
                          "64, 192, 768, 2048, logits_unbiased, logits") from None


def inception_features(
    images: Tensor,
    *,
    weights_path: str | os.PathLike | None = None,
    features: Sequence[str] = ("2048", "logits_unbiased"),
    batch_size: int = 200,
) -> dict[str, Tensor]:
    """Inception-v3 features of images, by name: '2048' (pool_3, for FID/KID/PRDC) and 'logits_unbiased'
    (pool_3 w, no bias: the IS logits of Salimans et al.'s code and of torchmetrics/torch-fidelity) by default.

    ``images``: uint8 (N, 3, H, W) in [0, 255], or float in [0, 1] (converted like the official DLSM code,
    uint8(clip(255 x)), truncating); one channel is repeated to RGB. Runs on the images' device in
    batches of ``batch_size``; returns float32 tensors on that device. Weights: ``weights_path``
    (gin: ``inception_network.weights_path`` for the suite) else torch-hub's cache; offline, nothing is downloaded.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"inception_features needs images of shape (N, 3, H, W) or (N, 1, H, W), got {shape}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise DataError(f"inception_features needs uint8 images in [0, 255] or float in [0, 1], got {images.dtype}")
        images = (images.clamp(0, 1) * 255).to(torch.uint8)
    model = load_inception(weights_path, features).to(images.device)
    out: list[list[Tensor]] = [[] for _ in features]
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            batch = images[i : i + batch_size]
            batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
            for acc, f in zip(out, model(batch), strict=True):
                acc.append(f.float())
    return {name: torch.cat(acc) for name, acc in zip(features, out, strict=True)}
