"""Training loop (dlsm.train.loop): the sigma draw, checkpoints, exact resume, the NaN guard and the EMA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from dlsm.data.images import ImageData
from dlsm.data.points import two_moons
from dlsm.errors import CheckpointError, ConfigError, NonFiniteLossError
from dlsm.math.losses import dsm_loss
from dlsm.math.schedules import NoiseSchedule, geometric_sigmas, log_uniform_sigmas
from dlsm.nets.mlp import ScoreMLP
from dlsm.train.device import resolve_device
from dlsm.train.loop import draw_sigmas, load_checkpoint, save_checkpoint, train, warmup_factor

DATA = two_moons(n=200)
SCHEDULE = NoiseSchedule(sigmas=geometric_sigmas(40.0, 0.01, 10), eps=1e-5, n_steps_each=5)


def _model(seed: int = 0) -> ScoreMLP:
    torch.manual_seed(seed)
    return ScoreMLP(2, hidden=16, depth=2, emb_dim=8, sigma_data=14.0)


def _dsm(model, x, y, sigma, noise):
    return dsm_loss(model, x, sigma, noise)


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def _train(model, path, n_iters, *, loss_fn=_dsm, **kw):
    # every setting explicit, so that gin bindings left by other tests cannot change these runs
    kw = {
        "batch_size": 32,
        "ckpt_every": 10,
        "log_every": 5,
        "disable_progress": True,
        "optimizer": _adam,
        "ema_decay": 0.999,
        "grad_clip": None,
        "sigma_distribution": "log_uniform",
        "device": "cpu",
        "warmup": 0,
        "autocast": False,
        "compile": False,
        "flip": False,
        "snapshot_every": 0,
        **kw,
    }
    return train(model, loss_fn, DATA, SCHEDULE, ckpt_path=path, seed=7, n_iters=n_iters, **kw)


def _one_line(err: BaseException) -> str:
    """The error's own message: gin appends "In call to configurable ..." lines, which dlsm.launch drops."""
    lines = str(err).strip().splitlines()
    assert all(line.strip().startswith("In call to configurable") for line in lines[1:]), lines
    return lines[0]


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path):
    g = torch.Generator().manual_seed(3)
    state = {
        "step": 12,
        "model": {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5)},
        "ema": {"w": torch.randn(3, 4, generator=g, dtype=torch.float64)},
        "generator": g.get_state(),
        "nested": {"list": [1, 2.5, "x"], "t": (torch.ones(2), None)},
    }
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert back["step"] == 12
    _assert_state_equal(back["model"], state["model"])
    _assert_state_equal(back["ema"], state["ema"])
    assert back["ema"]["w"].dtype == torch.float64
    assert torch.equal(back["generator"], state["generator"])
    assert back["nested"]["list"] == [1, 2.5, "x"]
    assert torch.equal(back["nested"]["t"][0], torch.ones(2)) and back["nested"]["t"][1] is None
    # the generator state restores the same random stream
    g2 = torch.Generator()
    g2.set_state(back["generator"])
    assert torch.equal(torch.randn(4, generator=g2), torch.randn(4, generator=g))


def test_atomic_write_leaves_no_temporary_files_and_replaces(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"a": torch.zeros(2)}})
    save_checkpoint(path, {"model": {"a": torch.ones(2)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["a"], torch.ones(2))
    # a save that fails mid-way (unpicklable object) keeps the old file and removes its temporary file
    with pytest.raises(Exception):  # noqa: B017 - pickling errors differ between versions
        save_checkpoint(path, {"model": {"a": torch.full((2,), 5.0)}, "bad": lambda: None})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["a"], torch.ones(2))


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "missing", "not_dlsm", "not_dict"])
def test_unreadable_checkpoint_raises_one_line_checkpoint_error(tmp_path: Path, kind: str):
    path = tmp_path / "ckpt.pt"
    if kind == "truncated":
        save_checkpoint(path, {"model": {"w": torch.randn(100, 100)}})
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01 this is not a checkpoint \xff" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_dlsm":
        torch.save({"weights": torch.ones(1)}, path)
    elif kind == "not_dict":
        torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert info.value.__cause__ is None  # raised "from None": no chained traceback


def test_checkpoint_of_a_different_model_raises(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    _train(_model(), path, 10)
    other = ScoreMLP(2, hidden=8, depth=2, emb_dim=8)
    with pytest.raises(CheckpointError) as info:
        _train(other, path, 20)
    assert str(path) in _one_line(info.value)


# --------------------------------------------------------------------------------------------
# resume, NaN guard, EMA
# --------------------------------------------------------------------------------------------


def test_resume_gives_identical_weights(tmp_path: Path):
    straight = _train(_model(), tmp_path / "a.pt", 20)
    assert straight.step == 20

    first = _train(_model(), tmp_path / "b.pt", 10)
    assert first.step == 10 and load_checkpoint(tmp_path / "b.pt")["step"] == 10
    # a new model with different initial weights: everything must come from the checkpoint
    torch.manual_seed(999)
    resumed = _train(_model(seed=123), tmp_path / "b.pt", 20)
    assert resumed.step == 20

    _assert_state_equal(straight.model.state_dict(), resumed.model.state_dict())
    _assert_state_equal(straight.ema.state_dict(), resumed.ema.state_dict())
    # the logged losses of the second half coincide too
    assert resumed.losses == [e for e in straight.losses if e[0] > 10]
    _assert_state_equal(load_checkpoint(tmp_path / "a.pt")["model"], load_checkpoint(tmp_path / "b.pt")["model"])
    # and training did change the weights
    assert not torch.equal(straight.model.state_dict()["net.out.weight"], _model().state_dict()["net.out.weight"])


def test_resume_is_not_a_restart(tmp_path: Path):
    """Control for the resume test: the resumed model started from other weights, so a trainer that ignored
    the checkpoint and trained it from scratch would end elsewhere."""
    straight = _train(_model(), tmp_path / "a.pt", 20)
    scratch = _train(_model(seed=123), tmp_path / "c.pt", 20)
    assert not torch.equal(straight.model.state_dict()["net.out.weight"], scratch.model.state_dict()["net.out.weight"])


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path: Path):
    calls = {"n": 0}

    def nan_at_15(model, x, y, sigma, noise):
        calls["n"] += 1
        loss = dsm_loss(model, x, sigma, noise)
        return loss * float("nan") if calls["n"] == 15 else loss

    path = tmp_path / "ckpt.pt"
    with pytest.raises(NonFiniteLossError) as info:
        _train(_model(), path, 20, loss_fn=nan_at_15, log_every=100)
    assert "step 10" in _one_line(info.value)
    state = load_checkpoint(path)
    assert state["step"] == 10
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert all(bool(torch.isfinite(v).all()) for v in state["ema"].values() if v.is_floating_point())
    # it is exactly the clean 10-step checkpoint
    _train(_model(), tmp_path / "clean.pt", 10)
    _assert_state_equal(state["model"], load_checkpoint(tmp_path / "clean.pt")["model"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "clean.pt"]


def test_nan_loss_before_first_checkpoint(tmp_path: Path):
    def always_nan(model, x, y, sigma, noise):
        return dsm_loss(model, x, sigma, noise) * float("nan")

    path = tmp_path / "ckpt.pt"
    with pytest.raises(NonFiniteLossError):
        _train(_model(), path, 20, loss_fn=always_nan, log_every=3)
    assert not path.exists()


class _RecordingSGD(torch.optim.SGD):
    """SGD that records a copy of the parameters after every step."""

    snapshots: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        out = super().step(closure)
        _RecordingSGD.snapshots.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return out


def test_ema_matches_manual_exponential_moving_average(tmp_path: Path):
    decay, n_iters = 0.8, 4
    _RecordingSGD.snapshots = []
    model = _model()
    names = [n for n, _ in model.named_parameters()]

    def opt(params):
        return _RecordingSGD(params, lr=0.05)

    res = _train(model, tmp_path / "ckpt.pt", n_iters, optimizer=opt, ema_decay=decay)
    snaps = _RecordingSGD.snapshots
    assert len(snaps) == n_iters
    # torch.optim.swa_utils semantics: the first update copies, then ema <- decay ema + (1 - decay) param
    ema = [p.double() for p in snaps[0]]
    for snap in snaps[1:]:
        ema = [decay * e + (1.0 - decay) * p.double() for e, p in zip(ema, snap, strict=True)]
    got = dict(res.ema.named_parameters())
    raw = dict(res.model.named_parameters())
    differs = False
    for name, ref, last in zip(names, ema, snaps[-1], strict=True):
        torch.testing.assert_close(got[name].double(), ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(raw[name].detach(), last)
        differs |= not torch.allclose(got[name], raw[name])
    assert differs  # the EMA is not just the raw weights
    # buffers are averaged too (use_buffers=True); the Fourier frequencies are constant, so they are equal
    assert torch.equal(res.ema.net.embed.freqs, res.model.net.embed.freqs)
    # the EMA weights are what the checkpoint holds under "ema"
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert state["step"] == n_iters
    torch.testing.assert_close(state["ema"]["module.net.out.weight"], got["net.out.weight"], rtol=0, atol=0)
    assert math.isfinite(res.losses[-1][1])


def test_eval_fn_runs_at_step_zero_every_k_and_at_the_end_on_training_weights(tmp_path: Path):
    seen: list[tuple[int, float]] = []
    calls: list[bool] = []

    def eval_fn(model):
        calls.append(model.training)
        return {"track/w": float(next(model.parameters()).detach().sum())}

    model = _model()
    _train(model, tmp_path / "a.pt", 25, eval_fn=eval_fn, eval_every=10,
           log_fn=lambda m, step: seen.append((step, m["track/w"])) if "track/w" in m else None)
    assert [s for s, _ in seen] == [0, 10, 20, 25]
    assert calls == [False] * 4 and model.training is False  # evaluated in eval mode
    assert seen[-1][1] == pytest.approx(float(next(model.parameters()).detach().sum()))  # raw weights, not EMA


# --------------------------------------------------------------------------------------------
# the training sigma draw
# --------------------------------------------------------------------------------------------


def _binomial_ok(counts: torch.Tensor, n: int, p: float, z: float = 4.5) -> bool:
    """Every count within z binomial standard deviations of n p."""
    return bool(((counts.double() - n * p).abs() <= z * math.sqrt(n * p * (1 - p))).all())


@settings(max_examples=10, deadline=None, derandomize=True)
@given(levels=st.integers(2, 40), seed=st.integers(0, 2**31 - 1))
def test_discrete_sigmas_cover_every_level_uniformly(levels, seed):
    """NCSN/NCSNv2 training draws the level index uniformly from {0, ..., L-1}: every level, sigma_L included,
    has probability 1/L (checked per level with a binomial bound and jointly with a chi-square test)."""
    sched = NoiseSchedule(sigmas=geometric_sigmas(50.0, 0.01, levels), eps=1e-5, n_steps_each=5)
    n = 400 * levels
    sig = draw_sigmas(n, sched, "discrete", generator=torch.Generator().manual_seed(seed))
    assert sig.shape == (n,)
    # every draw is one of the levels exactly; recover the index
    match = sig[:, None] == sched.sigmas[None, :]
    assert bool((match.sum(1) == 1).all())
    counts = match.sum(0)
    assert int(counts[-1]) > 0 and float(sig.min()) == float(sched.sigmas[-1])  # sigma_min = sigma_L is drawn
    assert int(counts[0]) > 0 and float(sig.max()) == float(sched.sigmas[0])
    assert _binomial_ok(counts, n, 1.0 / levels)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-4


@settings(max_examples=10, deadline=None, derandomize=True)
@given(sigma_min=st.floats(1e-3, 1.0), log_ratio=st.floats(0.5, 12.0), seed=st.integers(0, 2**31 - 1))
def test_log_uniform_sigmas_support_and_law(sigma_min, log_ratio, seed):
    """log sigma ~ U(log sigma_min, log sigma_max): support, KS test of log sigma, and coverage of both ends."""
    sigma_max = sigma_min * math.exp(log_ratio)
    sched = NoiseSchedule(sigmas=geometric_sigmas(sigma_max, sigma_min, 7), eps=1e-5, n_steps_each=5)
    n = 5000
    sig = draw_sigmas(n, sched, "log_uniform", generator=torch.Generator().manual_seed(seed)).double()
    lo, hi = math.log(sched.sigma_min), math.log(sched.sigma_max)
    u = (sig.log() - lo) / (hi - lo)
    assert bool((u >= -1e-6).all()) and bool((u <= 1 + 1e-6).all())
    assert stats.kstest(u.clamp(0, 1).numpy(), "uniform").pvalue > 1e-4
    # both ends are reached: P(no draw in the bottom or top 0.2 %) = 0.998^5000 ~ 5e-5 per end
    assert float(u.min()) < 0.002 and float(u.max()) > 0.998


def test_draw_sigmas_rejects_unknown_distribution():
    with pytest.raises(ConfigError, match="sigma_distribution"):
        draw_sigmas(4, SCHEDULE, "uniform")


@pytest.mark.parametrize("dist", ["discrete", "log_uniform"])
def test_train_draws_its_sigmas_from_the_schedule(tmp_path: Path, dist: str):
    """What ``train`` hands the loss: with 'discrete' only the schedule's levels, each about 1/L of the time;
    with 'log_uniform' a log-uniform law on [sigma_min, sigma_max]."""
    seen: list[torch.Tensor] = []

    def recording(model, x, y, sigma, noise):
        seen.append(sigma.detach().clone())
        return _dsm(model, x, y, sigma, noise)

    _train(_model(), tmp_path / "c.pt", 25, loss_fn=recording, batch_size=64, sigma_distribution=dist)
    sig = torch.cat(seen)
    n, levels = sig.numel(), len(SCHEDULE.sigmas)
    assert n == 25 * 64
    if dist == "discrete":
        match = sig[:, None] == SCHEDULE.sigmas[None, :]
        assert bool((match.sum(1) == 1).all())
        assert _binomial_ok(match.sum(0), n, 1.0 / levels)
    else:
        lo, hi = math.log(SCHEDULE.sigma_min), math.log(SCHEDULE.sigma_max)
        u = ((sig.double().log() - lo) / (hi - lo)).clamp(0, 1)
        assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-4
        assert not bool(torch.isin(sig, SCHEDULE.sigmas).all())  # continuous, not the discrete levels


def test_ctrl_c_mid_step_is_acted_on_after_the_step_with_a_checkpoint_of_it(tmp_path: Path):
    """SIGINT arriving inside step 7 (ckpt_every = 10): training stops after that step, the checkpoint
    holds step 7, and resuming gives the same weights as an uninterrupted run."""
    import os
    import signal

    calls = {"n": 0}

    def interrupting(model, x, y, sigma, noise):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, in the middle of the step
        return _dsm(model, x, y, sigma, noise)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _train(_model(), tmp_path / "i.pt", 20, loss_fn=interrupting)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    assert calls["n"] == 7 and load_checkpoint(tmp_path / "i.pt")["step"] == 7
    resumed = _train(_model(seed=5), tmp_path / "i.pt", 20)
    straight = _train(_model(), tmp_path / "s.pt", 20)
    _assert_state_equal(straight.model.state_dict(), resumed.model.state_dict())


# --------------------------------------------------------------------------------------------
# devices, bit-identical CPU streams, warm-up, autocast, compile, snapshots, flips
# --------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _reference_loop(dist: str, n_iters: int = 20):
    """The pre-change training loop written out: per step randint indices, x[idx], sigma, noise from one CPU
    generator seeded 7, Adam, then the EMA (torch's AveragedModel, decay 0.999, buffers included); the logged losses
    are the float32 sum of every 5 steps' losses over 5."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    gen = torch.Generator().manual_seed(7)
    lo, hi = math.log(SCHEDULE.sigma_min), math.log(SCHEDULE.sigma_max)
    model.train()
    running, losses = torch.zeros(()), []
    for step in range(1, n_iters + 1):
        idx = torch.randint(0, DATA.x.shape[0], (32,), generator=gen)
        x = DATA.x[idx]
        if dist == "log_uniform":
            sigma = torch.exp(lo + torch.rand(32, generator=gen) * (hi - lo))
        else:
            sigma = SCHEDULE.sigmas[torch.randint(0, len(SCHEDULE.sigmas), (32,), generator=gen)]
        noise = torch.randn(x.shape, generator=gen)
        loss = dsm_loss(model, x, sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        running += loss.detach()
        if step % 5 == 0:
            losses.append((step, float(running) / 5))
            running.zero_()
    return model, ema, losses


@pytest.mark.parametrize("dist", ["log_uniform", "discrete"])
def test_labelled_data_training_is_bit_identical_to_before(tmp_path: Path, dist: str):
    """LabelledData goes through data.batch(idx) now; the weights and logged losses are those of the pre-change
    trainer, bit for bit, as the pre-change loop written out here computes them in the same run. (Checksums written
    down on one machine are not a property of the code: other CPUs round differently.)"""
    res = _train(_model(), tmp_path / "a.pt", 20, sigma_distribution=dist)
    ref_model, ref_ema, ref_losses = _reference_loop(dist)
    _assert_state_equal(res.model.state_dict(), ref_model.state_dict())
    _assert_state_equal(res.ema.state_dict(), ref_ema.module.state_dict())
    assert res.losses == ref_losses
    assert [s for s, _ in res.losses] == [5, 10, 15, 20] and all(0.5 < v < 1.5 for _, v in res.losses)


def test_draw_sigmas_on_the_cpu_are_log_uniform_sigmas_numbers():
    a = draw_sigmas(1000, SCHEDULE, "log_uniform", generator=torch.Generator().manual_seed(3))
    b = log_uniform_sigmas(1000, SCHEDULE.sigma_min, SCHEDULE.sigma_max, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = draw_sigmas(1000, SCHEDULE, "discrete", generator=torch.Generator().manual_seed(3), device="cpu")
    idx = torch.randint(0, len(SCHEDULE.sigmas), (1000,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(c, SCHEDULE.sigmas[idx])


def test_unknown_device_is_a_one_line_config_error(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        _train(_model(), tmp_path / "a.pt", 5, device="tpu")
    assert _one_line(info.value).startswith("device = 'tpu' is not a device name")
    assert not (tmp_path / "a.pt").exists()


# warm-up -------------------------------------------------------------------------------------------------------


class _LrRecordingAdam(torch.optim.Adam):
    """Adam that records the learning rate each step() uses."""

    used: list[float] = []

    def step(self, closure=None):
        _LrRecordingAdam.used.append(float(self.param_groups[0]["lr"]))
        return super().step(closure)


def _recording_adam(params):
    return _LrRecordingAdam(params, lr=1e-3)


def test_warmup_factor_known_values():
    # (step + 1) / warmup until 1; score_sde's lr * min(step / warmup, 1) one step later
    assert [warmup_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [warmup_factor(k, 4) for k in range(6)] == [min((k + 1) / 4, 1.0) for k in range(6)]
    assert warmup_factor(0, 1) == 1.0 and warmup_factor(0, 0) == 1.0 and warmup_factor(10**6, 0) == 1.0


def test_warmup_lr_values_and_resume(tmp_path: Path):
    """warmup = 4, lr = 1e-3: steps 0, 1, warmup - 1, warmup use 2.5e-4, 5e-4, 1e-3, 1e-3; a run stopped after step 1
    and resumed continues with 7.5e-4 at step 2 and ends with the weights of the straight run."""
    expected = [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    _LrRecordingAdam.used = []
    straight = _train(_model(), tmp_path / "a.pt", 6, warmup=4, optimizer=_recording_adam)
    assert _LrRecordingAdam.used == pytest.approx(expected, rel=1e-12)
    state = load_checkpoint(tmp_path / "a.pt")
    assert state["base_lrs"] == [1e-3] and state["warmup"] == 4

    _LrRecordingAdam.used = []
    _train(_model(), tmp_path / "b.pt", 2, warmup=4, optimizer=_recording_adam)
    assert load_checkpoint(tmp_path / "b.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
    resumed = _train(_model(seed=3), tmp_path / "b.pt", 6, warmup=4, optimizer=_recording_adam)
    assert _LrRecordingAdam.used == pytest.approx(expected, rel=1e-12)  # 2 steps, then 4 after the resume
    _assert_state_equal(straight.model.state_dict(), resumed.model.state_dict())
    _assert_state_equal(straight.ema.state_dict(), resumed.ema.state_dict())
    # without warm-up the rate is untouched
    _LrRecordingAdam.used = []
    _train(_model(), tmp_path / "c.pt", 3, optimizer=_recording_adam)
    assert _LrRecordingAdam.used == [1e-3] * 3


def test_warmup_changes_training_and_is_checked(tmp_path: Path):
    plain = _train(_model(), tmp_path / "a.pt", 3)
    warm = _train(_model(), tmp_path / "b.pt", 3, warmup=100)
    assert not torch.equal(plain.model.state_dict()["net.out.weight"], warm.model.state_dict()["net.out.weight"])
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="train.warmup must be a non-negative integer"):
            _train(_model(), tmp_path / "c.pt", 3, warmup=bad)


def test_checkpoint_from_before_the_change_still_resumes(tmp_path: Path):
    """A checkpoint holding only step, model, ema, optimizer and generator (the pre-change format) resumes to the
    weights of a straight run, with and without warm-up (its optimizer's lr is then the base lr)."""
    straight = _train(_model(), tmp_path / "a.pt", 20)
    _train(_model(), tmp_path / "b.pt", 10)
    state = load_checkpoint(tmp_path / "b.pt")
    old = {k: state[k] for k in ("step", "model", "ema", "optimizer", "generator")}
    save_checkpoint(tmp_path / "b.pt", old)
    save_checkpoint(tmp_path / "c.pt", old)
    resumed = _train(_model(seed=4), tmp_path / "b.pt", 20)
    _assert_state_equal(straight.model.state_dict(), resumed.model.state_dict())
    _LrRecordingAdam.used = []
    _train(_model(seed=4), tmp_path / "c.pt", 12, warmup=4, optimizer=_recording_adam)
    assert _LrRecordingAdam.used == [1e-3, 1e-3]  # steps 10 and 11 are past the warm-up of 4 steps


def test_checkpoint_of_another_device_type_is_a_one_line_checkpoint_error(tmp_path: Path):
    _train(_model(), tmp_path / "a.pt", 5)
    state = load_checkpoint(tmp_path / "a.pt")
    state["generator"], state["device"] = torch.zeros(16, dtype=torch.uint8), "cuda"  # a CUDA (Philox) state
    save_checkpoint(tmp_path / "a.pt", state)
    with pytest.raises(CheckpointError) as info:
        _train(_model(), tmp_path / "a.pt", 10)
    msg = _one_line(info.value)
    assert "a cuda run" in msg and "train.device to 'cuda'" in msg and "--fresh" in msg


# autocast and compile ------------------------------------------------------------------------------------------


def test_autocast_bf16_runs_on_cpu_close_to_fp32(tmp_path: Path):
    """Same weights, same first batch: the bf16-autocast loss is finite and within 2% of the fp32 one (bf16 keeps
    8 significant bits, ~0.4% per rounding); it differs from it, so autocast really ran."""
    seen: list[tuple[bool, torch.dtype]] = []

    def recording(model, x, y, sigma, noise):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return _dsm(model, x, y, sigma, noise)

    fp32 = _train(_model(), tmp_path / "a.pt", 4, log_every=1, loss_fn=recording)
    assert [on for on, _ in seen] == [False] * 4
    seen.clear()
    bf16 = _train(_model(), tmp_path / "b.pt", 4, log_every=1, loss_fn=recording, autocast=True)
    assert seen == [(True, torch.bfloat16)] * 4
    first32, first16 = fp32.losses[0][1], bf16.losses[0][1]
    assert math.isfinite(first16) and first16 != first32
    assert first16 == pytest.approx(first32, rel=2e-2)
    assert all(math.isfinite(v) for _, v in bf16.losses)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # the weights stay float32
    # a loss returned in bf16 is averaged in float32
    per_example: list[torch.Tensor] = []

    def in_bf16(model, x, y, sigma, noise):
        loss = _dsm(model, x, y, sigma, noise).bfloat16()
        per_example.append(loss.detach())
        return loss

    res = _train(_model(), tmp_path / "c.pt", 1, log_every=1, loss_fn=in_bf16, autocast=True)
    assert res.losses[0][1] == float(per_example[0].float().mean())
    assert res.losses[0][1] != float(per_example[0].mean())  # what a bf16 mean would give


def test_compile_runs_on_cpu_and_matches_eager(tmp_path: Path):
    """train.compile = True: the loss gets torch.compile(model) (inductor, C++ on the CPU); the checkpoint holds the
    plain model's keys, and the weights agree with eager training to float32 rounding (ops may be fused)."""
    kinds: list[str] = []

    def recording(model, x, y, sigma, noise):
        kinds.append(type(model).__name__)
        return _dsm(model, x, y, sigma, noise)

    eager = _train(_model(), tmp_path / "a.pt", 5)
    compiled = _train(_model(), tmp_path / "b.pt", 5, compile=True, loss_fn=recording)
    assert kinds == ["OptimizedModule"] * 5
    assert isinstance(compiled.model, ScoreMLP) and load_checkpoint(tmp_path / "b.pt")["model"].keys() == (
        eager.model.state_dict().keys()
    )
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    _train(_model(), tmp_path / "b.pt", 7)  # and an eager run resumes the compiled run's checkpoint


def test_compile_failure_is_a_one_line_config_error(tmp_path: Path, monkeypatch):
    """What a machine without a working compiler sees: the backend fails at the first call."""
    real = torch.compile

    def no_compiler(gm, example_inputs):
        raise RuntimeError("Compiler: cc is not found")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=no_compiler))
    with pytest.raises(ConfigError) as info:
        _train(_model(), tmp_path / "a.pt", 3, compile=True)
    msg = _one_line(info.value)
    assert "train.compile = True but torch.compile failed" in msg and "set train.compile = False" in msg
    assert not (tmp_path / "a.pt").exists()


def test_compile_of_a_dlsm_classifier_is_a_one_line_config_error(tmp_path: Path, monkeypatch):
    """Total = DLSM' + CE differentiates the classifier's input gradient; torch.compile (AOTAutograd, here with the
    aot_eager backend to skip the C++ build) has no double backward: one line naming the switch, not a traceback."""
    from dlsm.math.losses import total_loss
    from dlsm.nets.mlp import ClassifierMLP

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="aot_eager"))
    torch.manual_seed(0)
    clf, score = ClassifierMLP(2, 2, hidden=8, depth=1), _model().requires_grad_(False)
    with pytest.raises(ConfigError) as info:
        _train(clf, tmp_path / "c.pt", 2, compile=True,
               loss_fn=lambda m, x, y, s, n: total_loss(m, score, x, y, s, n))
    msg = _one_line(info.value)
    assert "cannot train a loss that differentiates the network's input gradient" in msg
    assert "set classifier/train.compile = False" in msg


# snapshots -----------------------------------------------------------------------------------------------------


def test_snapshot_fn_gets_the_ema_module_every_k_steps(tmp_path: Path):
    calls: list[tuple[int, bool, dict]] = []

    def snapshot(module, step):
        calls.append((step, module.training, {k: v.clone() for k, v in module.state_dict().items()}))
        with torch.no_grad():  # what a sampler does: it must not disturb training
            module(torch.zeros(3, 2), torch.ones(3))

    res = _train(_model(), tmp_path / "a.pt", 10, snapshot_every=4, snapshot_fn=snapshot)
    assert [c[0] for c in calls] == [4, 8]
    assert [c[1] for c in calls] == [False, False]  # sampled in eval mode
    # the module given is the EMA network: at step 8 it holds the EMA weights of an 8-step run
    eight = _train(_model(), tmp_path / "b.pt", 8)
    _assert_state_equal(calls[1][2], eight.ema.state_dict())
    assert not torch.equal(calls[1][2]["net.out.weight"], eight.model.state_dict()["net.out.weight"])
    # snapshots change nothing in training; without a function, or with snapshot_every = 0, none are taken
    plain = _train(_model(), tmp_path / "c.pt", 10)
    _assert_state_equal(res.model.state_dict(), plain.model.state_dict())
    calls.clear()
    _train(_model(), tmp_path / "d.pt", 10, snapshot_fn=snapshot)
    _train(_model(), tmp_path / "e.pt", 10, snapshot_every=2)
    assert calls == []


# flips ---------------------------------------------------------------------------------------------------------


class _PixelScore(nn.Module):
    """A one-weight image "score" w x / sigma, enough to train on ImageData."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma):
        return self.w * x / sigma.view(-1, 1, 1, 1)


def _tiny_images() -> ImageData:
    """Four 1x2x3 images whose rows all differ from their mirror images."""
    u = torch.arange(4 * 6, dtype=torch.uint8).view(4, 1, 2, 3) * 10
    return ImageData(u, torch.tensor([0, 1, 0, 1]), 2, "tiny")


@pytest.mark.parametrize("flip", [False, True])
def test_flip_mirrors_image_batches_in_the_documented_draw_order(tmp_path: Path, flip: bool):
    """Per step: indices, then (with flip) one coin per image, mirrored if U < 1/2, then sigma and noise, all from
    the training generator; recomputed here with a generator seeded as train's."""
    data, batch, steps = _tiny_images(), 4, 3  # a batch of every image (train refuses one larger than the data)
    seen: list[torch.Tensor] = []

    def recording(model, x, y, sigma, noise):
        seen.append(x.clone())
        return _dsm(model, x, y, sigma, noise)

    train(_PixelScore(), recording, data, SCHEDULE, ckpt_path=tmp_path / "a.pt", seed=7, n_iters=steps,
          batch_size=batch, optimizer=_adam, disable_progress=True, flip=flip, ckpt_every=10, log_every=10)
    gen = torch.Generator().manual_seed(7)
    images = data.x
    mirrored_any = False
    for x in seen:
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        expected = images[idx]
        if flip:
            coins = torch.rand(batch, generator=gen) < 0.5
            expected = torch.where(coins.view(-1, 1, 1, 1), expected.flip(-1), expected)
            mirrored_any |= bool(coins.any())
        torch.rand(batch, generator=gen)  # sigma
        torch.randn(x.shape, generator=gen)  # noise
        assert torch.equal(x, expected)
    assert mirrored_any == flip
    originals = {tuple(v.flatten().tolist()) for v in images}
    got = {tuple(v.flatten().tolist()) for x in seen for v in x}
    assert (got <= originals) == (not flip)


def test_channels_last_trains_the_same_numbers_in_nhwc(tmp_path: Path):
    """train.channels_last: the conv weights and every image batch are NHWC, the values are those of NCHW."""
    data = ImageData(torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8), torch.arange(8) % 2, 2, "tiny")
    layouts: list[bool] = []

    def make() -> nn.Module:
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 3, 3, padding=1)

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = conv

            def forward(self, x, sigma):
                return self.conv(x) / sigma.view(-1, 1, 1, 1)

        return Net()

    def recording(model, x, y, sigma, noise):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return _dsm(model, x, y, sigma, noise)

    runs = {}
    for cl in (False, True):
        layouts.clear()
        runs[cl] = train(make(), recording, data, SCHEDULE, ckpt_path=tmp_path / f"{cl}.pt", seed=3, n_iters=3,
                         batch_size=4, optimizer=_adam, disable_progress=True, channels_last=cl, ckpt_every=10,
                         log_every=1)
        assert layouts == [cl] * 3
    assert runs[True].model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for (_, a), (_, b) in zip(runs[False].losses, runs[True].losses, strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    torch.testing.assert_close(runs[True].model.conv.weight, runs[False].model.conv.weight, rtol=1e-5, atol=1e-6)


def test_flip_on_points_is_a_one_line_config_error_before_training(tmp_path: Path):
    calls: list[int] = []

    def never(model, x, y, sigma, noise):
        calls.append(1)
        return _dsm(model, x, y, sigma, noise)

    with pytest.raises(ConfigError) as info:
        _train(_model(), tmp_path / "a.pt", 3, flip=True, loss_fn=never)
    assert "train.flip = True" in _one_line(info.value)
    assert calls == [] and not (tmp_path / "a.pt").exists()


# the GPU ---------------------------------------------------------------------------------------------------------


@cuda
def test_train_on_the_gpu_resumes_exactly_and_keeps_everything_there(tmp_path: Path):
    seen: list[set[str]] = []

    def recording(model, x, y, sigma, noise):
        seen.append({t.device.type for t in (x, y, sigma, noise, next(model.parameters()))})
        return _dsm(model, x, y, sigma, noise)

    straight = _train(_model(), tmp_path / "a.pt", 12, device="cuda", loss_fn=recording)
    assert seen and all(s == {"cuda"} for s in seen)
    assert next(straight.ema.parameters()).device == resolve_device("cuda")
    assert load_checkpoint(tmp_path / "a.pt")["device"] == "cuda"
    _train(_model(), tmp_path / "b.pt", 6, device="cuda")
    resumed = _train(_model(seed=2), tmp_path / "b.pt", 12, device="cuda")
    _assert_state_equal(straight.model.state_dict(), resumed.model.state_dict())
    assert all(math.isfinite(v) for _, v in straight.losses)
    with pytest.raises(CheckpointError, match="a cuda run"):  # a CUDA stream cannot go on on the CPU
        _train(_model(), tmp_path / "b.pt", 20, device="cpu")
    # images on the GPU, flipped there, in bf16 autocast
    res = train(_PixelScore(), _dsm, _tiny_images(), SCHEDULE, ckpt_path=tmp_path / "c.pt", seed=1, n_iters=5,
                batch_size=4, optimizer=_adam, disable_progress=True, device="cuda", flip=True, autocast=True)
    assert res.model.w.device.type == "cuda" and math.isfinite(res.losses[-1][1])
