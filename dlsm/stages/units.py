"""Sampling's work units: what the ``sample`` stage splits its work into, so that every process draws a share, a
killed stage resumes, and the images do not depend on how many processes drew them.

A unit is (method, class, batch): ``n`` samples of one class for one method, the ``b``-th batch of
``sample.batch_size`` of that class. Its random numbers come from one generator seeded by :func:`unit_seed`, a
function of (experiment seed, method index, class, batch index) alone. A unit's samples therefore depend only on
the unit, not on which process draws it nor on what that process drew before; the stage's ``.npz`` files are the
units concatenated in plan order (method, class, batch).

With ``sample.classes_per_unit`` > 1, methods that take a label per sample pack whole classes into one unit
(:func:`plan_units`); the unit is then (method, classes c to c + k - 1), seeded by :func:`pack_seed`.

Sharding (:func:`share`): rank r of a world of w takes units r, r + w, r + 2w, ... of the plan. Any world size
works (no unit is split); ranks with one unit more than others finish last.

Resuming (:class:`UnitStore`): each finished unit is written atomically to
``{rundir}/sampling/{method}/c{class}-b{batch}.pt`` (``c{first}-{last}.pt`` when packed) with its fingerprint
(configuration hash, seed, size and a digest of the method's networks). A relaunch after a kill reads the finished
units and draws only the others. A unit file whose fingerprint differs (another configuration or other networks) is
refused with a one-line error, never reused; a file that cannot be read is a one-line error too. On several
processes the folder doubles as the gather: every rank writes its units there and rank 0 reads them all (one
machine, or a folder every node sees).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dlsm.errors import CheckpointError
from dlsm.train.checkpoints import load_checkpoint, save_checkpoint

__all__ = ["LEGACY_BATCH", "Unit", "UnitStore", "networks_digest", "pack_seed", "plan_units", "share", "unit_seed"]

LEGACY_BATCH = 0  # batch 0 keeps the seed of the stage before units (seed + 41 + 100 j + c): same samples as before


def unit_seed(seed: int, j: int, c: int, b: int, *, same_noise: bool = False) -> int:
    """The seed of unit (method j, class c, batch b) of an experiment seeded ``seed``.

    Batch 0: ``seed + 41 + 100 j + c`` (``seed + 41 + c`` for every method with ``same_noise``), the seed the stage
    has always given a whole class, so a class drawn in one batch keeps its samples. Batch b > 0: 63 bits of
    BLAKE2b over ``(seed, j, c, b)`` (j left out with ``same_noise``), so no two units share a stream."""
    if b == LEGACY_BATCH:
        return seed + 41 + (0 if same_noise else 100 * j) + c
    return _hashed("dlsm-unit", seed, -1 if same_noise else j, c, b)


def pack_seed(seed: int, j: int, c: int, k: int, *, same_noise: bool = False) -> int:
    """The seed of a unit that packs classes c, ..., c + k - 1 of method j (``sample.classes_per_unit``): 63 bits of
    BLAKE2b over ``(seed, j, c, k)`` (j left out with ``same_noise``)."""
    return _hashed("dlsm-pack", seed, -1 if same_noise else j, c, k)


def _hashed(tag: str, *parts: int) -> int:
    """63 bits of BLAKE2b over ``tag:part:part:...``: a seed that no other unit's tuple gives."""
    digest = hashlib.blake2b(":".join([tag, *map(str, parts)]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Unit:
    """``n`` samples of class ``c`` for method ``method`` (its index ``j`` in the stage's method order), batch
    ``b`` of that class, drawn from a generator seeded ``seed``. A packed unit (``sizes`` given) holds the whole
    classes c, c + 1, ..., c + len(sizes) - 1, ``sizes[i]`` samples of class c + i, in one batch (b = 0)."""

    method: str
    j: int
    c: int
    b: int
    n: int
    seed: int
    sizes: tuple[int, ...] = ()

    @property
    def classes(self) -> list[int]:
        return list(range(self.c, self.c + len(self.sizes))) if self.sizes else [self.c]

    @property
    def labels(self) -> torch.Tensor:
        """The class of each of the unit's samples."""
        sizes = self.sizes or (self.n,)
        return torch.repeat_interleave(torch.tensor(self.classes), torch.tensor(sizes))

    @property
    def key(self) -> str:
        if self.sizes:
            return f"{self.method}/c{self.c}-{self.c + len(self.sizes) - 1}"
        return f"{self.method}/c{self.c}-b{self.b}"


def plan_units(
    methods: Iterable[str], counts: list[int], batch_size: int | None, seed: int, *, same_noise: bool = False,
    classes_per_unit: int = 1, packable: Iterable[str] = (),
) -> list[Unit]:
    """Every unit of the stage in plan order: method, then class, then batch; class c of M_c samples in
    ceil(M_c / batch_size) batches (one batch without ``batch_size``).

    ``classes_per_unit`` > 1 packs, for the methods in ``packable`` (those that take a label per sample), up to that
    many consecutive classes into one unit while their samples together fit in one batch of ``batch_size``: many
    classes of few samples each (CIFAR-100 under smoke.gin: 100 classes of 4) then cost a few network calls per
    level instead of one per class."""
    units = []
    packable = set(packable)
    for j, name in enumerate(methods):
        c = 0
        while c < len(counts):
            block = _pack(counts, c, batch_size, classes_per_unit) if name in packable else 1
            if block > 1:
                sizes = tuple(counts[c:c + block])
                units.append(Unit(name, j, c, 0, sum(sizes), pack_seed(seed, j, c, block, same_noise=same_noise),
                                  sizes))
                c += block
                continue
            m, size = counts[c], batch_size or counts[c]
            for b, start in enumerate(range(0, m, size)):
                units.append(Unit(name, j, c, b, min(size, m - start), unit_seed(seed, j, c, b, same_noise=same_noise)))
            c += 1
    return units


def _pack(counts: list[int], c: int, batch_size: int | None, most: int) -> int:
    """How many classes from c on fit in one packed unit: at most ``most``, their samples at most ``batch_size``."""
    k, total = 0, 0
    while k < most and c + k < len(counts) and (batch_size is None or total + counts[c + k] <= batch_size):
        total += counts[c + k]
        k += 1
    return k


def share(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """Rank ``rank``'s units of a world of ``world`` processes: every ``world``-th unit from the ``rank``-th."""
    return units[rank::world]


def networks_digest(scores: object) -> str:
    """SHA-256 (16 hex digits) of what a method samples with: every network's weights and buffers, every tensor and
    number held by the method's score object (e.g. ``ModelScores``' score model, classifier and alpha)."""
    h = hashlib.sha256(type(scores).__name__.encode())
    for name, value in sorted(vars(scores).items()) if hasattr(scores, "__dict__") else ():
        h.update(name.encode())
        if isinstance(value, nn.Module):
            for key, t in value.state_dict().items():
                h.update(key.encode())
                h.update(_bytes(t))
        elif isinstance(value, torch.Tensor):
            h.update(_bytes(value))
        elif isinstance(value, (int, float, str, bool)):
            h.update(repr(value).encode())
    return h.hexdigest()[:16]


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


class UnitStore:
    """Finished units in ``folder`` (``{rundir}/sampling``): one atomic file per unit with its samples, optional
    streamed features, and its fingerprint ``{'config', 'networks', 'seed', 'n'}``."""

    def __init__(self, folder: Path, config: str, networks: dict[str, str]) -> None:
        self.folder = Path(folder)
        self.config = config
        self.networks = networks  # method -> networks_digest

    def path(self, unit: Unit) -> Path:
        return self.folder / f"{unit.key}.pt"

    def fingerprint(self, unit: Unit) -> dict[str, object]:
        return {"config": self.config, "networks": self.networks[unit.method], "seed": unit.seed, "n": unit.n}

    def load(self, unit: Unit) -> dict | None:
        """The unit's ``{'x': samples, 'features': {...}}`` if it was finished, else None. A file of another
        configuration, other networks or another size is a one-line CheckpointError."""
        path = self.path(unit)
        if not path.exists():
            return None
        state = load_checkpoint(path)
        mine = self.fingerprint(unit)
        theirs = state.get("fingerprint", {})
        for field, what in (("config", "configuration"), ("networks", "networks"), ("seed", "seed"), ("n", "size")):
            if theirs.get(field) != mine[field]:
                raise CheckpointError(
                    f"sampling checkpoint {path} was written with another {what} ({theirs.get(field)!r}, this run "
                    f"has {mine[field]!r}); it is not reused: delete {self.folder} or relaunch with --fresh")
        x = state.get("x")
        if not isinstance(x, torch.Tensor) or x.shape[0] != unit.n:
            raise CheckpointError(f"sampling checkpoint {path} holds no samples of unit {unit.key}; delete it")
        return state

    def save(self, unit: Unit, x: torch.Tensor, features: dict[str, tuple[torch.Tensor, ...]] | None = None) -> None:
        self.path(unit).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.path(unit), {"model": f"sampling unit {unit.key}", "fingerprint": self.fingerprint(unit),
                                          "x": x.detach().cpu(), "features": features or {}})

    def done(self, units: Iterable[Unit]) -> list[Unit]:
        """The units among ``units`` whose file exists (checked when loaded)."""
        return [u for u in units if self.path(u).exists()]
