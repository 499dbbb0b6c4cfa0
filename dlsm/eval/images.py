"""The DLSM paper's Table 2 for image experiments as a metric suite (``evaluate.suites = [..., @image_metrics]``),
with Figure 4, features streamed while sampling, and cached features of the real data.

Metric names (MLflow keys) read as the paper's table does; the feature network a number was computed with follows
a dot (``evaluator``: the project's classifier of :mod:`dlsm.eval.evaluator`; ``inception``: Inception-v3)::

    {method}/fid.{net}   {method}/kid.{net}   {method}/is.{net}                   overall quality
    {method}/precision.{net}  .../recall.{net}  .../density.{net}  .../coverage.{net}   fidelity / diversity
    {method}/cw/fid.{net}  {method}/cw/precision.{net}  ...                       class-wise: per class, then the mean
    {method}/cas                                                                  classification accuracy score
    {method}/sample_acc                                                           evaluator accuracy on the samples

``{method}`` is every sampled method (base, scaling, ours, ...) and ``real``: the real test split scored as if it
were a method's samples -- the floor of FID/KID, the ceiling of P/R/D/C, IS, sample accuracy (the evaluator's test
accuracy) and CAS (the CAS protocol trained on the real training split).

Reference set: the real *training* split (its features are cached per dataset and feature network in
``cache_dir``), as the DLSM paper's statistics of CIFAR's training images. Each class's samples are scored against
that class's training images for the class-wise metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import gin
import torch
from torch import Tensor

from dlsm.config import constrain
from dlsm.data.images import ImageData, to_model_space
from dlsm.errors import CheckpointError, ConfigError, DataError
from dlsm.eval.cas import cas
from dlsm.eval.evaluator import EvaluatorSettings, _sha256, features_and_logits, load_or_train_evaluator
from dlsm.eval.fid import (
    INCEPTION_SHA256_PREFIX,
    fid_from_features,
    inception_score_from_logits,
    inception_weights_path,
    kid_from_features,
    load_inception,
    sha256_problem,
)
from dlsm.eval.prdc import classwise, prdc
from dlsm.train.checkpoints import load_checkpoint, save_checkpoint

__all__ = [
    "FeatureNet",
    "FeatureStream",
    "TABLE2_COLUMNS",
    "check_samples",
    "evaluator_network",
    "figure4",
    "image_features",
    "image_metrics",
    "inception_network",
    "preflight",
    "reference_features",
    "table2_markdown",
]

log = logging.getLogger(__name__)

PRDC = ("precision", "recall", "density", "coverage")


@dataclass
class FeatureNet:
    """A feature network of the suite.

    ``extract(uint8 images (N, C, H, W))`` returns (features (N, D), logits (N, K)) as float32 on the CPU;
    ``class_logits`` says whether the logits are over the dataset's classes (then they give the sample accuracy).
    ``key`` identifies the network and its weights for the reference-feature cache; ``info`` holds numbers about
    the network worth logging (the evaluator's test accuracy)."""

    name: str
    key: str
    extract: Callable[[Tensor], tuple[Tensor, Tensor]]
    class_logits: bool
    info: dict[str, float] = field(default_factory=dict)


@gin.configurable(denylist=["train", "test", "device", "cache_dir", "settings"])
def evaluator_network(
    train: ImageData,
    test: ImageData,
    *,
    device: torch.device,
    cache_dir: Path,
    settings: EvaluatorSettings | None = None,
) -> FeatureNet:
    """The project's evaluator classifier (:mod:`dlsm.eval.evaluator`) trained on ``train`` with ``settings`` (None:
    the gin-bound ``EvaluatorSettings()``), cached in ``cache_dir``: its penultimate features (FID/KID/P/R/D/C) and
    logits over the dataset's classes (IS, sample accuracy)."""
    settings = EvaluatorSettings() if settings is None else settings
    net, acc, path = load_or_train_evaluator(train, test, settings, cache_dir=cache_dir, device=device)
    centered = train.centered

    def extract(u: Tensor) -> tuple[Tensor, Tensor]:
        f, logits = features_and_logits(net, to_model_space(u.to(device), centered=centered))
        return f.float().cpu(), logits.float().cpu()

    return FeatureNet("evaluator", path.stem, extract, True, {"evaluator/test_acc": acc})


@gin.configurable(denylist=["train", "test", "device", "cache_dir"])
def inception_network(
    train: ImageData,
    test: ImageData,
    *,
    device: torch.device,
    cache_dir: Path,
    weights_path: str | None = None,
    batch_size: int = 200,
    download: bool = False,
    sha256: str = INCEPTION_SHA256_PREFIX,
) -> FeatureNet:
    """Inception-v3 (torch-fidelity's TF-compatible network; weights from ``weights_path``, else torch-hub's cache):
    pool_3 features (2,048) and the unbiased ImageNet logits for IS. Grey images are repeated to RGB. Its logits are
    not over the dataset's classes, so it gives no sample accuracy. Nothing downloads unless ``download``: then a
    missing file is fetched, its SHA-256 checked to start with ``sha256`` (see ``inception_weights_path``)."""
    del train, test, cache_dir
    path = inception_weights_path(weights_path, download=download, sha256=sha256)
    model = load_inception(path).to(device)

    def extract(u: Tensor) -> tuple[Tensor, Tensor]:
        feats, logits = [], []
        with torch.no_grad():
            for chunk in u.split(batch_size):
                chunk = chunk.to(device)
                f, lg = model(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk)
                feats.append(f.float().cpu())
                logits.append(lg.float().cpu())
        return torch.cat(feats), torch.cat(logits)

    return FeatureNet("inception", f"inception-{path.stem}", extract, False)


constrain(inception_network, "sha256", sha256_problem)  # checked when the config is parsed, before anything trains


@gin.configurable(denylist=["train", "test", "device", "cache_dir"])
def image_features(
    train: ImageData,
    test: ImageData,
    *,
    device: torch.device,
    cache_dir: Path,
    networks: Sequence[Callable[..., FeatureNet]] = (evaluator_network,),
) -> list[FeatureNet]:
    """The feature networks of the evaluation (gin: ``image_features.networks = [@evaluator_network,
    @inception_network]``), built once and shared by the sampling stream and the metric suite."""
    nets = [make(train, test, device=device, cache_dir=Path(cache_dir)) for make in networks]
    names = [n.name for n in nets]
    if len(set(names)) != len(names):
        raise ConfigError(f"image_features.networks lists a feature network twice: {names}")
    return nets


def preflight() -> None:
    """Fail in seconds, before anything trains, when the bound feature networks cannot be built: with
    ``inception_network`` in ``image_features.networks``, its weights file must exist (one line naming
    ``inception_network.weights_path`` otherwise), or be downloaded now with ``inception_network.download = True``.
    The evaluator needs nothing: it is trained when missing."""
    try:
        nets = gin.query_parameter("image_features.networks")
    except ValueError:  # not bound: the default, the evaluator
        return
    if any(getattr(getattr(ref, "configurable", None), "name", "") == "inception_network" for ref in nets):
        bound = gin.get_bindings(inception_network, resolve_references=True)  # macros resolved
        inception_weights_path(bound.get("weights_path"), download=bound.get("download", False),
                               sha256=bound.get("sha256", INCEPTION_SHA256_PREFIX))


class FeatureStream:
    """Features of samples computed batch by batch as they are generated (no image folders): ``add(method, uint8
    images, labels)`` per sampled batch, ``get(net, method)`` the concatenation (each image's features depend on
    that image alone, so this equals one pass over all of them)."""

    def __init__(self, nets: Sequence[FeatureNet]) -> None:
        self.nets = list(nets)
        self._parts: dict[tuple[str, str], list[tuple[Tensor, Tensor, Tensor]]] = {}

    def add(self, method: str, images: Tensor, labels: Tensor) -> None:
        for net in self.nets:
            self.add_features(net.name, method, *net.extract(images), labels)

    def add_features(self, net: str, method: str, features: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Features and logits that ``net`` already extracted from images of ``method`` (e.g. on another rank)."""
        self._parts.setdefault((net, method), []).append((features, logits, labels.cpu()))

    def get(self, net: str, method: str) -> tuple[Tensor, Tensor, Tensor] | None:
        parts = self._parts.get((net, method))
        if not parts:
            return None
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def reference_features(net: FeatureNet, data: ImageData, cache_dir: Path, *, batch_size: int = 1000) -> tuple[
        Tensor, Tensor]:
    """(features, logits) of every image of ``data`` under ``net``, cached as
    ``cache_dir / features-{net.key}-{data digest}.pt`` (the digest: SHA-256 of the uint8 pixels and labels). A cache
    file that cannot be read is a one-line CheckpointError (delete it to recompute)."""
    path = Path(cache_dir) / f"features-{net.key}-{data.name}-{_sha256(data.x_uint8, data.y)[:16]}.pt"
    if path.exists():
        try:
            state = load_checkpoint(path)
            return state["features"], state["logits"]
        except (CheckpointError, KeyError):
            raise CheckpointError(f"feature cache {path} is unreadable: delete it and the features are computed "
                                  "again") from None
    parts = [net.extract(data.x_uint8[i : i + batch_size]) for i in range(0, len(data), batch_size)]
    feats, logits = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    save_checkpoint(path, {"model": "reference features", "features": feats, "logits": logits})
    return feats, logits


def check_samples(method: str, images: Tensor, labels: Tensor, data: ImageData) -> None:
    """One-line DataError unless ``images`` are uint8 (N, C, H, W) of the data's image shape with N > 0 integer labels
    in [0, num_classes)."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        what = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"samples of {method}: need uint8 pixels in [0, 255] (N, {', '.join(map(str, data.shape))}), "
                        f"got {what}")
    if images.dim() != 4 or tuple(images.shape[1:]) != data.shape or images.shape[0] == 0:
        raise DataError(f"samples of {method}: shape {tuple(images.shape)} does not match the data's images "
                        f"(N, {', '.join(map(str, data.shape))})")
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise DataError(f"samples of {method}: need one integer label per image, got {labels.dtype} "
                        f"{tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= data.num_classes:
        raise DataError(f"samples of {method}: labels must lie in [0, {data.num_classes}), got "
                        f"[{int(labels.min())}, {int(labels.max())}]")


def _official_subsets(n_real: int, ry: Tensor, ff: Tensor, flog: Tensor, fy: Tensor, num_classes: int) -> tuple[
        tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The official evaluation's subsets (``run_lib_evaluation.py``): the samples in class order (stable, so each
    class keeps its drawing order), cut to the first ``n_real`` (the real training set's size) for the overall
    metrics; and each class's first n_c for the class-wise ones, n_c its count in the training set. With 5,100 per
    class drawn on CIFAR-10: 5,000 per class and 50,000 overall; with 600 on CIFAR-100: 500 per class and the first
    50,000, which leaves classes 84-99 (and all but 200 of class 83) out of the overall metrics."""
    order = torch.argsort(fy, stable=True)
    ff, flog, fy = ff[order], flog[order], fy[order]
    keep = torch.cat([torch.nonzero(fy == c).flatten()[: int((ry == c).sum())] for c in range(num_classes)])
    return (ff[:n_real], flog[:n_real], fy[:n_real]), (ff[keep], fy[keep])


def _scores(
    real: tuple[Tensor, Tensor, Tensor],
    fake: tuple[Tensor, Tensor, Tensor],
    net: FeatureNet,
    num_classes: int,
    *,
    k: int,
    kid_subset_size: int,
    seed: int,
    truncate: bool = False,
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """One method's numbers under one feature network, and its per-class P/R/D/C and FID (Figure 4); with
    ``truncate`` the official subsets (:func:`_official_subsets`)."""
    (rf, _, ry), (ff, flog, fy) = real, fake
    fake_cw, all_logits, all_labels = (ff, fy), flog, fy
    if truncate:
        (ff, flog, fy), fake_cw = _official_subsets(len(rf), ry, ff, flog, fy, num_classes)
    out: dict[str, float] = {"fid": fid_from_features(rf, ff)}
    out["kid"] = kid_from_features(rf, ff, subset_size=min(kid_subset_size, len(rf), len(ff)), seed=seed)[0]
    out["is"] = inception_score_from_logits(flog, splits=1)[0]
    out.update(prdc(rf, ff, k=k))
    cw_prdc, per_prdc = classwise(prdc, rf, ry, *fake_cw, num_classes, k=k)
    cw_fid, per_fid = classwise(fid_from_features, rf, ry, *fake_cw, num_classes)
    out.update({f"cw/{m}": v for m, v in cw_prdc.items()})
    out["cw/fid"] = cw_fid
    if net.class_logits:
        out["sample_acc"] = float((all_logits.argmax(1) == all_labels).double().mean())
    per_class = {c: {**per_prdc[c], "fid": per_fid[c]} for c in range(num_classes)}
    return out, per_class


@gin.configurable(denylist=["ev"])
def image_metrics(
    ev,
    *,
    k: int = 5,
    kid_subset_size: int = 1000,
    with_cas: bool = True,
    real_row: bool = True,
    truncate_to_real: bool = False,
) -> dict[str, float]:
    """Table 2 of the DLSM paper for every sampled method of an image experiment (names in the module docstring).

    ``k``: nearest neighbours of P/R/D/C (5 as in the paper; the official CIFAR-10 evaluation config uses 3).
    ``kid_subset_size``: KID subset size (capped at the smaller set). IS uses one split, as the official evaluation.
    CAS: :func:`dlsm.eval.cas.cas` with the evaluator's settings, ``EvaluatorSettings()`` read in the gin scope
    ``cas`` (``cas/EvaluatorSettings.n_iters = ...`` changes CAS alone), seeded by the experiment.
    ``real_row``: also score the real test split (row ``real``). Adds ``ev.artifacts``: ``tables/table2.{net}.md``
    and ``plots/figure4.{net}.png`` per feature network, and the per-class numbers as JSON.
    ``truncate_to_real``: score the official evaluation's subsets of the samples (:func:`_official_subsets`: the
    first N in class order overall, each class's first n_c class-wise, N and n_c the training set's); sample
    accuracy and CAS use every sample. Off by default (every sample counts); ``gin/eval_official.gin`` sets it.
    """
    data: ImageData = ev.data
    if not isinstance(data, ImageData):
        raise ConfigError("image_metrics needs image data; for point data use sample_metrics")
    if ev.test_data is None:
        raise ConfigError("image_metrics needs the test split (experiment.dataset with split='test')")
    test = ev.test_data()
    nets = ev.feature_nets()
    stream = ev.stream
    t0 = time.perf_counter()
    samples: dict[str, tuple[Tensor, Tensor]] = {}
    for method, per_class in ev.samples.items():
        u = torch.cat([data.decode(x.cpu()) for _, x in sorted(per_class.items())])
        y = torch.cat([torch.full((len(x),), c, dtype=torch.int64) for c, x in sorted(per_class.items())])
        check_samples(method, u, y, data)
        samples[method] = (u, y)
    out: dict[str, float] = {}
    per_class_all: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for net in nets:
        out.update(net.info)
        rf, rlog = reference_features(net, data, ev.cache_dir)
        real = (rf, rlog, data.y.cpu())
        rows: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        if real_row:
            tf, tlog = reference_features(net, test, ev.cache_dir)
            rows["real"] = (tf, tlog, test.y.cpu())
        for method, (u, y) in samples.items():
            streamed = stream.get(net.name, method) if stream is not None else None
            rows[method] = streamed if streamed is not None else (*net.extract(u), y)
        per_class_all[net.name] = {}
        for method, fake in rows.items():
            scores, per_class = _scores(real, fake, net, data.num_classes, k=k, kid_subset_size=kid_subset_size,
                                        seed=ev.seed, truncate=truncate_to_real and method != "real")
            out.update({f"{method}/{m}.{net.name}" if m != "sample_acc" else f"{method}/sample_acc": v
                        for m, v in scores.items()})
            per_class_all[net.name][method] = per_class
    if with_cas:
        with gin.config_scope("cas"):  # the evaluator's bindings, and any cas/EvaluatorSettings.* on top
            settings = replace(EvaluatorSettings(), seed=ev.seed)
        for method, (u, y) in samples.items():
            out[f"{method}/cas"] = cas(u, y, test, settings, device=ev.device)
        if real_row:
            out["real/cas"] = cas(data.x_uint8, data.y, test, settings, device=ev.device)
    methods = (["real"] if real_row else []) + list(samples)
    for net in nets:
        ev.artifacts[f"tables/table2.{net.name}.md"] = table2_markdown(out, methods, net.name, k=k)
        ev.artifacts[f"tables/per_class.{net.name}.json"] = per_class_all[net.name]
        if "ours" in samples and "base" in samples:
            ev.artifacts[f"plots/figure4.{net.name}.png"] = figure4(per_class_all[net.name], net.name)
    out["time/image_metrics_s"] = time.perf_counter() - t0
    return out


TABLE2_COLUMNS = (
    ("FID", "fid", "down"), ("IS", "is", "up"), ("KID", "kid", "down"),
    ("P", "precision", "up"), ("R", "recall", "up"), ("D", "density", "up"), ("C", "coverage", "up"),
    ("CW-FID", "cw/fid", "down"), ("CW-P", "cw/precision", "up"), ("CW-R", "cw/recall", "up"),
    ("CW-D", "cw/density", "up"), ("CW-C", "cw/coverage", "up"),
)


def table2_markdown(metrics: dict[str, float], methods: Sequence[str], net: str, *, k: int | None = None) -> str:
    """The paper's Table 2 layout as markdown: one row per method (``real`` first), the overall and class-wise
    columns under feature network ``net``, then CAS and sample accuracy where present."""
    cols = [(label, f"{key}.{net}", arrow) for label, key, arrow in TABLE2_COLUMNS]
    cols += [("CAS", "cas", "up"), ("acc", "sample_acc", "up")]
    cols = [c for c in cols if any(f"{m}/{c[1]}" in metrics for m in methods)]
    head = "| method | " + " | ".join(f"{label} {'↓' if arrow == 'down' else '↑'}" for label, _, arrow in cols) + " |"
    lines = [f"Table 2 ({net} features{f', k = {k}' if k else ''}; ↓ lower is better, ↑ higher is better; "
             "`real` = the real test split scored as samples)", "", head, "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        vals = [metrics.get(f"{m}/{key}") for _, key, _ in cols]
        lines.append(f"| {m} | " + " | ".join("—" if v is None or math.isnan(v) else f"{v:.4g}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def figure4(per_class: dict[str, dict[int, dict[str, float]]], net: str, *, a: str = "ours", b: str = "base"):
    """The paper's Figure 4: per class, the class-wise precision, recall, density and coverage of ``a`` minus those of
    ``b``, each panel sorted in decreasing order (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), constrained_layout=True)
    for ax, metric in zip(axes, PRDC, strict=True):
        diffs = sorted(((per_class[a][c][metric] - per_class[b][c][metric], c) for c in per_class[a]), reverse=True)
        vals = [d for d, _ in diffs]
        ax.bar(range(len(vals)), vals, color=["tab:green" if v >= 0 else "tab:red" for v in vals])
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(vals)), [str(c) for _, c in diffs], fontsize=7)
        ax.set_title(f"CW {metric}: {a} − {b}")
        ax.set_xlabel("class (sorted)")
    fig.suptitle(f"Figure 4 ({net} features)")
    return fig
