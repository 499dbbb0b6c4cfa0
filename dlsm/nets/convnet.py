"""Noise-conditional convolutional classifier logits(x, sigma; theta) for small images.

In the style of the official DLSM sigma-conditioned ResNet (``models/resnet_cond.py`` of chen-hao-chao/dlsm):
a 3x3 stem without max-pool, residual stages of basic blocks whose first block halves the resolution (from the
second stage on), global average pooling and a linear head. The noise level enters as

    e = MLP([sin 2 pi c w; cos 2 pi c w]),  c = c_noise(sigma) = log(sigma),  w ~ N(0, 16^2)   (embeddings.py)

and as a per-channel bias Dense(SiLU(e)), in one of two places (``condition``):

- ``'block'`` (default): inside every basic block, after the first conv + norm, before its ReLU;
- ``'stage'``: after each stage's last block, ``h <- stage_k(h) + Dense_k(SiLU(e))`` -- the official code's
  ``ResNet_cond`` (one ``dense_k`` per stage; the bias is added after the block's final ReLU).

Input scaling c_in = 1/sqrt(sigma^2 + sigma_data^2) is applied when ``sigma_data`` is given, as in the score net.

The official CIFAR classifiers (``configs/classifier/cifar10_classifier_resnet18_cond_configs.py`` and the
CIFAR-100 ResNet-34 one) are ``channels=(64, 128, 256, 512)``, ``blocks_per_stage=(2, 2, 2, 2)`` /
``(3, 4, 6, 3)``, ``norm='batch'``, ``condition='stage'``, ``emb_dim=128`` with 32 Fourier frequencies
(``classifier.nf = 32``: 2 nf = 64 features -> 4 nf = 128), Fourier scale 16.

Norm choice: with ``norm='batch'`` in training mode the statistics of the batch enter every logit, so
grad_x log p(y | x_i, sigma) depends on the other examples of the batch (and log p of one example is not a function
of that example alone); the likelihood score used for sampling must then be computed in eval mode. ``norm='group'``
(the default) and ``'none'`` keep examples independent in both modes. dlsm follows the official code: stage 2
trains in training mode (batch statistics, so DLSM\'s input gradient carries the O(1/B) cross-example terms of the
batch mean and variance, exactly as the official loss does), and every *use* of a trained classifier -- sampling,
metrics, snapshots -- runs in eval mode with the running statistics (:class:`dlsm.math.scores.ModelScores` sets it).
"""

from __future__ import annotations

from collections.abc import Sequence

import gin
import torch
from torch import nn

from dlsm.errors import ConfigError
from dlsm.nets.common import check_groups, check_image_shape, check_input, check_positive, count_parameters
from dlsm.nets.embeddings import GaussianFourierEmbedding
from dlsm.nets.mlp import _as_batch, c_in

__all__ = ["BasicBlock", "ConvClassifier"]

_NORMS = ("group", "batch", "none")
_CONDITIONS = ("block", "stage")


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(groups, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """out = ReLU(shortcut(x) + N2(conv2(ReLU(N1(conv1(x)) + Dense(SiLU(e)))))), conv1 with the block's stride."""

    def __init__(
        self, c_in_: int, c_out: int, *, stride: int, emb_dim: int, norm: str, groups: int, conditioned: bool = True
    ) -> None:
        super().__init__()
        bias = norm == "none"  # a conv bias before a norm with a shift is redundant (ResNet convention)
        self.conv1 = nn.Conv2d(c_in_, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, c_out, groups)
        self.emb = nn.Linear(emb_dim, c_out) if conditioned else None
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, c_out, groups)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in_ != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in_, c_out, 1, stride=stride, bias=bias), _norm(norm, c_out, groups)
            )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x))
        if self.emb is not None:
            h = h + self.emb(nn.functional.silu(emb))[:, :, None, None]  # per-block channel bias
        h = self.norm2(self.conv2(nn.functional.relu(h)))
        return nn.functional.relu(h + self.shortcut(x))


@gin.configurable
class ConvClassifier(nn.Module):
    """Noise-conditional classifier: logits(x, sigma) of shape (B, num_classes); log p(y|x, sigma) = log_softmax[y].

    Args:
        shape: (C, H, W) of the images; H and W must be divisible by 2**(len(channels) - 1).
        num_classes: number of classes.
        channels: width of each stage; stages after the first start with a stride-2 block.
        blocks_per_stage: basic blocks per stage, one int for all stages or one per stage.
        norm: 'group' (default), 'batch' (see the module docstring) or 'none'.
        emb_dim: width of the noise embedding; default ``4 * channels[0]``.
        sigma_data: c_in = 1/sqrt(sigma^2 + sigma_data^2) when given, else 1.
        norm_groups: GroupNorm group count for ``norm='group'``.
        fourier_scale: standard deviation of the Fourier frequencies of log sigma (16 as in the DLSM ResNet).
        num_frequencies: Fourier frequencies of the embedding; default ``emb_dim // 4``.
        condition: 'block' (a sigma bias in every block) or 'stage' (one after each stage, the official code).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        num_classes: int,
        *,
        channels: Sequence[int] = (32, 64),
        blocks_per_stage: int | Sequence[int] = 1,
        norm: str = "group",
        emb_dim: int | None = None,
        sigma_data: float | None = None,
        norm_groups: int = 8,
        fourier_scale: float = 16.0,
        num_frequencies: int | None = None,
        condition: str = "block",
    ) -> None:
        super().__init__()
        name = "ConvClassifier"
        channels = tuple(channels)
        blocks = (blocks_per_stage,) * len(channels) if isinstance(blocks_per_stage, int) else tuple(blocks_per_stage)
        if condition not in _CONDITIONS:
            raise ConfigError(f"{name}: condition must be one of {list(_CONDITIONS)}, got {condition!r}")
        if norm not in _NORMS:
            raise ConfigError(f"{name}: norm must be one of {list(_NORMS)}, got {norm!r}")
        if not channels or any(c < 1 for c in channels) or num_classes < 2:
            raise ConfigError(f"{name}: needs at least one stage of positive width and num_classes >= 2")
        if len(blocks) != len(channels) or any(b < 1 for b in blocks):
            raise ConfigError(
                f"{name}: blocks_per_stage {blocks} must give >= 1 block for each of {len(channels)} stages"
            )
        optional = {"emb_dim": emb_dim, "num_frequencies": num_frequencies}
        check_positive(name, **{k: v for k, v in optional.items() if v is not None})
        self.shape = check_image_shape(name, shape, len(channels) - 1)
        if norm == "group":
            check_positive(name, norm_groups=norm_groups)
            check_groups(name, channels, norm_groups)
        self.sigma_data = sigma_data
        emb_dim = 4 * channels[0] if emb_dim is None else emb_dim

        self.embed = GaussianFourierEmbedding(emb_dim, scale=fourier_scale, num_frequencies=num_frequencies)
        self.stem = nn.Sequential(
            nn.Conv2d(self.shape[0], channels[0], 3, padding=1, bias=norm == "none"),
            _norm(norm, channels[0], norm_groups),
            nn.ReLU(),
        )
        self.blocks = nn.ModuleList()
        self.stage_ends: list[int] = []  # index of each stage's last block
        cur = channels[0]
        for stage, (width, n) in enumerate(zip(channels, blocks, strict=True)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                self.blocks.append(BasicBlock(cur, width, stride=stride, emb_dim=emb_dim, norm=norm,
                                              groups=norm_groups, conditioned=condition == "block"))
                cur = width
            self.stage_ends.append(len(self.blocks) - 1)
        self.stage_emb = nn.ModuleList(nn.Linear(emb_dim, w) for w in channels) if condition == "stage" else None
        self.head = nn.Linear(cur, num_classes)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        check_input("ConvClassifier", x, self.shape)
        sigma = _as_batch(sigma, x)
        emb = self.embed(sigma.log())  # c_noise = log sigma
        h = self.stem(c_in(sigma, self.sigma_data)[:, None, None, None] * x)
        stage = 0
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if self.stage_emb is not None and i == self.stage_ends[stage]:
                h = h + self.stage_emb[stage](nn.functional.silu(emb))[:, :, None, None]  # per-stage channel bias
                stage += 1
        return self.head(h.mean(dim=(2, 3)))  # global average pooling, linear head

    def num_parameters(self) -> int:
        """Number of trainable parameters (the Fourier frequencies are a buffer and not counted)."""
        return count_parameters(self)
