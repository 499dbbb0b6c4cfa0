"""What ``sample.same_noise`` promises about the random numbers of the sampling stage (issue 22, item 7).

The generator of method j and class c is seeded with seed + 41 + 100 j + c, or seed + 41 + c for every method
with ``same_noise`` (the paper's Figure 3: base, scaling and ours from the same starting noise and Langevin noise).
The references are independent: ``torch.Generator().manual_seed(...)`` draws in the documented order (x_0 ~
N(0, sigma_max^2 I) for a batch, then the sampler's noise from the same stream), computed here without the stage.

A recording sampler returns ``[x_0, z]`` side by side, z being its first Langevin-noise draw, so every sample
shows both the starting noise and the noise the sampler got; the real annealed Langevin sampler checks that
identical scores then give identical samples.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest
import torch

from dlsm.data.points import LabelledData
from dlsm.math.samplers import annealed_langevin
from dlsm.math.schedules import NoiseSchedule, geometric_sigmas
from dlsm.stages.base import ExperimentSpec, Run, State
from dlsm.stages.sample import sample
from dlsm.tracking import NullTracker

SEED, N, CLASSES, DIM = 123, 4, 3, 2
SCHEDULE = NoiseSchedule(sigmas=geometric_sigmas(5.0, 0.1, 4), eps=2e-3, n_steps_each=2)


class GaussianScores:
    """The exact posterior score of N(mu + c, 1 + sigma^2) for class c: a method whose scores are known."""

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def posterior_fn(self, c: int):
        return lambda x, sigma: -(x - (self.mu + c)) / (1.0 + sigma[:, None] ** 2)


def recording_sampler(score_fn, x, sigmas, *, generator):
    """Returns the starting noise x_0 and the first Langevin-noise draw z of the generator, side by side."""
    return torch.cat([x, torch.randn(x.shape, generator=generator)], dim=1)


def _stage(tmp_path: Path, methods: dict, *, same_noise: bool, sampler=recording_sampler, seed: int = SEED,
           batch_size: int | None = None) -> dict[str, dict[int, torch.Tensor]]:
    """Runs the ``sample`` stage in process (no MLflow) and returns method -> class -> samples."""
    spec = ExperimentSpec(
        name="seeds", seed=seed, dataset=None, score_model=None, classifiers={}, score_loss=None,
        classifier_losses={}, alpha=1.0, sampling_methods=None, sampler=sampler, stages=(),
    )
    data = LabelledData(x=torch.zeros(CLASSES, DIM), y=torch.arange(CLASSES), num_classes=CLASSES, name="toy")
    rundir = Path(tempfile.mkdtemp(dir=tmp_path))  # a launch of its own: no sampling units of another call to resume
    run = Run(spec=spec, tracker=NullTracker(), parent_id="", rundir=rundir, params={}, device=torch.device("cpu"))
    state = State(data=data, schedule=SCHEDULE, extra_methods=dict(methods))
    return sample(run, state, n_per_class=N, batch_size=batch_size, same_noise=same_noise).samples


def _reference(seed: int, batch_size: int | None = None) -> torch.Tensor:
    """[x_0, z] drawn by hand from one CPU generator seeded ``seed``: per batch, x_0 then the sampler's z."""
    gen, rows = torch.Generator().manual_seed(seed), []
    for start in range(0, N, batch_size or N):
        m = min(batch_size or N, N - start)
        x0 = SCHEDULE.sigma_max * torch.randn((m, DIM), generator=gen)
        rows.append(torch.cat([x0, torch.randn((m, DIM), generator=gen)], dim=1))
    return torch.cat(rows)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


METHODS = {"base": GaussianScores(0.0), "scaling": GaussianScores(3.0), "ours": GaussianScores(-2.0)}


def test_same_noise_gives_every_method_the_class_seeded_starting_and_langevin_noise(tmp_path: Path):
    samples = _stage(tmp_path, METHODS, same_noise=True)
    for c in range(CLASSES):
        expected = _reference(SEED + 41 + c)
        for name in METHODS:
            torch.testing.assert_close(samples[name][c], expected, rtol=0, atol=0, msg=f"{name}, class {c}")


def test_without_same_noise_method_j_is_seeded_seed_41_100j_c(tmp_path: Path):
    samples = _stage(tmp_path, METHODS, same_noise=False)
    for j, name in enumerate(METHODS):
        for c in range(CLASSES):
            expected = _reference(SEED + 41 + 100 * j + c)
            torch.testing.assert_close(samples[name][c], expected, rtol=0, atol=0, msg=f"{name}, class {c}")
    for c in range(CLASSES):  # no two methods share a starting point or Langevin noise
        draws = [samples[name][c] for name in METHODS]
        assert not any(_equal(a[:, :DIM], b[:, :DIM]) or _equal(a[:, DIM:], b[:, DIM:])
                       for i, a in enumerate(draws) for b in draws[i + 1:])


@pytest.mark.parametrize("same_noise", [True, False])
def test_classes_never_share_noise(tmp_path: Path, same_noise: bool):
    samples = _stage(tmp_path, METHODS, same_noise=same_noise)
    for name in METHODS:
        per_class = [samples[name][c] for c in range(CLASSES)]
        for i, a in enumerate(per_class):
            for b in per_class[i + 1:]:
                assert not _equal(a[:, :DIM], b[:, :DIM]), f"{name}: two classes start from the same x_0"
                assert not _equal(a[:, DIM:], b[:, DIM:]), f"{name}: two classes get the same Langevin noise"


def test_identical_scores_give_identical_samples_only_with_same_noise(tmp_path: Path):
    twins = {"a": GaussianScores(1.0), "b": GaussianScores(1.0), "c": GaussianScores(-1.0)}
    shared = _stage(tmp_path, twins, same_noise=True, sampler=annealed_langevin)
    own = _stage(tmp_path, twins, same_noise=False, sampler=annealed_langevin)
    for c in range(CLASSES):
        # the reference: annealed Langevin called by hand on the documented stream
        gen = torch.Generator().manual_seed(SEED + 41 + c)
        x0 = SCHEDULE.sigma_max * torch.randn((N, DIM), generator=gen)
        expected = annealed_langevin(twins["a"].posterior_fn(c), x0, SCHEDULE.sigmas, eps=SCHEDULE.eps,
                                     n_steps_each=SCHEDULE.n_steps_each, generator=gen, disable=True)
        torch.testing.assert_close(shared["a"][c], expected, rtol=0, atol=0)
        torch.testing.assert_close(shared["b"][c], expected, rtol=0, atol=0)
        assert not _equal(shared["c"][c], expected)  # same noise, other score: other samples
        assert not _equal(own["a"][c], own["b"][c])  # same score, own noise: other samples
        torch.testing.assert_close(own["a"][c], expected, rtol=0, atol=0)  # method 0 keeps seed + 41 + c


def test_a_rerun_with_the_same_seed_is_identical_and_another_seed_is_not(tmp_path: Path):
    for same_noise in (True, False):
        first = _stage(tmp_path, METHODS, same_noise=same_noise, sampler=annealed_langevin)
        again = _stage(tmp_path, METHODS, same_noise=same_noise, sampler=annealed_langevin)
        other = _stage(tmp_path, METHODS, same_noise=same_noise, sampler=annealed_langevin, seed=SEED + 1)
        for name in METHODS:
            for c in range(CLASSES):
                torch.testing.assert_close(first[name][c], again[name][c], rtol=0, atol=0)
                assert not _equal(first[name][c], other[name][c])


def _batch_seed(seed: int, j: int, c: int, b: int) -> int:
    """The documented seed of batch b > 0 (dlsm.stages.units.unit_seed), written out here: 63 bits of BLAKE2b."""
    digest = hashlib.blake2b(f"dlsm-unit:{seed}:{j}:{c}:{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@pytest.mark.parametrize("same_noise", [True, False])
def test_each_batch_is_a_unit_with_its_own_stream(tmp_path: Path, same_noise: bool):
    """Batch 0 keeps the class's seed (a class drawn in one batch keeps its samples); batch 1 gets its own
    generator, seeded from (seed, method, class, batch) alone, so it does not depend on what was drawn before."""
    samples = _stage(tmp_path, METHODS, same_noise=same_noise, batch_size=3)
    for j, name in enumerate(METHODS):
        for c in range(CLASSES):
            first = _reference(SEED + 41 + (0 if same_noise else 100 * j) + c, batch_size=3)[:3]  # N = 4: batch 0 of 3
            gen = torch.Generator().manual_seed(_batch_seed(SEED, -1 if same_noise else j, c, 1))
            x0 = SCHEDULE.sigma_max * torch.randn((1, DIM), generator=gen)
            second = torch.cat([x0, torch.randn((1, DIM), generator=gen)], dim=1)
            torch.testing.assert_close(samples[name][c], torch.cat([first, second]), rtol=0, atol=0,
                                       msg=f"{name}, class {c}")
