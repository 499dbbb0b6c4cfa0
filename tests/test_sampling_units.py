"""Sampling's work units (issue 24, items 1, 2 and 7), in process: the plan, the shares of a world of processes, the
unit files a relaunch resumes from, and the refusals (another configuration, other networks, an unreadable file).
End to end with torchrun and with a real kill: tests/test_sampling_scale.py."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlsm.data.points import LabelledData
from dlsm.errors import CheckpointError
from dlsm.math.schedules import NoiseSchedule, geometric_sigmas
from dlsm.math.scores import ModelScores
from dlsm.stages.base import ExperimentSpec, Run, State
from dlsm.stages.sample import sample
from dlsm.stages.units import Unit, networks_digest, pack_seed, plan_units, share, unit_seed
from dlsm.tracking import NullTracker

sample_module = importlib.import_module("dlsm.stages.sample")  # (dlsm.stages.sample the attribute is the stage)
SEED, CLASSES, DIM = 5, 3, 2
SCHEDULE = NoiseSchedule(sigmas=geometric_sigmas(5.0, 0.1, 4), eps=2e-3, n_steps_each=2)


def test_plan_known_answer():
    units = plan_units(["base", "ours"], [5, 2], 2, SEED)
    assert [(u.method, u.j, u.c, u.b, u.n) for u in units] == [
        ("base", 0, 0, 0, 2), ("base", 0, 0, 1, 2), ("base", 0, 0, 2, 1), ("base", 0, 1, 0, 2),
        ("ours", 1, 0, 0, 2), ("ours", 1, 0, 1, 2), ("ours", 1, 0, 2, 1), ("ours", 1, 1, 0, 2),
    ]
    assert units[0].seed == SEED + 41 and units[4].seed == SEED + 41 + 100  # batch 0: the stage's old seeds
    assert units[3].seed == SEED + 41 + 1 and units[7].seed == SEED + 41 + 100 + 1
    assert [u.n for u in plan_units(["base"], [5, 2], None, SEED)] == [5, 2]  # no batch size: a class at once


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=6), batch=st.one_of(st.none(), st.integers(1, 17)),
       world=st.integers(1, 9), same_noise=st.booleans())
def test_shares_partition_the_plan_and_seeds_are_distinct(counts, batch, world, same_noise):
    units = plan_units(["a", "b", "c"], counts, batch, SEED, same_noise=same_noise)
    for j in range(3):  # every class gets exactly its count
        for c, m in enumerate(counts):
            assert sum(u.n for u in units if u.j == j and u.c == c) == m
    shares = [share(units, r, world) for r in range(world)]
    assert sorted((u.j, u.c, u.b) for s in shares for u in s) == sorted((u.j, u.c, u.b) for u in units)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    seeds = [u.seed for u in units if not same_noise or u.j == 0]
    assert len(set(seeds)) == len(seeds)  # no two units of a method (of any method without same_noise) share a stream
    if same_noise:  # every method draws the same noise unit by unit
        assert [u.seed for u in units if u.j == 0] == [u.seed for u in units if u.j == 2]


def test_unit_seed_depends_on_each_coordinate():
    base = unit_seed(SEED, 1, 2, 3)
    others = {unit_seed(SEED + 1, 1, 2, 3), unit_seed(SEED, 0, 2, 3), unit_seed(SEED, 1, 1, 3),
              unit_seed(SEED, 1, 2, 2)}
    assert base not in others and len(others) == 4
    assert unit_seed(SEED, 1, 2, 3, same_noise=True) == unit_seed(SEED, 0, 2, 3, same_noise=True)
    assert 0 <= base < 2**63


def test_networks_digest_sees_one_ulp_and_alpha():
    torch.manual_seed(0)
    net, clf = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    ref = networks_digest(ModelScores(net, clf, alpha=1.0))
    assert networks_digest(ModelScores(net, clf, alpha=1.0)) == ref
    assert networks_digest(ModelScores(net, clf, alpha=2.0)) != ref
    with torch.no_grad():
        clf.weight[0, 0] = torch.nextafter(clf.weight[0, 0], torch.tensor(10.0))
    assert networks_digest(ModelScores(net, clf, alpha=1.0)) != ref


class CountingScores:
    """Gaussian class scores whose every call is counted (which units a launch draws)."""

    calls = 0

    def __init__(self, mu: float) -> None:
        self.mu = torch.tensor(mu)

    def posterior_fn(self, c: int):
        def fn(x, sigma):
            CountingScores.calls += 1
            return -(x - (self.mu + c)) / (1.0 + sigma[:, None] ** 2)

        return fn


def _run(rundir: Path, *, seed: int = SEED) -> Run:
    spec = ExperimentSpec(
        name="units", seed=seed, dataset=None, score_model=None, classifiers={}, score_loss=None,
        classifier_losses={}, alpha=1.0, sampling_methods=None, sampler=_sampler, stages=(),
    )
    return Run(spec=spec, tracker=NullTracker(), parent_id="", rundir=rundir, params={}, device=torch.device("cpu"))


def _sampler(score_fn, x, sigmas, *, generator):
    for s in sigmas:
        x = x + 0.1 * score_fn(x, s.expand(len(x))) + 0.05 * torch.randn(x.shape, generator=generator)
    return x


def _state(methods: dict) -> State:
    data = LabelledData(x=torch.zeros(CLASSES, DIM), y=torch.arange(CLASSES), num_classes=CLASSES, name="toy")
    return State(data=data, schedule=SCHEDULE, extra_methods=dict(methods))


METHODS = {"base": CountingScores(0.0), "ours": CountingScores(2.0)}
N, BATCH = 5, 2  # 3 units per class, 18 in all
CALLS_PER_UNIT = len(SCHEDULE.sigmas)


def _stage(rundir: Path, methods: dict = METHODS, **kw) -> dict:
    CountingScores.calls = 0
    return sample(_run(rundir, **kw), _state(methods), n_per_class=N, batch_size=BATCH).samples


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[m].keys() == b[m].keys() and all(torch.equal(a[m][c], b[m][c]) for c in a[m]) for m in a)


def test_relaunch_draws_only_missing_units_and_gives_the_same_samples(tmp_path: Path):
    ref = _stage(tmp_path / "one")
    assert CountingScores.calls == 18 * CALLS_PER_UNIT
    again = _stage(tmp_path / "one")  # every unit finished: nothing drawn
    assert CountingScores.calls == 0 and _same(again, ref)
    files = sorted((tmp_path / "one" / "sampling").rglob("*.pt"))
    assert len(files) == 18
    for f in files[::3]:  # as if killed before these 6 units were written
        f.unlink()
    resumed = _stage(tmp_path / "one")
    assert CountingScores.calls == 6 * CALLS_PER_UNIT
    assert _same(resumed, ref)
    # and the .npz is the one an uninterrupted launch writes
    fresh = tmp_path / "fresh"
    _stage(fresh)
    assert (fresh / "samples-ours.npz").read_bytes() == (tmp_path / "one" / "samples-ours.npz").read_bytes()


def _raise_own(error: BaseException | None) -> None:
    if error is not None:
        raise error


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_draw_their_shares_and_rank0_gathers_the_one_process_samples(tmp_path: Path, monkeypatch, world):
    ref = _stage(tmp_path / "ref")
    shared = tmp_path / "world"
    monkeypatch.setattr(sample_module.dist, "world_size", lambda: world)
    monkeypatch.setattr(sample_module.dist, "main_first", lambda fn: fn())
    # the ranks one after another in this process: rank 0's work for all is done by rank 0 (the others get None),
    # and each rank's own error is raised where the ranks would share it
    monkeypatch.setattr(sample_module.dist, "from_main", lambda fn: fn() if sample_module.dist.is_main() else None)
    monkeypatch.setattr(sample_module.dist, "settle", _raise_own)
    drawn = 0
    for rank in reversed(range(world)):  # the other ranks first; rank 0, last, finds their units on disk
        monkeypatch.setattr(sample_module.dist, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(sample_module.dist, "is_main", lambda rank=rank: rank == 0)
        out = _stage(shared)
        drawn += CountingScores.calls
        assert bool(out) == (rank == 0)  # only rank 0 gathers
    assert drawn == 18 * CALLS_PER_UNIT  # each unit drawn once, by one rank
    assert _same(out, ref)
    for name in METHODS:
        assert (shared / f"samples-{name}.npz").read_bytes() == (tmp_path / "ref" / f"samples-{name}.npz").read_bytes()


def test_a_unit_of_another_configuration_is_refused(tmp_path: Path):
    _stage(tmp_path)
    with pytest.raises(CheckpointError, match=r"another seed .* not reused: delete .*sampling or relaunch with --fre"):
        _stage(tmp_path, seed=SEED + 1)
    other = {"base": CountingScores(0.5), "ours": CountingScores(2.0)}  # other networks, same names
    with pytest.raises(CheckpointError, match=r"another networks"):
        _stage(tmp_path, methods=other)


def test_an_unreadable_unit_is_one_line(tmp_path: Path):
    _stage(tmp_path)
    victim = tmp_path / "sampling" / "ours" / "c1-b0.pt"
    victim.write_bytes(victim.read_bytes()[:50])  # torn by something other than our atomic write
    with pytest.raises(CheckpointError, match=r"c1-b0.pt is unreadable"):
        _stage(tmp_path)


def test_units_are_in_their_folder_by_method_class_and_batch(tmp_path: Path):
    _stage(tmp_path)
    names = {str(p.relative_to(tmp_path / "sampling")) for p in (tmp_path / "sampling").rglob("*.pt")}
    assert names == {f"{m}/c{c}-b{b}.pt" for m in METHODS for c in range(CLASSES) for b in range(3)}
    assert Unit("base", 0, 1, 2, 1, 0).key == "base/c1-b2"



# -- packed units (sample.classes_per_unit) ---------------------------------------------------------------------


def test_packing_known_answer():
    units = plan_units(["base", "exact"], [2, 3, 4, 5], None, SEED, classes_per_unit=3, packable=["base"])
    assert [(u.method, u.c, u.b, u.n, u.sizes) for u in units] == [
        ("base", 0, 0, 9, (2, 3, 4)), ("base", 3, 0, 5, ()),  # a block of one class is an ordinary unit
        ("exact", 0, 0, 2, ()), ("exact", 1, 0, 3, ()), ("exact", 2, 0, 4, ()), ("exact", 3, 0, 5, ()),
    ]
    assert units[0].seed == pack_seed(SEED, 0, 0, 3) and units[1].seed == SEED + 41 + 3
    assert units[0].labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2] and units[0].key == "base/c0-2"
    # with a batch size, a packed unit holds at most one batch: 2 + 3 fit in 6, 4 more do not
    units = plan_units(["base"], [2, 3, 4, 5], 6, SEED, classes_per_unit=3, packable=["base"])
    assert [(u.c, u.b, u.n, u.sizes) for u in units] == [(0, 0, 5, (2, 3)), (2, 0, 4, ()), (3, 0, 5, ())]


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 12), min_size=1, max_size=12), batch=st.one_of(st.none(), st.integers(1, 30)),
       k=st.integers(1, 12))
def test_packed_plans_draw_every_class_exactly_its_count(counts, batch, k):
    units = plan_units(["a", "b"], counts, batch, SEED, classes_per_unit=k, packable=["a"])
    for name in ("a", "b"):
        got = [0] * len(counts)
        for u in (u for u in units if u.method == name):
            assert len(u.sizes) <= k and (batch is None or not u.sizes or u.n <= batch)
            for c, m in zip(u.classes, u.sizes or (u.n,), strict=True):
                got[c] += m
        assert got == counts
    assert all(not u.sizes for u in units if u.method == "b")  # not packable: one class per unit


class LabelScores:
    """Gaussian class scores that take a label per sample (as ModelScores does), every call counted."""

    labels_per_sample = True

    def __init__(self, mu: float) -> None:
        self.mu = torch.tensor(mu)

    def posterior_fn(self, y):
        def fn(x, sigma):
            CountingScores.calls += 1
            shift = y[:, None].to(x.dtype) if isinstance(y, torch.Tensor) else y
            return -(x - (self.mu + shift)) / (1.0 + sigma[:, None] ** 2)

        return fn


def test_a_packed_unit_is_one_sampler_run_over_its_classes(tmp_path: Path):
    methods = {"base": LabelScores(0.0), "ours": LabelScores(2.0)}
    CountingScores.calls = 0
    out = sample(_run(tmp_path), _state(methods), n_per_class=N, classes_per_unit=2).samples
    assert CountingScores.calls == 2 * 2 * CALLS_PER_UNIT  # per method: classes {0, 1} packed, class 2 alone
    for j, (name, scores) in enumerate(methods.items()):
        gen = torch.Generator().manual_seed(pack_seed(SEED, j, 0, 2))
        x0 = SCHEDULE.sigma_max * torch.randn((2 * N, DIM), generator=gen)
        ref = _sampler(scores.posterior_fn(torch.tensor([0] * N + [1] * N)), x0, SCHEDULE.sigmas, generator=gen)
        torch.testing.assert_close(torch.cat([out[name][0], out[name][1]]), ref, rtol=0, atol=0)
        gen = torch.Generator().manual_seed(SEED + 41 + 100 * j + 2)  # class 2: an ordinary unit, its old seed
        x0 = SCHEDULE.sigma_max * torch.randn((N, DIM), generator=gen)
        torch.testing.assert_close(out[name][2], _sampler(scores.posterior_fn(2), x0, SCHEDULE.sigmas, generator=gen),
                                   rtol=0, atol=0)
    assert {p.name for p in (tmp_path / "sampling" / "base").iterdir()} == {"c0-1.pt", "c2-b0.pt"}


def test_model_scores_with_a_label_per_sample_equal_one_label_at_a_time():
    torch.manual_seed(0)
    score_model = lambda x, s: -x  # noqa: E731
    clf = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, CLASSES))
    scores = ModelScores(score_model, lambda x, s: clf(x), alpha=1.5)
    x, sigma, y = torch.randn(6, DIM), torch.full((6,), 0.5), torch.tensor([0, 2, 1, 1, 0, 2])
    packed = scores.posterior_fn(y)(x, sigma)
    for i in range(6):
        torch.testing.assert_close(packed[i:i + 1], scores.posterior_fn(int(y[i]))(x[i:i + 1], sigma[i:i + 1]))
