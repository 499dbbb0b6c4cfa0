"""NCSN++ score network (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H; score_sde
``models/ncsnpp.py`` with ``configs/ve/cifar10_ncsnpp_continuous.py`` and ``..._deep_continuous.py``), assembled
from diffusers' own NCSN++ layers.

    s(x, sigma) = F(x, log sigma) / sigma          (NCSNv2 Technique 3; ``scale_by_sigma=False`` returns F)

F is the CIFAR-10 "NCSN++ cont." U-Net: nf = ``channels`` = 128, widths nf * (1, 2, 2, 2), ``num_res_blocks`` = 4
BigGAN residual blocks per level (8 for "deep"), single-head self-attention at 16x16, dropout 0.1, GroupNorm with
min(C // 4, 32) groups and eps 1e-6, SiLU, and

* noise embedding  e = W2 SiLU(W1 [sin 2 pi w log sigma; cos 2 pi w log sigma] + b1) + b2, w ~ N(0, 16^2 I_nf) fixed;
* BigGAN block     h = Conv(SiLU(GN(x))) (+ FIR down/up by [1,3,3,1] before the conv) + Dense(SiLU(e)),
                   out = (skip(x) + Conv0(Dropout(SiLU(GN(h))))) / sqrt 2   (skip: 1x1 conv if widths or size change);
* attention        out = (x + Proj0(softmax(q k^T / sqrt C) v)) / sqrt 2,  q, k, v = 1x1(GN(x));
* input pyramid    ``progressive_input='residual'``: at each downsampling p <- (FIRConv3x3Down(p) + h) / sqrt 2, h <- p,
                   starting from p = x;  ``progressive='none'``: no output pyramid;
* head             F = Conv3x3_0(SiLU(GN(h))).

"Conv0"/"Proj0" are initialised with ``init_scale`` (0 in the configs: score_sde's ``default_init(0)``, a uniform
variance-scaling init of variance 1e-10 / fan_avg, so every residual branch and F itself start near zero); every
other conv / dense layer gets ``default_init(1)`` (Glorot uniform) and zero bias, q, k, v get ``default_init(0.1)``.

Why diffusers' layers and not a configured ``UNet2DModel`` (diffusers 0.42.1, checked in its source):

* ``UNet2DModel`` builds its blocks from a fixed table of names. The ones with FIR resampling and 1/sqrt 2 skip
  rescaling -- ``SkipDownBlock2D`` / ``AttnSkipDownBlock2D`` / ``SkipUpBlock2D`` / ``AttnSkipUpBlock2D``, used by the
  google/ncsnpp-* hub checkpoints -- implement score_sde's ``progressive_input='input_skip'`` (FIR-downsampled image,
  1x1 conv, summed) and ``progressive='output_skip'`` (GN-SiLU-conv to image channels at every level, FIR-upsampled
  and summed): the 256/1024-pixel NCSN++ configs. The CIFAR-10 NCSN++ uses ``'residual'`` input and ``'none'``
  output, which no block in the table does; the blocks without progressive paths (``ResnetDownsampleBlock2D`` ...)
  have no FIR and ``UNet2DModel`` does not pass them the sqrt 2 rescaling.
* The Skip blocks hard-code GroupNorm(32) in their attention and 3 image channels in their skip convs: a narrow
  smoke-test net with attention (channels 8 or 16) or a grey image cannot even be constructed.
* ``UNet2DModel`` with ``time_embedding_type='fourier'`` divides by sigma inside the body; here the preconditioning
  stays in :meth:`NCSNpp.forward`, exact in both settings of ``scale_by_sigma``.

So the residual blocks (``ResnetBlock2D`` with ``kernel='fir'``, ``output_scale_factor=sqrt 2``), the attention
(``Attention`` as built by the Skip blocks), the mid block (``UNetMidBlock2D``), the fused FIR conv-downsampling of the
pyramid (``FirDownsample2D(use_conv=True)``, score_sde's ``Downsample(with_conv=True, fir=True)``), the Fourier
features (``GaussianFourierProjection``, log sigma, scale 16, [sin; cos]) and the embedding MLP
(``TimestepEmbedding``) are diffusers'; written here are only the two level containers (:class:`DownLevel`,
:class:`UpLevel`), the loop of :class:`NCSNpp` and the score_sde initialisation. :func:`closest_unet2d_config` gives
the closest ``UNet2DModel`` (the hub NCSN++ layout) for comparison.

Parameter counts (32x32x3, nf 128; trainable; the 128 fixed Fourier frequencies are a frozen parameter in both codes):

    4 blocks ("NCSN++ cont.")        62,758,787   official score_sde_pytorch NCSNpp: 62,758,787
    8 blocks ("NCSN++ cont. deep")  107,586,947   official score_sde_pytorch NCSNpp: 107,586,947
    closest UNet2DModel (4 / 8)      61,894,796 / 106,722,956, i.e. 863,991 fewer: its input_skip 1x1 convs (2,560)
                                     and output_skip GN + conv3x3 heads (3 x 7,427) replace the residual pyramid's
                                     FIR 3x3 convs 3->128->256->256 (888,832).

The paper (App. H) and the score_sde README give no parameter counts; the official numbers above come from
instantiating ``yang-song/score_sde_pytorch`` ``models/ncsnpp.py`` (commit cb1f359) with the two configs.

Checked once against that official code (its CUDA upfirdn2d replaced by its own CPU fallback, weights copied): the
outputs agree to 3e-13 in float64 for nf 8/16/32 with 2-4 levels, grey and RGB. The tests compare against a float64
forward written from the equations above instead.

Remaining differences from score_sde's NCSN++:

* none in the input: as score_sde with ``data.centered=False``, the network maps data in [0, 1] to 2 x - 1 before
  its body (``centered_input=False``, the default); with data already in [-1, 1] set ``centered_input=True``;
* the FIR resampling inside the BigGAN blocks and the pyramid runs through :func:`upfirdn2d` (one grouped conv)
  instead of diffusers' ``upfirdn2d_native`` (a reshape to one channel, then a full-resolution conv and a stride):
  the same numbers (tested against it in float64), 2.5x faster per NCSN++ training step on CPU (nf 16, 32x32);
* attention runs through ``F.scaled_dot_product_attention`` (diffusers' processor) instead of an einsum: same maths,
  but on CPU its kernel has no double backward (first-order gradients, all DSM training needs, are fine; for
  gradients of gradients set ``diffusers.models.attention_processor.AttnProcessor()`` on the attention modules).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import gin
import torch
from torch import nn

from dlsm.errors import ConfigError
from dlsm.nets.common import check_groups, check_image_shape, check_input, count_parameters
from dlsm.nets.mlp import _as_batch

__all__ = ["NCSNpp", "closest_unet2d_config"]  # and, on first use, DownLevel, UpLevel, upfirdn2d

# ``import diffusers`` costs 2.5-4.6 s on these CPUs (it pulls in torch._dynamo): every launch pays it if this module,
# which gin needs to know ``NCSNpp``, imports it at the top. So diffusers and the blocks built on it are imported
# when an NCSN++ is built, and ``upfirdn2d`` / ``DownLevel`` / ``UpLevel`` when first asked for (PEP 562).
_FROM_BLOCKS = ("DownLevel", "UpLevel", "upfirdn2d")


def __getattr__(name: str):
    if name in _FROM_BLOCKS:
        return getattr(importlib.import_module("dlsm.nets.ncsnpp_blocks"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



def _skip_channels(channels: int, widths: Sequence[int], num_res_blocks: int) -> tuple[list[list[int]], set[int]]:
    """score_sde's ``hs_c`` bookkeeping: the widths each encoder step saves for the decoder, popped per decoder level
    (``num_res_blocks + 1`` each), and every width a GroupNorm will normalise (the decoder's inputs are concatenations
    of the current width and a skip)."""
    saved = [channels]
    for level, width in enumerate(widths):
        saved += [width] * num_res_blocks + ([width] if level < len(widths) - 1 else [])
    norm_widths, skips, cur = {channels, *widths}, list(saved), widths[-1]
    up_skips = []
    for width in reversed(widths):
        up_skips.append([skips.pop() for _ in range(num_res_blocks + 1)])
        norm_widths |= {a + s for a, s in zip([cur] + [width] * num_res_blocks, up_skips[-1], strict=True)}
        cur = width
    return up_skips, norm_widths


@gin.configurable
class NCSNpp(nn.Module):
    """NCSN++ score network s(x, sigma) = F(x, log sigma) / sigma for images of shape (C, H, W). See the module doc.

    Args:
        shape: (C, H, W); H and W must be divisible by 2**(len(channel_mult) - 1).
        channels: nf, the base width; level i has ``channels * channel_mult[i]`` channels, the embedding 4 nf.
        channel_mult: width multipliers per level; the resolution halves between levels.
        num_res_blocks: BigGAN blocks per level in the encoder (the decoder has one more); 4, or 8 for "deep".
        attn_resolutions: feature-map sizes (min(H, W) // 2**level) that get self-attention; (16,) for 32x32.
        dropout: dropout rate inside the residual blocks.
        fourier_scale: standard deviation of the fixed Fourier frequencies of log sigma.
        scale_by_sigma: divide F by sigma (NCSNv2 Technique 3, score_sde ``scale_by_sigma=True`` for VE).
        norm_groups: GroupNorm group count for every norm; default min(C // 4, 32) per norm as in NCSN++.
        init_scale: init scale of the last conv of each block, of the attention output and of the head (0 in NCSN++).
        centered_input: False (default): x is in [0, 1] and the body sees 2 x - 1 (score_sde with
            ``data.centered=False``, the official DLSM configs); True: x is already in [-1, 1] and is used as given.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        *,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        fourier_scale: float = 16.0,
        scale_by_sigma: bool = True,
        norm_groups: int | None = None,
        init_scale: float = 0.0,
        centered_input: bool = False,
    ) -> None:
        super().__init__()
        name = "NCSNpp"
        self.centered_input = centered_input
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or channels < 1 or num_res_blocks < 1 or any(m < 1 for m in channel_mult):
            raise ConfigError(f"{name}: needs channels >= 1, num_res_blocks >= 1 and positive channel_mult entries")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{name}: dropout must be in [0, 1), got {dropout}")
        c, h, w = check_image_shape(name, shape, len(channel_mult) - 1)
        self.shape = (c, h, w)
        self.scale_by_sigma = scale_by_sigma
        widths = [channels * m for m in channel_mult]
        resolutions = [min(h, w) // 2**i for i in range(len(widths))]
        unknown = sorted(set(attn_resolutions) - set(resolutions))
        if unknown:
            raise ConfigError(f"{name}: attn_resolutions {unknown} are not among the levels' sizes {resolutions}")

        up_skips, norm_widths = _skip_channels(channels, widths, num_res_blocks)
        groups = self._group_rule(name, sorted(norm_widths), norm_groups)

        from diffusers.models.embeddings import GaussianFourierProjection, TimestepEmbedding
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

        from dlsm.nets.ncsnpp_blocks import EPS, SQRT2, DownLevel, UpLevel

        temb = 4 * channels
        block = {"temb": temb, "groups": groups, "dropout": dropout}
        self.time_proj = GaussianFourierProjection(embedding_size=channels, scale=fourier_scale, log=True)
        self.time_embedding = TimestepEmbedding(2 * channels, temb)
        self.conv_in = nn.Conv2d(c, channels, 3, padding=1)
        attention = [r in attn_resolutions for r in resolutions]
        self.down_blocks = nn.ModuleList()
        cur, pyramid = channels, c
        for level, width in enumerate(widths):
            last = level == len(widths) - 1
            self.down_blocks.append(DownLevel(cur, width, pyramid_channels=pyramid, num_res_blocks=num_res_blocks,
                                              attention=attention[level], downsample=not last, **block))
            cur, pyramid = width, (pyramid if last else width)
        self.mid_block = UNetMidBlock2D(cur, temb, dropout=dropout, resnet_eps=EPS, resnet_act_fn="silu",
                                        resnet_groups=groups(cur), attn_groups=groups(cur), attention_head_dim=cur,
                                        output_scale_factor=SQRT2)
        self.up_blocks = nn.ModuleList()
        for i, level in enumerate(reversed(range(len(widths)))):
            self.up_blocks.append(UpLevel(cur, widths[level], skip_channels=up_skips[i], attention=attention[level],
                                          upsample=level > 0, **block))
            cur = widths[level]
        self.conv_norm_out = nn.GroupNorm(groups(cur), cur, eps=EPS)
        self.conv_out = nn.Conv2d(cur, c, 3, padding=1)
        self.reset_parameters(init_scale)

    @staticmethod
    def _group_rule(name: str, widths: list[int], norm_groups: int | None):
        """The GroupNorm group count per width; ConfigError unless it divides every normalised width."""
        if norm_groups is not None:
            check_groups(name, widths, norm_groups)
            return lambda width: norm_groups
        bad = [w for w in widths if w < 4 or w % min(w // 4, 32)]
        if bad:
            raise ConfigError(
                f"{name}: GroupNorm with min(C // 4, 32) groups does not divide the widths {bad} "
                f"(all normalised widths: {widths}); pass norm_groups dividing all of them"
            )
        return lambda width: min(width // 4, 32)

    @torch.no_grad()
    def reset_parameters(self, init_scale: float = 0.0) -> None:
        """score_sde's initialisation: ``default_init(1)`` and zero bias for every conv and dense layer,
        ``default_init(0.1)`` for attention q, k, v, ``default_init(init_scale)`` for the last conv of each residual
        block, the attention output and the head. GroupNorms: weight 1, bias 0 (PyTorch's default)."""
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D

        from dlsm.nets.ncsnpp_blocks import default_init_

        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                default_init_(m, 1.0)
        for m in self.modules():
            if isinstance(m, ResnetBlock2D):
                default_init_(m.conv2, init_scale)
            elif isinstance(m, Attention):
                for layer in (m.to_q, m.to_k, m.to_v):
                    default_init_(layer, 0.1)
                default_init_(m.to_out[0], init_scale)
        default_init_(self.conv_out, init_scale)

    def body(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """F(x, log sigma) for x of shape (B, C, H, W) and sigma of shape (B,) (the embedding takes the log)."""
        temb = self.time_embedding(self.time_proj(sigma).to(x.dtype))
        h = self.conv_in(x)
        saved, pyramid = [h], x
        for level in self.down_blocks:
            h, level_saved, pyramid = level(h, temb, pyramid)
            saved += level_saved
        h = self.mid_block(h, temb)
        for level in self.up_blocks:
            h = level(h, saved, temb)
        return self.conv_out(nn.functional.silu(self.conv_norm_out(h)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """s(x, sigma) = F(c_in(x), log sigma) / sigma (or F when ``scale_by_sigma=False``), c_in(x) = 2 x - 1 unless
        ``centered_input``; sigma a float or (B,) tensor."""
        check_input("NCSNpp", x, self.shape)
        sigma = _as_batch(sigma, x)
        f = self.body(x if self.centered_input else 2.0 * x - 1.0, sigma)
        return f / sigma[:, None, None, None] if self.scale_by_sigma else f  # Technique 3: s = F / sigma

    def num_parameters(self) -> int:
        """Number of trainable parameters (the fixed Fourier frequencies are a frozen parameter, not counted)."""
        return count_parameters(self)


def closest_unet2d_config(
    shape: tuple[int, int, int],
    *,
    channels: int = 128,
    channel_mult: Sequence[int] = (1, 2, 2, 2),
    num_res_blocks: int = 4,
    attn_resolutions: Sequence[int] = (16,),
    dropout: float = 0.1,
) -> dict:
    """Keyword arguments of the ``diffusers.UNet2DModel`` closest to :class:`NCSNpp`: the hub NCSN++ layout
    (Skip blocks: progressive input_skip / output_skip, the 256/1024-pixel score_sde configs), fourier embedding of
    log sigma with scale 16 and output divided by sigma. Needs 3 image channels and widths >= 128 with attention."""
    from dlsm.nets.ncsnpp_blocks import EPS, SQRT2

    c, h, w = check_image_shape("closest_unet2d_config", shape, len(channel_mult) - 1)
    resolutions = [min(h, w) // 2**i for i in range(len(channel_mult))]
    down = tuple("AttnSkipDownBlock2D" if r in attn_resolutions else "SkipDownBlock2D" for r in resolutions)
    up = tuple("AttnSkipUpBlock2D" if r in attn_resolutions else "SkipUpBlock2D" for r in reversed(resolutions))
    return {
        "sample_size": (h, w),
        "in_channels": c,
        "out_channels": c,
        "time_embedding_type": "fourier",
        "block_out_channels": tuple(channels * m for m in channel_mult),
        "layers_per_block": num_res_blocks,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_scale_factor": SQRT2,
        "norm_num_groups": None,
        "norm_eps": EPS,
        "dropout": dropout,
        "attention_head_dim": None,
        "act_fn": "silu",
    }
