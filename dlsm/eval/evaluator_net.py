"""The evaluator's network, :class:`EvaluatorNet`, and the crop of its CIFAR augmentation, :func:`random_crop`
(training, cache and use: :mod:`dlsm.eval.evaluator`, which re-exports both).

:class:`EvaluatorNet` is the CIFAR ResNet-(6n+2) of He et al. 2016 ("Deep Residual Learning for Image Recognition",
Sec. 4.2) with widths ``(w, 2w, 4w)`` instead of (16, 32, 64) and projection shortcuts (their option B): a 3x3
conv + BatchNorm + ReLU stem, three stages of ``depth`` basic blocks at H, H/2 and H/4 (the first block of stages 2
and 3 has stride 2), global average pooling and a linear head::

    features(x) = mean_{h,w} stage3(stage2(stage1(stem(x))))     in R^{4 w}   (after the last ReLU, so >= 0)
    logits(x)   = W features(x) + b                              in R^{num_classes}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlsm.errors import ConfigError
from dlsm.nets.common import check_image_shape, check_input, count_parameters

__all__ = ["DEFAULT_DEPTH", "DEFAULT_WIDTH", "EvaluatorNet", "random_crop"]

# The network's defaults, also those of dlsm.eval.evaluator.EvaluatorSettings: ResNet-8, 78 k parameters, 64 features.
DEFAULT_WIDTH = 16
DEFAULT_DEPTH = 1


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
