"""Parameter names of the official networks and their one-to-one map onto this project's networks.

The official score model is ``NCSNpp`` of yang-song/score_sde_pytorch (``models/ncsnpp.py``, ``layerspp.py``,
``layers.py``, ``up_or_down_sampling.py``), unchanged in chen-hao-chao/dlsm; the official classifier is DLSM's
``Classifier`` wrapping ``resnet_cond`` (``models/classifier.py``, ``models/resnet_cond.py``). Their state dicts name
parameters after the order of construction (``all_modules.<i>.Conv_0.weight``); the lists below are derived from
that order, read from the official code, for the settings of one of our networks:

* :func:`official_ncsnpp_names` / :func:`ncsnpp_key_map` (:class:`~dlsm.nets.ncsnpp.NCSNpp`, BigGAN blocks,
  ``progressive='none'``, ``progressive_input='residual'``, Fourier embedding, conditional);
* :func:`official_classifier_names` / :func:`classifier_key_map` (:class:`~dlsm.nets.convnet.ConvClassifier` with
  four stages, ``norm='batch'``, ``condition='stage'``). The official ``ResNet_cond`` hard-codes the widths
  ``channels=(64, 128, 256, 512)``; other widths give the same names with other shapes (the official code cannot
  build them; the tests use them for small end-to-end runs).

Every map entry is (official name, our name, official shape, transpose). Only the attention projections differ in
layout: score_sde's ``NIN`` stores W of shape (in, out) and computes x W + b, diffusers' ``Linear`` stores (out, in),
so those four matrices per attention block are transposed. The official ``sigmas`` buffer (the VE noise levels,
unused by a continuous-time NCSN++) has no counterpart here (our name ``None``).
This module holds the names only; reading and writing files is :mod:`dlsm.train.official`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

from torch import nn

from dlsm.errors import CheckpointError

__all__ = [
    "Entry", "classifier_config", "classifier_key_map", "describe_classifier", "describe_ncsnpp", "ncsnpp_config",
    "ncsnpp_key_map", "official_classifier_names", "official_ncsnpp_names",
]

OFFICIAL_CLASSIFIER_WIDTHS = (64, 128, 256, 512)  # hard-coded in resnet_cond.ResNet_cond
FOURIER = "all_modules.0.W"


class Entry(NamedTuple):
    """One official tensor: its name, our name (None: no counterpart), its official shape, and whether our tensor is
    its transpose."""

    official: str
    ours: str | None
    shape: tuple[int, ...]
    transpose: bool = False


def _gn(off: str, ours: str, c: int) -> Iterator[Entry]:
    for p in ("weight", "bias"):
        yield Entry(f"{off}.{p}", f"{ours}.{p}", (c,))


def _layer(off: str, ours: str, weight: tuple[int, ...], bias: bool = True) -> Iterator[Entry]:
    yield Entry(f"{off}.weight", f"{ours}.weight", weight)
    if bias:
        yield Entry(f"{off}.bias", f"{ours}.bias", (weight[0],))


def _resnet(off: str, ours: str, c_in: int, c_out: int, temb: int, shortcut: bool) -> Iterator[Entry]:
    """``layerspp.ResnetBlockBigGANpp`` -> diffusers ``ResnetBlock2D``; Conv_2 exists if widths differ, up or down."""
    yield from _gn(f"{off}.GroupNorm_0", f"{ours}.norm1", c_in)
    yield from _layer(f"{off}.Conv_0", f"{ours}.conv1", (c_out, c_in, 3, 3))
    yield from _layer(f"{off}.Dense_0", f"{ours}.time_emb_proj", (c_out, temb))
    yield from _gn(f"{off}.GroupNorm_1", f"{ours}.norm2", c_out)
    yield from _layer(f"{off}.Conv_1", f"{ours}.conv2", (c_out, c_out, 3, 3))
    if shortcut:
        yield from _layer(f"{off}.Conv_2", f"{ours}.conv_shortcut", (c_out, c_in, 1, 1))


def _attention(off: str, ours: str, c: int) -> Iterator[Entry]:
    """``layerspp.AttnBlockpp`` (GroupNorm_0, NIN_0..3 = q, k, v, out) -> diffusers ``Attention``."""
    yield from _gn(f"{off}.GroupNorm_0", f"{ours}.group_norm", c)
    for i, proj in enumerate(("to_q", "to_k", "to_v", "to_out.0")):
        yield Entry(f"{off}.NIN_{i}.W", f"{ours}.{proj}.weight", (c, c), transpose=True)
        yield Entry(f"{off}.NIN_{i}.b", f"{ours}.{proj}.bias", (c,))


def _ncsnpp_entries(cfg: Mapping) -> Iterator[Entry]:
    """score_sde ``NCSNpp.__init__`` walked in its order of ``modules.append``, paired with our modules.
    Long because it is the whole network, level by level, as the official constructor is."""
    c, h, w = cfg["shape"]
    nf, mult, nrb = int(cfg["channels"]), tuple(cfg["channel_mult"]), int(cfg["num_res_blocks"])
    attn = set(cfg["attn_resolutions"])
    temb, widths = 4 * nf, [nf * m for m in mult]
    resolutions = [min(h, w) // 2**i for i in range(len(widths))]
    idx = iter(range(10**6))

    def mod() -> str:
        return f"all_modules.{next(idx)}"

    yield Entry("sigmas", None, (int(cfg.get("num_scales", 1000)),))
    yield Entry(f"{mod()}.W", "time_proj.weight", (nf,))
    yield from _layer(mod(), "time_embedding.linear_1", (temb, 2 * nf))
    yield from _layer(mod(), "time_embedding.linear_2", (temb, temb))
    yield from _layer(mod(), "conv_in", (nf, c, 3, 3))
    saved, cur, pyramid = [nf], nf, c
    for level, width in enumerate(widths):
        ours = f"down_blocks.{level}"
        for i in range(nrb):
            yield from _resnet(mod(), f"{ours}.resnets.{i}", cur, width, temb, cur != width)
            cur = width
            if resolutions[level] in attn:
                yield from _attention(mod(), f"{ours}.attentions.{i}", cur)
            saved.append(cur)
        if level < len(widths) - 1:
            yield from _resnet(mod(), f"{ours}.resnet_down", cur, cur, temb, True)
            yield from _layer(f"{mod()}.Conv2d_0", f"{ours}.pyramid_down.Conv2d_0", (cur, pyramid, 3, 3))
            pyramid = cur
            saved.append(cur)
    yield from _resnet(mod(), "mid_block.resnets.0", cur, cur, temb, False)
    yield from _attention(mod(), "mid_block.attentions.0", cur)
    yield from _resnet(mod(), "mid_block.resnets.1", cur, cur, temb, False)
    for i, level in enumerate(reversed(range(len(widths)))):
        ours, width = f"up_blocks.{i}", widths[level]
        for j in range(nrb + 1):
            c_in = cur + saved.pop()
            yield from _resnet(mod(), f"{ours}.resnets.{j}", c_in, width, temb, c_in != width)
            cur = width
        if resolutions[level] in attn:
            yield from _attention(mod(), f"{ours}.attention", cur)
        if level > 0:
            yield from _resnet(mod(), f"{ours}.resnet_up", cur, cur, temb, True)
    yield from _gn(mod(), "conv_norm_out", cur)
    yield from _layer(mod(), "conv_out", (c, cur, 3, 3))


def ncsnpp_key_map(config: Mapping) -> list[Entry]:
    """The official NCSN++ tensors for ``config`` (keys of :func:`ncsnpp_config`), in state-dict order, each with
    our name."""
    return list(_ncsnpp_entries(config))


def official_ncsnpp_names(config: Mapping) -> list[tuple[str, tuple[int, ...]]]:
    """score_sde's NCSNpp state-dict names and shapes, in order (``module.`` stripped), for ``config``: ``shape``
    (C, H, W), ``channels`` (nf), ``channel_mult``, ``num_res_blocks``, ``attn_resolutions`` and optionally
    ``num_scales`` (the length of its ``sigmas`` buffer, 1000 in the CIFAR configs)."""
    return [(e.official, e.shape) for e in ncsnpp_key_map(config)]


def ncsnpp_config(net: nn.Module, *, num_scales: int = 1000) -> dict:
    """The settings of a built :class:`~dlsm.nets.ncsnpp.NCSNpp` that fix the official names. CheckpointError if a
    GroupNorm of ``net`` does not use score_sde's min(C // 4, 32) groups and eps 1e-6 (same tensors, other maths)."""
    for name, m in net.named_modules():
        if isinstance(m, nn.GroupNorm) and (m.num_groups != min(m.num_channels // 4, 32) or m.eps != 1e-6):
            raise CheckpointError(
                f"NCSNpp GroupNorm {name} has {m.num_groups} groups, eps {m.eps}; score_sde's NCSN++ uses "
                f"min(C // 4, 32) = {min(m.num_channels // 4, 32)} and 1e-6: leave NCSNpp.norm_groups unset"
            )
    nf = net.conv_in.out_channels
    levels = list(net.down_blocks)
    c, h, w = net.shape
    return {
        "shape": (c, h, w),
        "channels": nf,
        "channel_mult": tuple(lv.resnets[0].conv1.out_channels // nf for lv in levels),
        "num_res_blocks": len(levels[0].resnets),
        "attn_resolutions": tuple(min(h, w) // 2**i for i, lv in enumerate(levels) if len(lv.attentions)),
        "num_scales": num_scales,
    }


def describe_ncsnpp(config: Mapping) -> str:
    """E.g. ``NCSNpp(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,),
    shape=(3, 32, 32))``."""
    return (f"NCSNpp(channels={config['channels']}, channel_mult={tuple(config['channel_mult'])}, "
            f"num_res_blocks={config['num_res_blocks']}, attn_resolutions={tuple(config['attn_resolutions'])}, "
            f"shape={tuple(config['shape'])})")


def _bn(off: str, ours: str, c: int) -> Iterator[Entry]:
    yield from _gn(off, ours, c)
    yield Entry(f"{off}.running_mean", f"{ours}.running_mean", (c,))
    yield Entry(f"{off}.running_var", f"{ours}.running_var", (c,))
    yield Entry(f"{off}.num_batches_tracked", f"{ours}.num_batches_tracked", ())


def _classifier_entries(cfg: Mapping) -> Iterator[Entry]:
    """DLSM ``Classifier`` -> ``resnet_cond`` (condition_modules: Fourier W, Linear, Linear) -> ``ResNet_cond``
    (conv1, bn1, dense_1..4, layer1..4 of BasicBlocks, linear), in the official order of construction."""
    nf, blocks = int(cfg["nf"]), tuple(cfg["blocks_per_stage"])
    root = "classifier.classifier"
    yield Entry("classifier.condition_modules.0.W", "embed.freqs", (nf,))
    yield from _layer("classifier.condition_modules.1", "embed.linear1", (4 * nf, 2 * nf))
    yield from _layer("classifier.condition_modules.2", "embed.linear2", (4 * nf, 4 * nf))
    widths = tuple(cfg.get("channels", OFFICIAL_CLASSIFIER_WIDTHS))
    yield Entry(f"{root}.conv1.weight", "stem.0.weight", (widths[0], int(cfg["shape"][0]), 3, 3))
    yield from _bn(f"{root}.bn1", "stem.1", widths[0])
    for k, width in enumerate(widths):
        yield from _layer(f"{root}.dense_{k + 1}", f"stage_emb.{k}", (width, 4 * nf))
    ours, cur = 0, widths[0]
    for stage, (width, n) in enumerate(zip(widths, blocks, strict=True)):
        for i in range(n):
            off, mine = f"{root}.layer{stage + 1}.{i}", f"blocks.{ours}"
            yield Entry(f"{off}.conv1.weight", f"{mine}.conv1.weight", (width, cur, 3, 3))
            yield from _bn(f"{off}.bn1", f"{mine}.norm1", width)
            yield Entry(f"{off}.conv2.weight", f"{mine}.conv2.weight", (width, width, 3, 3))
            yield from _bn(f"{off}.bn2", f"{mine}.norm2", width)
            if (stage > 0 and i == 0) or cur != width:
                yield Entry(f"{off}.shortcut.0.weight", f"{mine}.shortcut.0.weight", (width, cur, 1, 1))
                yield from _bn(f"{off}.shortcut.1", f"{mine}.shortcut.1", width)
            cur, ours = width, ours + 1
    yield from _layer(f"{root}.linear", "head", (int(cfg["num_classes"]), cur))


def classifier_key_map(config: Mapping) -> list[Entry]:
    """The official classifier tensors for ``config`` (keys of :func:`classifier_config`), each with our name."""
    blocks, widths = tuple(config["blocks_per_stage"]), tuple(config.get("channels", OFFICIAL_CLASSIFIER_WIDTHS))
    if len(blocks) != len(OFFICIAL_CLASSIFIER_WIDTHS) or len(widths) != len(blocks):
        raise CheckpointError(
            f"the official resnet_cond has 4 stages, got blocks_per_stage {blocks}, channels {widths}"
        )
    return list(_classifier_entries(config))


def official_classifier_names(config: Mapping) -> list[tuple[str, tuple[int, ...]]]:
    """DLSM's classifier state-dict names and shapes, in order (``module.`` stripped), for ``config``: ``shape``
    (C, H, W), ``num_classes``, ``blocks_per_stage`` ((2, 2, 2, 2) resnet18_cond, (3, 4, 6, 3) resnet34_cond) and
    ``nf`` (``config.classifier.nf``, 32 in the CIFAR configs: nf Fourier frequencies, embedding 4 nf), and optionally
    ``channels`` (the official (64, 128, 256, 512) when absent)."""
    return [(e.official, e.shape) for e in classifier_key_map(config)]


def classifier_config(net: nn.Module) -> dict:
    """The settings of a built :class:`~dlsm.nets.convnet.ConvClassifier` that fix the official names; CheckpointError
    naming the first setting the official ``resnet_cond`` cannot express."""
    widths = tuple(b.conv2.out_channels for b in net.blocks)
    ends = [-1, *net.stage_ends]
    blocks = tuple(b - a for a, b in zip(ends, ends[1:], strict=False))
    channels = tuple(widths[e] for e in net.stage_ends)
    nf, emb = net.embed.freqs.numel(), net.embed.linear1.out_features
    problems = [
        (len(channels) != len(OFFICIAL_CLASSIFIER_WIDTHS), f"{len(channels)} stages, not 4"),
        (not isinstance(net.stem[1], nn.BatchNorm2d), "norm is not 'batch'"),
        (net.stage_emb is None, "condition is not 'stage'"),
        (emb != 4 * nf, f"emb_dim {emb} is not 4 x num_frequencies ({nf})"),
        (net.sigma_data is not None, f"sigma_data {net.sigma_data} scales the input, the official classifier not"),
    ]
    for bad, why in problems:
        if bad:
            raise CheckpointError(f"ConvClassifier has no official counterpart (resnet_cond): {why}")
    return {"shape": tuple(net.shape), "num_classes": net.head.out_features, "blocks_per_stage": blocks, "nf": nf,
            "channels": channels}


def describe_classifier(config: Mapping) -> str:
    """``resnet18_cond(num_classes=10, blocks_per_stage=(2, 2, 2, 2), nf=32, shape=(3, 32, 32))``; widths other
    than the official ones are named too (``channels=(8, 8, 16, 16)``)."""
    kind = {(2, 2, 2, 2): "resnet18_cond", (3, 4, 6, 3): "resnet34_cond"}.get(tuple(config["blocks_per_stage"]),
                                                                            "resnet_cond")
    widths = tuple(config.get("channels", OFFICIAL_CLASSIFIER_WIDTHS))
    other = "" if widths == OFFICIAL_CLASSIFIER_WIDTHS else f"channels={widths}, "
    return (f"{kind}(num_classes={config['num_classes']}, blocks_per_stage={tuple(config['blocks_per_stage'])}, "
            f"{other}nf={config['nf']}, shape={tuple(config['shape'])})")
