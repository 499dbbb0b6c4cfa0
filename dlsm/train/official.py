"""Import and export of the official checkpoints (score_sde_pytorch / DLSM), explicitly and strictly.

Official formats (``utils.save_checkpoint`` of both repositories, networks wrapped in ``torch.nn.DataParallel``):

* score model ``checkpoint_N.pth``: ``{'model': state dict, keys 'module.<score_sde name>', 'ema': {'decay',
  'num_updates', 'shadow_params': the averaged trainable parameters in model.parameters() order}, 'optimizer',
  'step'}``;
* classifier: ``{'model', 'optimizer', 'step'}`` (DLSM saves classifiers with ``ema=False``).

Reading is ``torch.load(weights_only=True)`` only, so a file that needs code to unpickle is refused. Every official
key is mapped by the table of :mod:`dlsm.nets.official` and checked before anything is loaded: no key missing, none
unexpected, every shape equal; EMA shadow parameters are matched by position only after their count and every shape
agree with the official names. Any problem is one :class:`~dlsm.errors.CheckpointError` line naming the first
mismatch and both architectures (the file's is recognised where it is an NCSN++ / resnet_cond of other depth, width
or class count), and the network is left as it was.

Here, not in :mod:`dlsm.nets`, because this is checkpoint I/O (reading, atomic writing through
:func:`dlsm.train.checkpoints.save_checkpoint`, EMA and optimizer entries); the names are architecture facts and
live in :mod:`dlsm.nets.official`.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from dlsm.errors import CheckpointError
from dlsm.nets import official as names
from dlsm.nets.official import Entry
from dlsm.train.checkpoints import save_checkpoint

__all__ = [
    "export_classifier_checkpoint", "export_score_checkpoint", "import_classifier_checkpoint",
    "import_score_checkpoint",
]

PREFIX = "module."  # torch.nn.DataParallel
FROZEN = {"all_modules.0.W", "classifier.condition_modules.0.W"}  # Fourier frequencies: requires_grad=False
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
ADAM = {"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}  # the official optim configs


def _is_parameter(name: str) -> bool:
    return name != "sigmas" and not name.endswith(BUFFER_SUFFIXES)


def _is_trainable(name: str) -> bool:
    return _is_parameter(name) and name not in FROZEN


def read_official(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` loaded with ``weights_only=True`` on the CPU; one-line CheckpointError if it does
    not exist, is a directory, is unreadable or truncated, needs code to unpickle, or has no 'model' state dict."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle at all (a text file, random bytes): torch reports an unsupported operand
            raise CheckpointError(f"checkpoint {path} is unreadable (UnpicklingError): truncated, corrupt or not a "
                                  "torch file") from None
        what = found.group(1)
        raise CheckpointError(
            f"checkpoint {path} needs code to unpickle ({what}), which weights_only loading refuses; "
            f"only tensors, numbers and plain containers are read"
        ) from None
    except Exception as err:  # truncated, corrupt or not a torch file
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}): truncated, corrupt or not a torch file"
        ) from None
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, Mapping) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(
            f"checkpoint {path} is not an official score_sde / DLSM checkpoint (no 'model' state dict)"
        )
    return state


def _strip(model: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v for k, v in model.items()}


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check(tensors: Mapping[str, torch.Tensor], entries: list[Entry], path: Path, ours: str, theirs: str) -> None:
    """CheckpointError at the first key, in the file's order, that ``entries`` do not expect or expect with another
    shape, then at the first expected key the file lacks."""
    expected = {e.official: e.shape for e in entries}
    for key, value in tensors.items():
        if key not in expected:
            raise CheckpointError(
                f"checkpoint {path}: official key {key} {_shape(value)} is not part of {ours}: the file holds {theirs}"
            )
        if _shape(value) != expected[key]:
            raise CheckpointError(
                f"checkpoint {path}: official key {key} has shape {_shape(value)} but {ours} expects "
                f"{expected[key]}: the file holds {theirs}"
            )
    for e in entries:
        if e.official not in tensors:
            raise CheckpointError(
                f"checkpoint {path}: official key {e.official} {e.shape} is missing, which {ours} expects: "
                f"the file holds {theirs}"
            )


def _fits(tensors: Mapping[str, torch.Tensor], entries: list[Entry]) -> bool:
    return list(tensors) == [e.official for e in entries] and all(
        _shape(tensors[e.official]) == e.shape for e in entries
    )


def _which_ncsnpp(tensors: Mapping[str, torch.Tensor], ours: Mapping) -> str:
    """What the file holds: an NCSN++ of the same levels with other nf / depth / noise levels, if one fits."""
    if any(k.startswith("classifier.") for k in tensors):
        return "a DLSM classifier, not a score model"
    conv_in, sigmas = tensors.get("all_modules.3.weight"), tensors.get("sigmas")
    if conv_in is not None and conv_in.dim() == 4 and sigmas is not None and sigmas.dim() == 1:
        for blocks in range(1, 17):
            cfg = {**ours, "channels": conv_in.shape[0], "num_res_blocks": blocks, "num_scales": sigmas.numel(),
                   "shape": (conv_in.shape[1], *ours["shape"][1:])}
            if _fits(tensors, names.ncsnpp_key_map(cfg)):
                return names.describe_ncsnpp(cfg) + f" with {sigmas.numel()} noise levels"
    return f"another layout ({len(tensors)} tensors)"


def _which_classifier(tensors: Mapping[str, torch.Tensor], ours: Mapping) -> str:
    """What the file holds: a resnet_cond with other depth or class count, if one fits."""
    if "sigmas" in tensors or any(k.startswith("all_modules.") for k in tensors):
        return "a score_sde NCSN++ score model, not a classifier"
    head, freqs = tensors.get("classifier.classifier.linear.weight"), tensors.get("classifier.condition_modules.0.W")
    if head is not None and head.dim() == 2 and freqs is not None and freqs.dim() == 1:
        dense = [tensors.get(f"classifier.classifier.dense_{k}.weight") for k in range(1, 5)]
        widths = tuple(d.shape[0] for d in dense) if all(d is not None and d.dim() == 2 for d in dense) else None
        for blocks in ((2, 2, 2, 2), (3, 4, 6, 3), ours["blocks_per_stage"]):
            cfg = {**ours, "num_classes": head.shape[0], "blocks_per_stage": blocks, "nf": freqs.numel(),
                   "channels": widths or ours["channels"]}
            if _fits(tensors, names.classifier_key_map(cfg)):
                return names.describe_classifier(cfg)
    return f"another layout ({len(tensors)} tensors)"


def _ours(tensors: Mapping[str, torch.Tensor], entries: list[Entry]) -> dict[str, torch.Tensor]:
    """Our state dict from the official tensors (attention projections transposed)."""
    return {e.ours: (tensors[e.official].t() if e.transpose else tensors[e.official])
            for e in entries if e.ours is not None}


def _load(net: nn.Module, weights: dict[str, torch.Tensor], path: Path, ours: str) -> None:
    """Load ``weights`` into ``net`` with ``strict=True`` after checking keys and shapes (nothing half-loaded)."""
    own = net.state_dict()
    bad = sorted(set(own) ^ set(weights)) + [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if bad:  # the map and the network disagree: a bug here, not in the file
        raise CheckpointError(f"checkpoint {path}: the official map does not cover {ours} at {bad[0]}")
    net.load_state_dict(weights, strict=True)


def _shadow(state: dict, entries: list[Entry], path: Path, ours: str) -> dict[str, torch.Tensor]:
    """The EMA shadow parameters by official name, after checking their count and every shape."""
    ema = state.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, list | tuple):
        raise CheckpointError(
            f"checkpoint {path} has no EMA ('ema' with 'shadow_params'); import it with use_ema=False"
        )
    trainable = [e for e in entries if _is_trainable(e.official)]
    if len(shadow) != len(trainable):
        raise CheckpointError(
            f"checkpoint {path}: the EMA holds {len(shadow)} parameters but {ours} has {len(trainable)} trainable ones"
        )
    for i, (e, t) in enumerate(zip(trainable, shadow, strict=True)):
        if not isinstance(t, torch.Tensor) or _shape(t) != e.shape:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(
                f"checkpoint {path}: EMA shadow parameter {i} has shape {got} but official key {e.official} "
                f"of {ours} expects {e.shape}"
            )
    return {e.official: t for e, t in zip(trainable, shadow, strict=True)}


def _import(path: Path, state: dict, net: nn.Module, entries: list[Entry], ours: str,
            which: Callable[[Mapping], str], *, use_ema: bool) -> int:
    """Check the file's tensors (and EMA) against ``entries``, then load them into ``net``; returns the step."""
    tensors = _strip(state["model"])
    _check(tensors, entries, path, ours, which(tensors))
    if use_ema:
        tensors = {**tensors, **_shadow(state, entries, path, ours)}
    _load(net, _ours(tensors, entries), path, ours)
    step = state.get("step", 0)
    return int(step) if isinstance(step, int | torch.Tensor) else 0


def import_score_checkpoint(path: str | os.PathLike, net: nn.Module, *, use_ema: bool = True) -> int:
    """Load an official score_sde / DLSM score checkpoint into our :class:`~dlsm.nets.ncsnpp.NCSNpp` ``net``: the
    EMA weights (``use_ema=True``, as the official sampling and DLSM's classifier training use) or the raw ones.
    The fixed Fourier frequencies come from 'model' (not in the EMA); the official ``sigmas`` buffer (any number of
    VE levels) is checked to be one vector and not used. Returns the checkpoint's step. CheckpointError (one line,
    ``net`` untouched) on any mismatch; see the module doc."""
    cfg = names.ncsnpp_config(net)
    path = Path(path)
    state = read_official(path)
    sigmas = _strip(state["model"]).get("sigmas")
    if sigmas is not None and sigmas.dim() == 1:
        cfg["num_scales"] = sigmas.numel()
    return _import(path, state, net, names.ncsnpp_key_map(cfg), names.describe_ncsnpp(cfg),
                   lambda t: _which_ncsnpp(t, cfg), use_ema=use_ema)


def _adam_state(n_params: int) -> dict:
    """A fresh Adam state dict (no moments yet) for ``n_params`` parameters: what the official
    ``restore_checkpoint`` loads into its optimizer before resuming."""
    dummies = [nn.Parameter(torch.empty(0)) for _ in range(n_params)]
    return torch.optim.Adam(dummies, **ADAM).state_dict()


def _official_model(net: nn.Module, entries: list[Entry], extra: Mapping[str, torch.Tensor]) -> OrderedDict:
    """The official 'model' state dict of ``net``: DataParallel keys in official order, attention transposed."""
    own = net.state_dict()
    out = OrderedDict()
    for e in entries:
        t = extra[e.official] if e.ours is None else own[e.ours]
        out[PREFIX + e.official] = (t.t() if e.transpose else t).detach().cpu().contiguous().clone()
    return out


def export_score_checkpoint(net: nn.Module, path: str | os.PathLike, *, ema_net: nn.Module | None = None,
                            step: int = 0, ema_decay: float = 0.999, sigma_min: float = 0.01,
                            sigma_max: float = 50.0, num_scales: int = 1000) -> None:
    """Write ``net`` (and the EMA network ``ema_net``, default ``net`` itself) as an official score_sde checkpoint:
    same names, shapes and order, so it loads in the official code and :func:`import_score_checkpoint` gives the same
    tensors back bit for bit. ``sigmas`` is score_sde's geometric VE grid (float64, as its buffer); the optimizer
    entry is a fresh Adam with the official settings (no moments), the EMA's ``num_updates`` is ``step``. The
    frozen Fourier frequencies are written from ``net`` only (the official EMA holds trainable parameters alone)."""
    cfg = names.ncsnpp_config(net, num_scales=num_scales)
    entries = names.ncsnpp_key_map(cfg)
    sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales, dtype=torch.float64))
    model = _official_model(net, entries, {"sigmas": sigmas})
    ema_model = model if ema_net is None else _official_model(ema_net, entries, {"sigmas": sigmas})
    shadow = [ema_model[PREFIX + e.official] for e in entries if _is_trainable(e.official)]
    n_params = sum(_is_parameter(e.official) for e in entries)
    state = {"optimizer": _adam_state(n_params), "model": model,
             "ema": {"decay": ema_decay, "num_updates": step, "shadow_params": shadow}, "step": step}
    save_checkpoint(path, state)


def import_classifier_checkpoint(path: str | os.PathLike, net: nn.Module) -> int:
    """Load an official DLSM classifier checkpoint (resnet18_cond / resnet34_cond) into our
    :class:`~dlsm.nets.convnet.ConvClassifier` ``net`` (four stages, officially ``channels=(64, 128, 256, 512)``;
    ``norm='batch'``, ``condition='stage'``, ``emb_dim = 4 num_frequencies``), BatchNorm statistics included.
    Returns the step."""
    cfg = names.classifier_config(net)
    path = Path(path)
    return _import(path, read_official(path), net, names.classifier_key_map(cfg), names.describe_classifier(cfg),
                   lambda t: _which_classifier(t, cfg), use_ema=False)


def export_classifier_checkpoint(net: nn.Module, path: str | os.PathLike, *, step: int = 0) -> None:
    """Write ``net`` as an official DLSM classifier checkpoint ``{'optimizer', 'model', 'step'}`` (no EMA, as DLSM
    saves classifiers); :func:`import_classifier_checkpoint` gives the same tensors back bit for bit."""
    cfg = names.classifier_config(net)
    entries = names.classifier_key_map(cfg)
    n_params = sum(_is_parameter(e.official) for e in entries)
    state = {"optimizer": _adam_state(n_params), "model": _official_model(net, entries, {}), "step": step}
    save_checkpoint(path, state)
