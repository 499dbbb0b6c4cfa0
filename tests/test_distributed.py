"""Several processes (torchrun, dlsm.train.distributed) on the CPU with gloo, all traffic on 127.0.0.1.

A 2-process run with the global ``train.batch_size = B`` (each rank B/2) gives the numbers of one process with
batch B: the 2-process workers and the 1-process reference run the same function (:func:`_cases`), and the
weights are compared within float32 reduction-order tolerance (the 1-process path itself is checked bit for bit
against the pre-change trainer in tests/test_training.py). End to end, ``torchrun -m dlsm.launch`` makes
one MLflow parent run, is interrupted and resumes it.

This file is also the torchrun worker script: ``python -m torch.distributed.run ... test_distributed.py OUT``.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from dlsm.data.points import two_moons
from dlsm.errors import ConfigError
from dlsm.math.losses import dsm_loss, total_loss
from dlsm.math.schedules import NoiseSchedule, geometric_sigmas
from dlsm.nets.mlp import ClassifierMLP, ScoreMLP
from dlsm.train import distributed as dist

ROOT = Path(__file__).resolve().parent.parent
BATCH = 32  # the global batch: 16 per rank on 2 ranks
# float32: DDP sums the two ranks' gradients of 16 examples where one process sums 32 (another rounding order);
# Adam divides by sqrt(v), so rounding differences of ~1e-7 relative grow over the steps but stay far below this
ATOL, RTOL = 2e-6, 1e-5  # measured: at most 6e-8 (DSM) and 1.4e-7 (Total)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
            "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **extra}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *args]


# --------------------------------------------------------------------------------------------
# train() on 2 ranks = train() on 1 rank with the whole batch
# --------------------------------------------------------------------------------------------


def _cases(out: Path) -> dict:
    """What the test compares, computed the same way on 1 and on 2 processes: DSM weights after 10 steps and after
    resuming to 20, the Total (DLSM' + lambda CE, double backward) classifier, the logged losses, and what rank 0
    alone does (checkpoints, log_fn)."""
    import dlsm.train.loop as training

    data = two_moons(n=200)
    schedule = NoiseSchedule(sigmas=geometric_sigmas(40.0, 0.01, 10), eps=1e-5, n_steps_each=5)
    saves, logs, seen = [], [], []
    kw = {"batch_size": BATCH, "ckpt_every": 10, "log_every": 5, "disable_progress": True, "ema_decay": 0.9,
          "optimizer": lambda p: torch.optim.Adam(p, lr=1e-2), "grad_clip": None, "warmup": 0, "device": "cpu",
          "sigma_distribution": "log_uniform", "autocast": False, "compile": False, "flip": False, "snapshot_every": 0,
          "log_fn": lambda metrics, step: logs.append(step)}

    def score_net(seed: int = 0) -> ScoreMLP:
        torch.manual_seed(seed)
        return ScoreMLP(2, hidden=16, depth=2, emb_dim=8, sigma_data=14.0)

    def dsm(m, x, y, s, n):
        if not seen:  # the first step's examples, sigmas and noise on this rank
            seen.append(torch.cat([x, y[:, None], s[:, None], n], dim=1).clone())
        return dsm_loss(m, x, s, n)

    def run(model, loss, name, n_iters):
        save = training.save_checkpoint  # counted: rank 0 alone writes
        training.save_checkpoint = lambda path, state: saves.append(state["step"]) or save(path, state)
        try:
            return training.train(model, loss, data, schedule, ckpt_path=out / f"{name}.pt", seed=7, n_iters=n_iters,
                                  **kw)
        finally:
            training.save_checkpoint = save

    res: dict = {"rank": dist.rank(), "saves": saves, "logs": logs, "first_batch": seen}
    dsm10 = run(score_net(), dsm, "dsm", 10)
    res["dsm10"] = {k: v.clone() for k, v in dsm10.model.state_dict().items()}
    dsm20 = run(score_net(seed=5), dsm, "dsm", 20)  # resumed from the checkpoint of step 10 (seed 5: ignored)
    res["dsm20"], res["dsm20_ema"] = dsm20.model.state_dict(), dsm20.ema.state_dict()
    res["dsm_losses"] = dsm10.losses + dsm20.losses

    prior = score_net(seed=3).requires_grad_(False)
    torch.manual_seed(4)
    clf = ClassifierMLP(2, 2, hidden=16, depth=2, emb_dim=8, sigma_data=14.0)
    tot = run(clf, lambda m, x, y, s, n: total_loss(m, prior, x, y, s, n, lam=0.5), "total", 20)
    res["total"], res["total_losses"] = tot.model.state_dict(), tot.losses
    if dist.world_size() > 1:
        try:
            training.train(score_net(), dsm, data, schedule, ckpt_path=out / "odd.pt", seed=7, n_iters=1,
                           **{**kw, "batch_size": 33})
        except ConfigError as err:
            res["odd_batch"] = str(err).splitlines()[0]  # gin appends "In call to configurable ..." lines
    return res


def _worker(out: Path) -> None:
    """torchrun's entry point: join the gloo group, run the cases, save what this rank got."""
    torch.set_num_threads(1)
    dist.init(timeout=timedelta(seconds=60))  # ranks out of step fail in a minute instead of hanging
    try:
        res = _cases(out / "ckpt")
        torch.save(res, out / f"rank{dist.rank()}.pt")
    finally:
        dist.cleanup()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run(_torchrun(__file__, str(out)), env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one") / "ckpt"
    return _cases(out)


def test_each_rank_trains_on_its_half_of_the_one_process_batch(two_ranks, one_rank):
    (x0,), (x1,) = two_ranks[0]["first_batch"], two_ranks[1]["first_batch"]
    (whole,) = one_rank["first_batch"]
    assert x0.shape[0] == x1.shape[0] == BATCH // 2 and whole.shape[0] == BATCH
    assert torch.equal(torch.cat([x0, x1]), whole)  # rows, labels, sigmas and noise: the same draws, split


def test_two_ranks_stay_identical_and_rank0_alone_writes(two_ranks):
    r0, r1 = two_ranks
    assert (r0["rank"], r1["rank"]) == (0, 1)
    for key in ("dsm10", "dsm20", "dsm20_ema", "total"):  # the same averaged gradients: the same bits
        assert _max_diff(r0[key], r1[key]) == 0.0, key
    assert r0["saves"] == [10, 20, 10, 20] and r1["saves"] == []  # dsm to 10, resumed to 20; total
    assert r0["logs"] and r1["logs"] == []
    assert r0["dsm_losses"] == r1["dsm_losses"]  # the logged loss is the mean over ranks, known to every rank
    assert "global batch and must split evenly across the 2 processes" in r0["odd_batch"]
    assert r1["odd_batch"] == r0["odd_batch"]


@pytest.mark.parametrize("key", ["dsm10", "dsm20", "dsm20_ema", "total"])
def test_two_ranks_with_half_batches_give_one_rank_with_the_whole_batch(two_ranks, one_rank, key):
    """DSM, DSM resumed on 2 ranks from rank 0's checkpoint, its EMA, and Total (DLSM' double backward)."""
    r0, _ = two_ranks
    diff = _max_diff(r0[key], one_rank[key])
    print(f"{key}: max |2 ranks - 1 rank| = {diff:.3g}")
    for k, ref in one_rank[key].items():
        torch.testing.assert_close(r0[key][k], ref, atol=ATOL, rtol=RTOL, msg=f"{key}/{k}")


def test_two_ranks_log_the_losses_of_one_rank(two_ranks, one_rank):
    r0, _ = two_ranks
    for key in ("dsm_losses", "total_losses"):
        steps, values = zip(*r0[key], strict=True)
        ref_steps, ref_values = zip(*one_rank[key], strict=True)
        assert steps == ref_steps
        assert values == pytest.approx(ref_values, rel=1e-4), key


def test_one_process_is_a_world_of_one():
    assert (dist.rank(), dist.world_size(), dist.is_main(), dist.local_rank()) == (0, 1, True, 0)
    assert dist.shard(10) == slice(0, 10) and dist.rank_seed(5) == 5
    assert dist.from_main(lambda: 3) == 3 and dist.share("x") == "x" and dist.main_first(lambda: 4) == 4
    assert dist.any_rank(torch.tensor(True)) and not dist.any_rank(False)
    t = torch.tensor(2.5)
    assert dist.mean(t) is t
    net = torch.nn.Linear(2, 2)
    assert dist.wrap(net) is net
    dist.barrier()
    with pytest.raises(ZeroDivisionError):
        dist.from_main(lambda: 1 / 0)
    dist.settle(None)
    err = ConfigError("mine")
    with pytest.raises(ConfigError) as got:
        dist.settle(err)
    assert got.value is err


def test_an_error_raised_inside_a_gin_configurable_reaches_the_other_ranks_as_its_own_class():
    """gin re-raises an error from inside a configurable as a proxy, a class made on the fly that pickle cannot
    find; what :func:`dist.from_main` and :func:`dist.settle` send is the class it stands for, with the first line
    (the one rank 0 prints), so the other ranks stop as for that user error, not with a RuntimeError's traceback."""
    import pickle

    from gin.utils import augment_exception_message_and_reraise

    from dlsm.errors import DiskFullError

    try:
        augment_exception_message_and_reraise(DiskFullError("no space left on device writing score.pt in w"),
                                              "\n  In call to configurable 'train' (<function train>)")
    except DiskFullError as err:
        proxy = err
    with pytest.raises(Exception):  # noqa: B017, PT011  (what the proxy raises varies: PicklingError, TypeError)
        pickle.dumps(proxy)
    sent = pickle.loads(pickle.dumps(dist._picklable(proxy)))
    assert type(sent) is DiskFullError and str(sent) == "no space left on device writing score.pt in w"
    other = pickle.loads(pickle.dumps(dist._picklable(ValueError(lambda: 0))))  # holds what pickle cannot take
    assert type(other) is RuntimeError and str(other).startswith("on rank 0: ValueError: <function ")


# --------------------------------------------------------------------------------------------
# end to end: torchrun -m dlsm.launch, interrupted and resumed
# --------------------------------------------------------------------------------------------

TINY = [
    "score/train.n_iters = 20", "score/train.batch_size = 32", "score/train.log_every = 10",
    "score/train.ckpt_every = 10", "classifier/train.n_iters = 400", "classifier/train.batch_size = 32",
    "classifier/train.log_every = 50", "classifier/train.ckpt_every = 5", "NUM_SCALES = 5", "STEPS_PER_SCALE = 1",
    "sample.n_per_class = 8", "two_moons.n = 300", "ScoreMLP.hidden = 16", "ClassifierMLP.hidden = 16",
    "score_error_metrics.n_points = 32", "score_error_metrics.grid_size = 5", "classifier_metrics.n_points = 64",
    "sample_metrics.reference_draws = 1", "sample_metrics.k = 3", "sample_metrics.n_projections = 16",
    "posterior_field_figure.grid = 5",
]


def _launch_cmd(cwd: Path, *, faulty: bool = False) -> list[str]:
    """torchrun of ``dlsm.launch`` on moons.gin with TINY; ``faulty``: through tests/faulty_launch.py, which adds the
    fault that the environment names (a full disk, a lost store) on one rank."""
    # faulty: torchrun looks at its workers once a second (not every 0.1 s), so that a rank that has returned from
    # dlsm.launch can record it before torchrun stops it because the other rank has already exited
    head = ("--monitor-interval", "1", str(ROOT / "tests" / "faulty_launch.py")) if faulty else ("-m", "dlsm.launch")
    cmd = _torchrun(*head, "--gin", str(ROOT / "gin" / "moons.gin"))
    for p in [*TINY, f"experiment.workdir = '{cwd / 'work'}'"]:
        cmd += ["--gin_param", p]
    return cmd


def test_torchrun_launch_tracks_once_and_resumes_after_ctrl_c(tmp_path):
    from mlflow.tracking import MlflowClient

    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.Popen(_launch_cmd(tmp_path), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not list((tmp_path / "work").rglob("classifier-ce.pt")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # to torchrun, which forwards it to both ranks
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert err.count("dlsm: interrupted; relaunch") == 1, err[-3000:]  # rank 0 alone prints
    (rundir,) = [p for p in (tmp_path / "work" / "moons").iterdir() if p.is_dir()]  # beside it: <hash>.lock
    # usually stopped inside stage2-ce (a fast machine may get further): a later stage resumes all the same
    assert 0 < torch.load(rundir / "classifier-ce.pt", weights_only=True)["step"] <= 400

    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    again = subprocess.run(_launch_cmd(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("dlsm: resuming run") == 1 and again.stdout.count("total/c0/precision") == 1

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("moons")
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent'")  # one parent
    assert parent.info.status == "FINISHED"
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    stages = sorted(k.data.tags["dlsm.stage"] for k in kids)
    assert stages == sorted(["stage1-score", "stage2-ce", "stage2-total", "sampling", "evaluation", "figures"])
    assert all(k.info.status == "FINISHED" for k in kids)
    by_stage = {k.data.tags["dlsm.stage"]: k.info.run_id for k in kids}
    assert [m.step for m in c.get_metric_history(by_stage["stage1-score"], "score/loss")] == [10, 20]  # not retrained
    ce = sorted(m.step for m in c.get_metric_history(by_stage["stage2-ce"], "ce/loss"))
    assert ce == list(range(50, 401, 50))  # resumed: no step logged twice, none missing
    assert math.isfinite(parent.data.metrics["total/c0/precision"])
    assert {p.name for p in rundir.iterdir() if p.suffix == ".pt"} == {"score.pt", "classifier-ce.pt",
                                                                        "classifier-total.pt"}
    assert not list(rundir.glob("*.tmp"))
    assert torch.load(rundir / "classifier-total.pt", weights_only=True)["step"] == 400


def test_torchrun_user_error_is_one_line_from_rank0_and_stops_every_rank(tmp_path):
    """Found on rank 0 (a run id MLflow does not know) and raised on every rank: printed once, nothing trains."""
    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cmd = _launch_cmd(tmp_path) + ["--gin_param", "experiment.stage1_run_id = 'nope'"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("dlsm: error:")]
    assert len(errors) == 1 and "no MLflow run 'nope'" in errors[0], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr and "SIGABRT" not in proc.stderr  # (torchrun's own report)
    assert not (tmp_path / "mlruns").exists() and not list((tmp_path / "work").rglob("*.pt"))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
