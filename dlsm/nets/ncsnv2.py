"""NCSNv2 score network (Song & Ermon 2020, "Improved Techniques for Training Score-Based Generative Models").

The parameterisation is written out in one place, :meth:`NCSNv2.forward`:

    s(x, sigma; theta) = F(c_in(x)) / sigma   (Technique 3: F is an *unconditional* RefineNet; ``scale_by_sigma``)

    c_in(x) = 2 x - 1   for data in [0, 1] (``centered_input=False``, the default, as the official CIFAR-10 config)
    c_in(x) = x         for data already in [-1, 1] (``centered_input=True``)

The official code (ermongroup/ncsnv2, ``models/ncsnv2.py``) does the centring inside the network:
``if not self.logit_transform and not self.rescaled: h = 2 * x - 1.``; with ``configs/cifar10.yml``
(``logit_transform: false, rescaled: false``) ``datasets.data_transform`` leaves the data in [0, 1], the noise is
added there (sigma is in [0, 1]-units, sigma_1 = 50 ... sigma_232 = 0.01), and the network maps the *noisy* input to
2 x - 1 before its first conv. ``centered_input=True`` is the ``rescaled: true`` path (data already 2 u - 1, no map).
The score is still with respect to the input x: the map is part of F, not a change of variables.

The body F (:class:`RefineNet`, official ``NCSNv2`` for 32x32 images, CIFAR-10 and CelebA in ``get_model``):

    begin_conv 3x3 (C -> ngf)
    stage 1  ResidualBlock(ngf, ngf) x2                                at H     x W
    stage 2  ResidualBlock(ngf, 2ngf, down) + ResidualBlock(2ngf, 2ngf)  -> H/2 x W/2 (conv + 2x2 mean pool)
    stage 3  ResidualBlock(2ngf, 2ngf, down, dilation 2) + (.., dilation 2)  stays at H/2 x W/2
    stage 4  ResidualBlock(2ngf, 2ngf, down, dilation 4) + (.., dilation 4)  stays at H/2 x W/2
    RefineBlock([stage 4], 2ngf, start) -> RefineBlock([stage 3, .], 2ngf) -> RefineBlock([stage 2, .], ngf)
        -> RefineBlock([stage 1, .], ngf, end)
    InstanceNorm++ -> ELU -> end_conv 3x3 (ngf -> C)

Note that the official ``ResidualBlock(resample='down', dilation=d)`` does *not* reduce the resolution: the dilated
convolutions replace the downsampling (``layers.py``: ``conv1``/``conv2``/``shortcut`` are all ``dilated_conv3x3``,
stride 1). So the 32x32 network halves the resolution once (32 -> 16) and H, W need only be even. The deeper official
layouts are available as ``variant="deeper"`` (``NCSNv2Deeper``, LSUN 96/128 px) and ``variant="deepest"``
(``NCSNv2Deepest``, FFHQ 256 px); they halve 2 and 3 times.

Blocks (official ``models/layers.py``, ``models/normalization.py``; all activations ELU, all norms InstanceNorm++):

* ResidualBlock: out = shortcut(x) + conv2(ELU(IN++(conv1(ELU(IN++(x))))));
* RCU (residual conv unit): per block x <- x + conv(ELU(conv(ELU(x)))), 3x3 convs without bias;
* MSF (multi-resolution fusion): sum_i upsample_bilinear(conv3x3_i(x_i)) to the finest input's size;
* CRP (chained residual pooling): x <- ELU(x); p = x; twice: p <- conv(maxpool5x5(p)), x <- x + p;
* RefineBlock: 2-block RCU on each input -> MSF (if two inputs) -> CRP -> output RCU (3 blocks at the end, else 1).

Initialisation is PyTorch's default for the convolutions and alpha, gamma ~ N(1, 0.02), beta = 0 for
InstanceNorm++ (as the official code). For CIFAR-10 (3x32x32, ngf 128) the network has 29,694,083 parameters,
equal to the official ``NCSNv2`` (counted layer by layer from the official source in ``tests/test_ncsnv2.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import gin
import torch
from torch import nn
from torch.nn import functional as F

from dlsm.errors import ConfigError
from dlsm.nets.common import check_image_shape, check_input, count_parameters
from dlsm.nets.mlp import _as_batch

__all__ = [
    "CRPBlock",
    "InstanceNorm2dPlus",
    "MSFBlock",
    "NCSNv2",
    "RCUBlock",
    "RefineBlock",
    "RefineNet",
    "ResidualBlock",
    "num_halvings",
]

# (width multiplier of ngf, "down" block first, dilation) per stage; each stage is two ResidualBlocks.
_STAGES: dict[str, tuple[tuple[int, bool, int | None], ...]] = {
    "ncsnv2": ((1, False, None), (2, True, None), (2, True, 2), (2, True, 4)),
    "deeper": ((1, False, None), (2, True, None), (2, True, None), (4, True, 2), (4, True, 4)),
    "deepest": ((1, False, None), (2, True, None), (2, True, None), (2, True, None), (4, True, 2), (4, True, 4)),
}


def num_halvings(variant: str) -> int:
    """How many times ``variant`` halves the resolution: its "down" stages without dilation."""
    return sum(down and dilation is None for _, down, dilation in _STAGES[variant])


class InstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ without conditioning (NCSN appendix; official ``normalization.InstanceNorm2dPlus``).

    For channel k with spatial mean mu_k and biased spatial variance s_k^2, and m, v the mean and the *unbiased*
    variance (``torch.var`` default, denominator C - 1) of (mu_1, ..., mu_C) over the channels of one example:

        z_k = gamma_k [ (x_k - mu_k) / sqrt(s_k^2 + eps) + alpha_k (mu_k - m) / sqrt(v + eps) ] + beta_k,  eps = 1e-5.

    The alpha term restores the relative channel means that instance normalisation removes (colour shifts).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.alpha = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.gamma = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))  # (B, C)
        m = means.mean(dim=1, keepdim=True)
        v = means.var(dim=1, keepdim=True)  # unbiased, as the official code
        shift = ((means - m) / torch.sqrt(v + self.eps) * self.alpha)[:, :, None, None]
        h = F.instance_norm(x, eps=self.eps) + shift
        return self.gamma[:, None, None] * h + self.beta[:, None, None]


def _conv3x3(c_in: int, c_out: int, *, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 convolution, stride 1, 'same' padding (dilated when ``dilation > 1``)."""
    return nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=bias)


class _ConvMeanPool(nn.Module):
    """conv (k x k, 'same') followed by 2x2 mean pooling (official ``ConvMeanPool``; H and W must be even)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(x), 2)


class ResidualBlock(nn.Module):
    """out = shortcut(x) + conv2(ELU(IN++(conv1(ELU(IN++(x)))))) (official ``layers.ResidualBlock``).

    * ``down`` without dilation: conv1 3x3 c_in -> c_in, conv2 3x3 c_in -> c_out + 2x2 mean pool,
      shortcut 1x1 c_in -> c_out + 2x2 mean pool: the resolution halves.
    * ``down`` with dilation d: conv1 c_in -> c_in, conv2 c_in -> c_out and the shortcut are dilated 3x3 convs:
      the resolution is kept (dilation stands in for the downsampling), and the shortcut is a conv even if
      c_in == c_out.
    * not ``down``: conv1 c_in -> c_out, conv2 c_out -> c_out (dilated if d); shortcut identity when c_in == c_out,
      else a 1x1 conv (a dilated 3x3 conv if d).
    """

    def __init__(self, c_in: int, c_out: int, *, down: bool = False, dilation: int | None = None) -> None:
        super().__init__()
        d = dilation or 1
        self.down = down
        self.dilation = dilation
        self.norm1 = InstanceNorm2dPlus(c_in)
        mid = c_in if down else c_out
        self.conv1 = _conv3x3(c_in, mid, dilation=d)
        self.norm2 = InstanceNorm2dPlus(mid)
        self.shortcut: nn.Module
        if down and dilation is None:
            self.conv2: nn.Module = _ConvMeanPool(mid, c_out, 3)
            self.shortcut = _ConvMeanPool(c_in, c_out, 1)
        else:
            self.conv2 = _conv3x3(mid, c_out, dilation=d)
            if down or c_in != c_out:
                self.shortcut = _conv3x3(c_in, c_out, dilation=d) if dilation else nn.Conv2d(c_in, c_out, 1)
            else:
                self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.elu(self.norm1(x)))
        h = self.conv2(F.elu(self.norm2(h)))
        return self.shortcut(x) + h


class RCUBlock(nn.Module):
    """Residual conv units (RefineNet): ``n_blocks`` times x <- x + conv(ELU(conv(ELU(x)))), bias-free 3x3 convs."""

    def __init__(self, features: int, n_blocks: int, n_stages: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(_conv3x3(features, features, bias=False) for _ in range(n_stages)) for _ in range(n_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for convs in self.blocks:
            h = x
            for conv in convs:
                h = conv(F.elu(h))
            x = x + h
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: sum_i Up(conv3x3_i(x_i)), bilinear with align_corners=True to ``size``."""

    def __init__(self, in_planes: Sequence[int], features: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(c, features) for c in in_planes)

    def forward(self, xs: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        size = tuple(size)
        out = None
        for conv, x in zip(self.convs, xs, strict=True):
            h = conv(x)
            if tuple(h.shape[2:]) != size:  # at equal size the official (always applied) interpolation is the identity
                h = F.interpolate(h, size=size, mode="bilinear", align_corners=True)
            out = h if out is None else out + h
        return out


class CRPBlock(nn.Module):
    """Chained residual pooling: x <- ELU(x); p = x; per stage p <- conv(maxpool5x5(p)), x <- x + p."""

    def __init__(self, features: int, n_stages: int = 2) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(features, features, bias=False) for _ in range(n_stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.elu(x)
        path = x
        for conv in self.convs:
            path = conv(F.max_pool2d(path, kernel_size=5, stride=1, padding=2))
            x = x + path
        return x


class RefineBlock(nn.Module):
    """RefineNet block: 2-block RCU per input -> MSF (two inputs) -> CRP -> output RCU (3 blocks if ``end``, else 1).

    ``start`` (one input, no MSF) needs ``in_planes == [features]``.
    """

    def __init__(self, in_planes: Sequence[int], features: int, *, start: bool = False, end: bool = False) -> None:
        super().__init__()
        if start != (len(in_planes) == 1) or (start and in_planes[0] != features):
            raise ValueError(f"RefineBlock: start={start} needs exactly one input of width {features}, got {in_planes}")
        self.adapt = nn.ModuleList(RCUBlock(c, 2) for c in in_planes)
        self.msf = None if start else MSFBlock(in_planes, features)
        self.crp = CRPBlock(features)
        self.output = RCUBlock(features, 3 if end else 1)

    def forward(self, xs: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        hs = [adapt(x) for adapt, x in zip(self.adapt, xs, strict=True)]
        h = hs[0] if self.msf is None else self.msf(hs, size)
        return self.output(self.crp(h))


class RefineNet(nn.Module):
    """The unconditional body F(h) of NCSNv2 on (B, C, H, W); see the module doc for the layout."""

    def __init__(self, channels: int, *, ngf: int, variant: str = "ncsnv2") -> None:
        super().__init__()
        stages = _STAGES[variant]
        widths = [m * ngf for m, _, _ in stages]
        self.begin_conv = _conv3x3(channels, ngf)
        self.stages = nn.ModuleList()
        cur = ngf
        for width, (_, down, dilation) in zip(widths, stages, strict=True):
            self.stages.append(
                nn.Sequential(
                    ResidualBlock(cur, width, down=down, dilation=dilation),
                    ResidualBlock(width, width, dilation=dilation),
                )
            )
            cur = width
        # refines[0] works on the deepest stage; refine k merges stage k with the previous refine output and
        # returns the width of the next shallower stage (official refine1..refine4 / refine5).
        self.refines = nn.ModuleList()
        last = len(widths) - 1
        for k in range(last, -1, -1):
            in_planes = [widths[k]] if k == last else [widths[k], widths[k]]
            features = widths[k - 1] if k > 0 else widths[0]
            self.refines.append(RefineBlock(in_planes, features, start=k == last, end=k == 0))
        self.normalizer = InstanceNorm2dPlus(ngf)
        self.end_conv = _conv3x3(ngf, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.begin_conv(h)
        layers = []
        for stage in self.stages:
            h = stage(h)
            layers.append(h)
        ref = self.refines[0]([layers[-1]], layers[-1].shape[2:])
        for refine, layer in zip(self.refines[1:], reversed(layers[:-1]), strict=True):
            ref = refine([layer, ref], layer.shape[2:])
        return self.end_conv(F.elu(self.normalizer(ref)))


@gin.configurable
class NCSNv2(nn.Module):
    """NCSNv2 score network s(x, sigma) = F(c_in(x)) / sigma (Technique 3) for images of shape (C, H, W).

    Args:
        shape: (C, H, W) of the images; H and W must be divisible by 2 (``variant="ncsnv2"``), 4 (``"deeper"``)
            or 8 (``"deepest"``), and be at least twice that (the coarsest stage needs 2x2 pixels).
        ngf: base width (128 for CIFAR-10 as ``configs/cifar10.yml``); stages are ngf or 2 ngf (4 ngf when deeper).
        scale_by_sigma: divide F by sigma per example (Technique 3); False returns F itself.
        centered_input: True if x is already in [-1, 1]; False (default, the official CIFAR-10 setting) maps
            x in [0, 1] to 2 x - 1 before the body, as the official network does.
        variant: ``"ncsnv2"`` (official ``NCSNv2``, 32-64 px), ``"deeper"`` (``NCSNv2Deeper``) or ``"deepest"``
            (``NCSNv2Deepest``).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        *,
        ngf: int = 128,
        scale_by_sigma: bool = True,
        centered_input: bool = False,
        variant: str = "ncsnv2",
    ) -> None:
        super().__init__()
        name = "NCSNv2"
        if variant not in _STAGES:
            raise ConfigError(f"{name}: unknown variant {variant!r}; choose one of {sorted(_STAGES)}")
        if int(ngf) != ngf or ngf < 2:
            raise ConfigError(f"{name}: ngf must be an int >= 2 (InstanceNorm++ needs 2 channels), got {ngf}")
        self.shape = check_image_shape(name, shape, num_halvings(variant))
        smallest = min(self.shape[1:]) // 2 ** num_halvings(variant)
        if smallest < 2:
            raise ConfigError(
                f"{name}: image {self.shape[1]}x{self.shape[2]} is {smallest} pixel(s) wide at the coarsest stage of "
                f"variant {variant!r}; InstanceNorm++ needs at least 2x2 there, use larger images"
            )
        self.scale_by_sigma = scale_by_sigma
        self.centered_input = centered_input
        self.variant = variant
        self.net = RefineNet(self.shape[0], ngf=int(ngf), variant=variant)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        check_input("NCSNv2", x, self.shape)
        sigma = _as_batch(sigma, x)
        f = self.net(x if self.centered_input else 2.0 * x - 1.0)  # F does not see sigma: unconditional body
        return f / sigma[:, None, None, None] if self.scale_by_sigma else f  # Technique 3: s = F / sigma

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return count_parameters(self)
