"""The blocks of NCSN++ (:mod:`dlsm.nets.ncsnpp`): FIR resampling as one grouped convolution (:func:`upfirdn2d`),
score_sde's BigGAN residual blocks and attention from diffusers' layers, and one encoder / decoder level each
(:class:`DownLevel`, :class:`UpLevel`), with score_sde's ``default_init``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import FirDownsample2D
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from torch.nn import functional as F

__all__ = [
    "EPS", "FIR_KERNEL", "SQRT2", "DownLevel", "UpLevel", "default_init_", "fir_downsample", "fir_upsample",
    "upfirdn2d",
]

SQRT2 = math.sqrt(2.0)
EPS = 1e-6  # GroupNorm eps of score_sde
FIR_KERNEL = (1, 3, 3, 1)


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Upsample by zero insertion, pad, FIR-filter, decimate: score_sde's / StyleGAN2's ``upfirdn2d`` (the maths of
    diffusers' ``upfirdn2d_native``) for x (B, C, H, W), non-negative pads, as one grouped (depthwise) convolution.

    diffusers' version reshapes to (B*C, 1, H, W), filters at full resolution and then drops samples; on CPU its
    backward costs about 50x this one (measured, batch 32 x 32 channels at 32x32), which made FIR resampling most of
    an NCSN++ training step. Same numbers: the tests compare both in float64, values and gradients.
    """
    b, c, h, w = x.shape
    if up > 1:  # x[..., i, j] lands at (up * i, up * j), zeros between
        x = F.pad(x.reshape(b, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, [0, 1]).to(x)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def _fir_kernel(gain: float) -> torch.Tensor:
    k = torch.tensor(FIR_KERNEL, dtype=torch.float64)
    k = torch.outer(k, k)
    return k / k.sum() * gain


def fir_downsample(x: torch.Tensor) -> torch.Tensor:
    """diffusers' ``downsample_2d(x, kernel=(1, 3, 3, 1))``: FIR [1,3,3,1] (normalised), then every second pixel."""
    return upfirdn2d(x, _fir_kernel(1.0), down=2, pad=(1, 1))


def fir_upsample(x: torch.Tensor) -> torch.Tensor:
    """diffusers' ``upsample_2d(x, kernel=(1, 3, 3, 1))``: zero insertion x2, then FIR [1,3,3,1] with gain 4."""
    return upfirdn2d(x, _fir_kernel(4.0), up=2, pad=(2, 1))


class FirConvDownsample2D(FirDownsample2D):
    """diffusers' ``FirDownsample2D(use_conv=True)`` (FIR [1,3,3,1], then the 3x3 conv with stride 2; score_sde's
    ``Downsample(with_conv=True, fir=True)``) with its FIR step done by :func:`upfirdn2d`. Same parameters and names."""

    def _downsample_2d(self, hidden_states, weight=None, kernel=None, factor=2, gain=1):  # noqa: ANN001, ANN202
        if not self.use_conv or factor != 2 or tuple(kernel) != FIR_KERNEL:
            return super()._downsample_2d(hidden_states, weight, kernel, factor, gain)
        # pad (k - factor) + (conv - 1) = 4 split (2, 2), no decimation; the conv strides
        filtered = upfirdn2d(hidden_states, _fir_kernel(gain), pad=(2, 2))
        return F.conv2d(filtered, weight, stride=factor, padding=0)


def _resblock(c_in: int, c_out: int, *, temb: int, groups, dropout: float, **kw) -> ResnetBlock2D:
    """BigGAN block of NCSN++ (``layerspp.ResnetBlockBigGANpp`` with skip_rescale, FIR kernel [1,3,3,1]); its FIR
    resampling runs through :func:`fir_downsample` / :func:`fir_upsample` (the same maths, faster)."""
    block = ResnetBlock2D(
        in_channels=c_in,
        out_channels=c_out,
        temb_channels=temb,
        eps=EPS,
        groups=groups(c_in),
        groups_out=groups(c_out),
        dropout=dropout,
        non_linearity="silu",
        output_scale_factor=SQRT2,
        **kw,
    )
    if block.downsample is not None:
        block.downsample = fir_downsample
    if block.upsample is not None:
        block.upsample = fir_upsample
    return block


def _attention(channels: int, *, groups) -> Attention:
    """Single-head self-attention, residual, 1/sqrt 2 rescaling (``layerspp.AttnBlockpp``), as in the Skip blocks."""
    return Attention(
        channels,
        heads=1,
        dim_head=channels,
        rescale_output_factor=SQRT2,
        eps=EPS,
        norm_num_groups=groups(channels),
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )


class DownLevel(nn.Module):
    """One encoder level: ``num_res_blocks`` BigGAN blocks (each followed by attention at attention resolutions);
    then, except at the last level, a FIR-downsampling BigGAN block and the residual input pyramid
    p <- (FIRConv3x3Down(p) + h) / sqrt 2, h <- p. Every block output is saved for the decoder."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        pyramid_channels: int,
        num_res_blocks: int,
        attention: bool,
        downsample: bool,
        temb: int,
        groups,
        dropout: float,
    ) -> None:
        super().__init__()
        block = {"temb": temb, "groups": groups, "dropout": dropout}
        self.resnets = nn.ModuleList(
            [_resblock(c_in if i == 0 else c_out, c_out, **block) for i in range(num_res_blocks)]
        )
        self.attentions = nn.ModuleList(
            [_attention(c_out, groups=groups) for _ in range(num_res_blocks)] if attention else []
        )
        self.resnet_down = (
            _resblock(c_out, c_out, use_in_shortcut=True, down=True, kernel="fir", **block) if downsample else None
        )
        self.pyramid_down = (
            FirConvDownsample2D(pyramid_channels, c_out, use_conv=True, fir_kernel=FIR_KERNEL) if downsample else None
        )

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, pyramid: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        saved = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[i](h)
            saved.append(h)
        if self.resnet_down is not None:
            h = self.resnet_down(h, temb)
            pyramid = (self.pyramid_down(pyramid) + h) / SQRT2  # progressive_input='residual', skip_rescale
            h = pyramid
            saved.append(h)
        return h, saved, pyramid


class UpLevel(nn.Module):
    """One decoder level: ``len(skip_channels)`` BigGAN blocks on [h; saved activation], attention once at attention
    resolutions, then (except at the top level) a FIR-upsampling BigGAN block. No output pyramid ('none')."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        skip_channels: Sequence[int],
        attention: bool,
        upsample: bool,
        temb: int,
        groups,
        dropout: float,
    ) -> None:
        super().__init__()
        block = {"temb": temb, "groups": groups, "dropout": dropout}
        ins = [c_in] + [c_out] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(
            [_resblock(a + s, c_out, **block) for a, s in zip(ins, skip_channels, strict=True)]
        )
        self.attention = _attention(c_out, groups=groups) if attention else None
        self.resnet_up = (
            _resblock(c_out, c_out, use_in_shortcut=True, up=True, kernel="fir", **block) if upsample else None
        )

    def forward(self, h: torch.Tensor, saved: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(torch.cat([h, saved.pop()], dim=1), temb)
        if self.attention is not None:
            h = self.attention(h)
        if self.resnet_up is not None:
            h = self.resnet_up(h, temb)
        return h


def default_init_(layer: nn.Module, scale: float) -> None:
    """score_sde ``default_init(scale)``: uniform variance scaling, variance scale / fan_avg (1e-10 for scale 0),
    i.e. Glorot uniform with gain sqrt(scale); zero bias."""
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale if scale != 0 else 1e-10))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
