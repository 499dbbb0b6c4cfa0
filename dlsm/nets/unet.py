"""Noise-conditional U-Net score model for small images (8x8 and 32x32, grey or RGB).

The parameterisation is written out in one place, :meth:`ScoreUNet.forward` (EDM-style preconditioning):

    s(x, sigma; phi) = F(c_in(sigma) x, c_noise(sigma)) * c_out(sigma)

    c_in    = 1/sqrt(sigma^2 + sigma_data^2)  (or 1 when sigma_data is None)
    c_noise = log(sigma)                      (NCSN++'s input to a scale-16 Gaussian Fourier embedding; not /4)
    c_out   = 1/sigma                         (NCSNv2 Technique 3, ``scale_by_sigma=True``) or 1.

The body F is a compact DDPM / NCSN++-shaped U-Net written here (:class:`UNet`): a 3x3 stem, per level
``num_res_blocks`` ResNet blocks (GroupNorm -> SiLU -> conv, the noise embedding projected to a per-channel bias
added after the first conv, GroupNorm -> SiLU -> dropout -> conv, 1x1 skip when widths differ), optional
single-head self-attention at the listed resolutions, a stride-2 conv between levels, a mirrored decoder that
concatenates the saved activations (skip connections), nearest x2 upsampling + conv, and GroupNorm -> SiLU -> conv out.

Why not diffusers' ``UNet2DModel`` as the body (evaluated for issue 12; diffusers 0.42.1 installs from the
registry and constructs offline with HF_HUB_OFFLINE=1, and runs 8x8 inputs on CPU with up to 4 levels since its
last level does not downsample; with 5 levels it fails mid-forward with a tensor-size RuntimeError, not at
construction; its default configuration has 274M parameters):

* its ``time_embedding_type='fourier'`` mode hard-codes the preconditioning inside the body: it takes sigma as
  the timestep, applies log itself and divides the output by sigma (``unet_2d.py``: ``sample / timesteps``), so
  c_noise and c_out would be split between diffusers and this file and ``scale_by_sigma=False`` would need an
  undo-multiplication -- against the house rule of one visible preconditioning;
* ``import diffusers`` costs 2.5-4.6 s on top of torch on these CPUs (it imports torch._dynamo and the hub
  client), for every test and every worker that builds a network;
* it is not faster and not smaller here: with the same widths (32, 64, 64), one block per level, GroupNorm(8) and
  no attention it has exactly as many parameters as this body (1,049,825 for 1x8x8) and, for batch 128 on one
  thread, forward+backward took 143 ms at 8x8 and 2.5-3.6 s at 32x32 against 150 ms and 2.4-3.7 s here
  (interleaved runs on shared cores; the difference is noise); its mid-block attention is on by default;
* a parameter count or a float64 check of the hand-written parts is a few lines; of diffusers' it is its code.

The published NCSN++ checkpoints on the hub are ``UNet2DModel`` instances; a wrapper for them (with the
division by sigma accounted for) belongs with the NCSN++/CIFAR configuration, not with these small nets.
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

__all__ = ["AttentionBlock", "ResBlock", "ScoreUNet", "UNet"]


class ResBlock(nn.Module):
    """h = conv1(SiLU(GN(x))) + Dense(SiLU(e)); out = skip(x) + conv2(dropout(SiLU(GN(h)))) (DDPM / NCSN++ block)."""

    def __init__(self, c_in_: int, c_out: int, *, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in_)
        self.conv1 = nn.Conv2d(c_in_, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in_, c_out, 1) if c_in_ != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(nn.functional.silu(emb))[:, :, None, None]  # per-channel bias from the noise level
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions: x + proj(softmax(q^T k / sqrt(C)) v), q,k,v = 1x1(GN(x))."""

    def __init__(self, channels: int, *, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each (B, HW, C)
        a = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """The body F(x, c_noise): a U-Net on (B, C, H, W) conditioned on c_noise of shape (B,). See the module doc."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        *,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float,
        emb_dim: int,
        norm_groups: int,
        fourier_scale: float,
    ) -> None:
        super().__init__()
        name = "ScoreUNet"
        if not channel_mult or channels < 1 or num_res_blocks < 1 or any(m < 1 for m in channel_mult):
            raise ConfigError(f"{name}: needs channels >= 1, num_res_blocks >= 1 and positive channel_mult entries")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{name}: dropout must be in [0, 1), got {dropout}")
        c, h, w = check_image_shape(name, shape, len(channel_mult) - 1)
        widths = [channels * m for m in channel_mult]
        check_groups(name, [channels, *widths], norm_groups)
        resolutions = [min(h, w) // 2**i for i in range(len(channel_mult))]
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise ConfigError(f"{name}: attention_resolutions {unknown} are not among the levels' sizes {resolutions}")
        attn = set(attention_resolutions)
        block = {"emb_dim": emb_dim, "groups": norm_groups, "dropout": dropout}

        self.embed = GaussianFourierEmbedding(emb_dim, scale=fourier_scale)
        self.conv_in = nn.Conv2d(c, channels, 3, padding=1)
        self.down = nn.ModuleList()  # per level: blocks (+attention); then a downsampling conv except at the last
        skips, cur = [channels], channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, width, **block))
                cur = width
                if resolutions[level] in attn:
                    self.down.append(AttentionBlock(cur, groups=norm_groups))
                skips.append(cur)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, **block)])
        if resolutions[-1] in attn:
            self.mid.append(AttentionBlock(cur, groups=norm_groups))
        self.mid.append(ResBlock(cur, cur, **block))
        self.up = nn.ModuleList()  # per level: blocks on [h; skip] (+attention); then an upsampling conv except at 0
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), widths[level], **block))
                cur = widths[level]
                if resolutions[level] in attn:
                    self.up.append(AttentionBlock(cur, groups=norm_groups))
            if level > 0:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1))
                )
        self.norm_out = nn.GroupNorm(norm_groups, cur)
        self.conv_out = nn.Conv2d(cur, c, 3, padding=1)

    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor) -> torch.Tensor:
        emb = self.embed(noise_cond)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            else:
                h = layer(h)
            if not isinstance(layer, AttentionBlock):
                hs.append(h)
            else:
                hs[-1] = h  # attention refines the block output that is saved for the decoder
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


@gin.configurable
class ScoreUNet(nn.Module):
    """Noise-conditional score network s(x, sigma; phi) for images of shape (C, H, W).

    s(x, sigma) = F(c_in x, log sigma) / sigma  (Technique 3; without the division when ``scale_by_sigma=False``).

    Args:
        shape: (C, H, W) of the images; H and W must be divisible by 2**(len(channel_mult) - 1).
        channels: base width; level i has ``channels * channel_mult[i]`` channels.
        channel_mult: width multipliers per level; the resolution halves between levels.
        num_res_blocks: ResNet blocks per level in the encoder (the decoder has one more, as in DDPM).
        attention_resolutions: feature-map sizes (e.g. ``(16,)`` for 32x32 inputs) that get self-attention.
        dropout: dropout rate inside the ResNet blocks.
        scale_by_sigma: c_out = 1/sigma (NCSNv2 Technique 3) when True, else 1.
        sigma_data: c_in = 1/sqrt(sigma^2 + sigma_data^2) when given, else 1.
        emb_dim: width of the noise embedding; default ``4 * channels`` (NCSN++).
        norm_groups: GroupNorm group count; every width must be divisible by it.
        fourier_scale: standard deviation of the Fourier frequencies of log sigma (16 as in NCSN++).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        *,
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        scale_by_sigma: bool = True,
        sigma_data: float | None = None,
        emb_dim: int | None = None,
        norm_groups: int = 8,
        fourier_scale: float = 16.0,
    ) -> None:
        super().__init__()
        check_positive("ScoreUNet", norm_groups=norm_groups, **({} if emb_dim is None else {"emb_dim": emb_dim}))
        self.shape = tuple(int(s) for s in shape)
        self.scale_by_sigma = scale_by_sigma
        self.sigma_data = sigma_data
        self.net = UNet(
            self.shape,
            channels=channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions),
            dropout=dropout,
            emb_dim=4 * channels if emb_dim is None else emb_dim,
            norm_groups=norm_groups,
            fourier_scale=fourier_scale,
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        check_input("ScoreUNet", x, self.shape)
        sigma = _as_batch(sigma, x)
        f = self.net(c_in(sigma, self.sigma_data)[:, None, None, None] * x, sigma.log())  # c_noise = log sigma
        return f / sigma[:, None, None, None] if self.scale_by_sigma else f  # Technique 3: s = F / sigma

    def num_parameters(self) -> int:
        """Number of trainable parameters (the Fourier frequencies are a buffer and not counted)."""
        return count_parameters(self)
