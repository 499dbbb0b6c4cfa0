"""Sampling: class-conditional generation with the posterior score s(x; phi) + alpha grad log p(y|x; theta)
for every method (base, scaling, ours, ...), on the experiment's device; samples saved and logged.

Point data (moons) are saved as ``samples/samples-{method}.npz`` with one float array ``c{k}`` per
class. Images are saved once as uint8, ``x`` of shape (N, C, H, W) with their labels ``y``, plus a
PNG grid per method (``images/grid-{method}.png``, a row per class) and the paper's Figure 3 layout
(``images/figure3.png``: the methods side by side for the same classes and starting noise).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

import gin
import numpy as np
import torch
from tqdm.auto import tqdm

from dlsm import config as cfg
from dlsm.errors import CheckpointError, ConfigError, DlsmError
from dlsm.files import write_atomic
from dlsm.math.samplers import prior_sample
from dlsm.report.plots import paper_order
from dlsm.stages.base import Run, State
from dlsm.stages.common import every_rank_stage
from dlsm.stages.units import Unit, UnitStore, networks_digest, plan_units, share
from dlsm.train import distributed as dist
from dlsm.train.device import make_generator

__all__ = [
    "class_counts", "exact_likelihood", "image_grid", "parzen_oracle", "sample", "sample_class", "sample_grid_snapshot",
]


def _is_image(data) -> bool:
    return len(tuple(data.shape)) == 3


def sample_class(
    sampler: Callable, score_fn, schedule, shape: tuple[int, ...], n: int, *, seed: int, device: torch.device,
    batch_size: int | None = None,
) -> torch.Tensor:
    """``n`` samples of one class in batches of ``batch_size``: x_0 ~ N(0, sigma_max^2 I) then ``sampler``,
    every random number from one generator on ``device`` seeded with ``seed``."""
    gen = make_generator(seed, device)
    kwargs = {}
    if "eps" in inspect.signature(inspect.unwrap(sampler)).parameters:  # Langevin: step settings of the schedule
        kwargs = {"eps": schedule.eps, "n_steps_each": schedule.n_steps_each}
    out = []
    for start in range(0, n, batch_size or n):
        m = min(batch_size or n, n - start)
        x0 = prior_sample((m, *shape), schedule.sigma_max, generator=gen, device=device)
        out.append(sampler(score_fn, x0, schedule.sigmas, generator=gen, **kwargs))
    return torch.cat(out)


def class_counts(data, n_per_class: int | dict | None) -> list[int]:
    """M_i, the number of samples of class i: the class's count in the training data (None), one number
    for every class, or a dict ``{class: count}``."""
    if n_per_class is None:
        return [int((data.y == c).sum()) for c in range(data.num_classes)]
    if isinstance(n_per_class, dict):
        missing = [c for c in range(data.num_classes) if c not in n_per_class]
        if missing:
            raise ConfigError(f"sample.n_per_class: no count for classes {missing}")
        counts = [n_per_class[c] for c in range(data.num_classes)]
    else:
        counts = [n_per_class] * data.num_classes
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in counts):
        raise ConfigError(f"sample.n_per_class must be positive integers (or None), got {n_per_class!r}")
    return counts


def image_grid(images: dict[int, torch.Tensor], n_cols: int = 10):
    """A PNG-ready grid (H, W, C uint8 numpy) of uint8 images ``{class: (M, C, H, W)}``: a row per class."""
    from torchvision.utils import make_grid

    rows = [imgs[:n_cols] for _, imgs in sorted(images.items())]
    n_cols = min(n_cols, min(len(r) for r in rows))
    tiles = torch.cat([r[:n_cols] for r in rows]).cpu()
    grid = make_grid(tiles, nrow=n_cols, padding=1, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def _log_png(run: Run, array: np.ndarray, name: str, title: str | None = None, width: int = 480) -> None:
    """A uint8 (H, W, C) grid as a PNG artifact, enlarged by an integer factor (nearest neighbour, so pixels
    stay pixels) to about ``width`` pixels, with ``title`` in a band above it."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    scale = max(1, round(width / img.width))
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    if title:
        canvas = Image.new(img.mode, (img.width, img.height + 20), 255 if img.mode == "L" else (255, 255, 255))
        canvas.paste(img, (0, 20))
        ImageDraw.Draw(canvas).text((4, 4), title, fill=0 if img.mode == "L" else (0, 0, 0))
        img = canvas
    run.tracker.log_image(img, name)


@gin.configurable(denylist=["run", "state"])
def parzen_oracle(run: Run, state: State, *, as_method: bool = True) -> State:
    """The Parzen-window oracle of the training data (method (e) of the DLSM paper's moons table): exact
    prior, likelihood and posterior scores of the noisy empirical distribution, in float64. The reference of
    the score-error metrics and, with ``as_method``, sampled as the method ``oracle``. Small data only."""
    from dlsm.math.oracle import OracleScores

    data = state.data
    state.oracle = OracleScores(data.x, data.y)
    if as_method:
        state.extra_methods["oracle"] = state.oracle
    return state


@gin.configurable(denylist=["run", "state"])
def exact_likelihood(run: Run, state: State, *, alpha: float = 1.0, name: str = "exact") -> State:
    """The method ``name``: the trained prior model plus alpha times the *exact* likelihood score of the Parzen
    oracle of the training data (:class:`dlsm.math.scores.ExactLikelihoodScores`), sampled like base / scaling / ours:
    what a perfect classifier would buy with this score model and sampler. Put it after ``train_score_model`` and
    before ``sample``. Small data only (the oracle reads every training image at every step)."""
    from dlsm.math.oracle import OracleScores
    from dlsm.math.scores import ExactLikelihoodScores

    if state.score_model is None:
        raise ConfigError("exact_likelihood needs the score model: list it after train_score_model in "
                          "experiment.stages")
    data = state.data
    oracle = state.oracle if state.oracle is not None else OracleScores(data.x.to(run.device), data.y.to(run.device))
    state.extra_methods[name] = ExactLikelihoodScores(state.score_model, oracle, alpha=alpha)
    return state


@gin.configurable(denylist=["run", "state"])
def sample(
    run: Run, state: State, *, n_per_class: int | dict | None = None, batch_size: int | None = None,
    same_noise: bool = False, grid_columns: int = 10, stream_features: bool = False, classes_per_unit: int = 1,
) -> State:
    """Sampling (child run ``sampling``): M_i = ``n_per_class`` samples of every class i for every method
    (default: the class's count in the training data), in batches of ``batch_size`` (default: a class
    at once), with ``experiment.sampler`` on the device.

    The work is split into units (method, class, batch; :mod:`dlsm.stages.units`), each drawn from its own
    generator: batch 0 of method j and class c is seeded with seed + 41 + 100 j + c, or seed + 41 + c for every
    method with ``same_noise`` (the same starting noise and Langevin noise for base, scaling and ours: the paper's
    Figure 3); later batches get seeds of their own. Under torchrun every rank draws its share of the units; each
    finished unit is saved in ``{rundir}/sampling/`` so a relaunch after a kill draws only the missing ones; rank 0
    gathers them, saves the ``.npz`` files and logs. The samples are the same for any number of processes.

    ``stream_features`` (images): the feature networks of the evaluation (``image_features``) see each unit as
    it is drawn (uint8, as saved), on the rank that drew it; ``image_metrics`` then uses these features instead of
    a second pass.

    ``classes_per_unit`` > 1 (smoke.gin: many classes of 4 samples): a unit holds up to that many whole classes of a
    method that takes a label per sample (:class:`~dlsm.math.scores.ModelScores`), as long as they fit in one
    batch; one network call per level then serves them all. Such units have seeds of their own."""
    spec, data, schedule = run.spec, state.data, state.schedule
    counts = class_counts(data, n_per_class)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"sample.batch_size must be a positive integer or None, got {batch_size!r}")
    if isinstance(classes_per_unit, bool) or not isinstance(classes_per_unit, int) or classes_per_unit < 1:
        raise ConfigError(f"sample.classes_per_unit must be a positive integer, got {classes_per_unit!r}")
    image = _is_image(data)
    methods = state.methods(spec)
    packable = [n for n, s in methods.items() if getattr(s, "labels_per_sample", False)]
    units = plan_units(methods, counts, batch_size, spec.seed, same_noise=same_noise,
                       classes_per_unit=classes_per_unit, packable=packable)
    store = UnitStore(run.rundir / "sampling", cfg.config_hash(), {n: networks_digest(s) for n, s in methods.items()})
    mine = share(units, dist.rank(), dist.world_size())
    pending = [u for u in mine if store.load(u) is None]
    nets = None
    if stream_features and image:
        from dlsm.stages.evaluate import feature_nets

        nets = dist.main_first(lambda: feature_nets(run, state))  # rank 0 builds (and caches) the evaluator first
    with every_rank_stage(run, "sampling"):
        t0 = time.perf_counter()
        run.tracker.log_params({**run.params, "alpha": spec.alpha, "n_per_class": str(counts)})
        if dist.is_main() and len(pending) < len(mine):
            whose = "" if dist.world_size() == 1 else " of rank 0"
            print(f"dlsm: sampling resumes from {store.folder}: {len(mine) - len(pending)} of {len(mine)} "
                  f"units{whose} are drawn")
        error: DlsmError | None = None
        try:
            for unit in tqdm(pending, desc="sampling", unit="unit", disable=not dist.is_main()):
                y = unit.labels.to(run.device) if unit.sizes else unit.c
                x = sample_class(spec.sampler, methods[unit.method].posterior_fn(y), schedule, tuple(data.shape),
                                 unit.n, seed=unit.seed, device=run.device).cpu()
                features = {net.name: net.extract(data.decode(x)) for net in nets} if nets else None
                store.save(unit, x, features)
        except DlsmError as err:  # a full disk on this rank: the units it saved are kept for the relaunch
            error = err
        dist.settle(error)  # every rank's units are on disk, or every rank stops with the first rank's error
        # rank 0 gathers and writes the samples while the others wait: a full disk there stops every rank
        dist.from_main(lambda: _gather(run, state, units, store, nets, image=image, grid_columns=grid_columns))
        if dist.is_main():
            run.timings["time/sampling_s"] = time.perf_counter() - t0
            run.tracker.log_metrics({"wall_seconds": run.timings["time/sampling_s"], "units": len(units),
                                     "units_resumed": len(mine) - len(pending)})  # rank 0's
    return state


def _gather(
    run: Run, state: State, units: list[Unit], store: UnitStore, nets: list | None, *, image: bool, grid_columns: int,
) -> None:
    """Rank 0: every unit from the store in plan order into ``state.samples`` (and ``state.stream``), the
    ``samples-{method}.npz`` files, the grids and Figure 3."""
    data = state.data
    parts: dict[str, dict[int, list[torch.Tensor]]] = {}
    stream = None
    if nets:
        from dlsm.eval.images import FeatureStream

        stream = state.stream = FeatureStream(nets)
    for unit in units:
        saved = store.load(unit)
        if saved is None:
            raise CheckpointError(f"sampling unit {unit.key} is missing from {store.folder} after every rank "
                                  "finished: does every process see that folder?")
        for c, x in zip(unit.classes, saved["x"].split(list(unit.sizes or (unit.n,))), strict=True):
            parts.setdefault(unit.method, {}).setdefault(c, []).append(x)
        if stream is not None:
            for net in nets:
                stream.add_features(net.name, unit.method, *saved["features"][net.name], unit.labels)
    decoded: dict[str, dict[int, torch.Tensor]] = {}  # images: method -> class -> uint8 samples
    for name, per_class in parts.items():
        state.samples[name] = {c: torch.cat(xs) for c, xs in per_class.items()}
        path = run.rundir / f"samples-{name}.npz"
        if image:
            decoded[name] = {c: data.decode(s) for c, s in state.samples[name].items()}
            x = torch.cat(list(decoded[name].values()))
            y = torch.cat([torch.full((len(s),), c) for c, s in decoded[name].items()])
            write_atomic(path, lambda f, x=x, y=y: np.savez_compressed(f, x=x.numpy(), y=y.numpy()))
            _log_png(run, image_grid(decoded[name], grid_columns), f"images/grid-{name}.png", name)
        else:
            arrays = {f"c{c}": x.numpy() for c, x in state.samples[name].items()}
            write_atomic(path, lambda f, arrays=arrays: np.savez_compressed(f, **arrays))
        run.tracker.log_artifact(path, "samples")
    if image:
        _figure3(run, decoded, min(grid_columns, 4))


def _counts_ok(value: object) -> str | None:
    values = value.values() if isinstance(value, dict) else [value]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    return "must be a positive integer, a dict {class: positive integer}, or None" if value is not None and bad \
        else None


cfg.constrain(sample, "n_per_class", _counts_ok)  # checked when the config is parsed, before anything trains
cfg.constrain(sample, "batch_size", lambda v: None if v is None else cfg.positive_int(v))
cfg.constrain(sample, "classes_per_unit", cfg.positive_int)


def _figure3(run: Run, decoded: dict[str, dict[int, torch.Tensor]], n_cols: int) -> None:
    """The paper's Figure 3 layout: base | scaling | ours (whichever are sampled; else every method), same classes,
    side by side."""
    names = [n for n in ("base", "scaling", "ours") if n in decoded] or paper_order(decoded)
    panels = [image_grid(decoded[n], n_cols) for n in names]
    if not panels:
        return
    h = min(p.shape[0] for p in panels)
    gap = np.full((h, 6, panels[0].shape[2]), 255, dtype=np.uint8)
    row = np.concatenate([x for p in panels for x in (p[:h], gap)][:-1], axis=1)
    _log_png(run, row, "images/figure3.png", "   |   ".join(names))


@gin.configurable(denylist=["run", "state"])
def sample_grid_snapshot(run: Run, state: State, *, n: int = 16, seed: int = 7) -> Callable:
    """A function ``(ema_score_model, step)`` that samples ``n`` unconditional images from the EMA score
    model with ``experiment.sampler`` and logs their grid as ``images/snapshot-{step}.png`` in the current
    (stage 1) run: a long run can be watched in the MLflow UI. Bind as ``train_score_model.snapshot``
    and set ``score/train.snapshot_every``."""
    spec, data, schedule = run.spec, state.data, state.schedule
    if not _is_image(data):
        raise ConfigError("sample_grid_snapshot needs image data; unbind train_score_model.snapshot")

    def snapshot(model, step: int) -> None:
        with torch.no_grad():
            x = sample_class(spec.sampler, lambda x, s: model(x, s), schedule, tuple(data.shape), n,
                             seed=run.seed(seed), device=run.device)
        _log_png(run, image_grid({0: data.decode(x.cpu())}, n_cols=n), f"images/snapshot-{step:07d}.png",
                 f"step {step}")

    return snapshot
