"""Training loop (dlsm.training): checkpoints, exact resume, the NaN guard and the EMA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dlsm.data import two_moons
from dlsm.errors import CheckpointError, NonFiniteLossError
from dlsm.losses import dsm_loss
from dlsm.networks import ScoreMLP
from dlsm.schedules import NoiseSchedule, geometric_sigmas
from dlsm.training import load_checkpoint, save_checkpoint, train

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
