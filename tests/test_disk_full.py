"""A full disk (issue 22, item 5): a checkpoint or sample ``.npz`` write that fails with ENOSPC or EDQUOT keeps the
previous file byte-identical and readable, leaves no temporary file, and stops with one line naming the folder and
the space needed; relaunching the same command once space is freed resumes from the kept checkpoint.

The fault is injected at the lowest level the code uses: the temporary file object (:func:`dlsm.files._open`)
writes part of the bytes and then raises ``OSError(ENOSPC)``, as a full disk does; ``torch.save`` sees that
failure through its own C++ writer. ``os.fsync`` and ``os.replace`` failing are covered too.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from faulty_launch import FullDiskFile  # tests/, on sys.path

from dlsm import files, launch
from dlsm.data.points import LabelledData
from dlsm.errors import DiskFullError
from dlsm.math.schedules import NoiseSchedule, geometric_sigmas
from dlsm.stages.base import ExperimentSpec, Run, State
from dlsm.stages.sample import sample
from dlsm.tracking import NullTracker
from dlsm.train import loop
from dlsm.train.checkpoints import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FREE = 12_345_678  # what the patched shutil.disk_usage reports: "12.3 MB free now"
RESUME = "free space and relaunch the same command to resume"


def fill_disk(monkeypatch, room: int = 1000, err: int = errno.ENOSPC) -> list[bytes]:
    """Every temporary file from now on lives on a disk with ``room`` bytes free; returns the contents of each
    temporary file as it was closed (a partial file really was written before the failure)."""
    seen: list[bytes] = []
    real_open = files._open
    monkeypatch.setattr(files, "_open", lambda fd: FullDiskFile(real_open(fd), room, err, seen))
    return seen


def free_now(monkeypatch) -> list[str]:
    """shutil.disk_usage reports FREE bytes free; returns the folders it was asked about."""
    asked = []
    usage = shutil.disk_usage

    def fake(path):
        asked.append(str(path))
        return usage(path)._replace(free=FREE)

    monkeypatch.setattr(files.shutil, "disk_usage", fake)
    return asked


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def big_state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((400_000,), float(step))}}  # 1,601,641 bytes as a torch file


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_full_disk_keeps_the_previous_checkpoint_and_says_what_to_free(tmp_path, monkeypatch, where):
    ckpt = tmp_path / "score.pt"
    save_checkpoint(ckpt, big_state(1))
    before = ckpt.read_bytes()
    asked = free_now(monkeypatch)
    if where == "write":
        partial = fill_disk(monkeypatch, room=5000)
    else:
        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(files.os, where, full)

    with pytest.raises(DiskFullError) as info:
        save_checkpoint(ckpt, big_state(2))
    monkeypatch.undo()

    assert str(info.value) == (
        f"no space left on device writing score.pt in {tmp_path} (needs about 1.7 MB free, 12.3 MB free now); {RESUME}"
    )
    assert info.value.exit_code == 5 and asked == [str(tmp_path)]
    if where == "write":
        assert [len(p) for p in partial] == [5000] and partial[0] == torch_bytes(big_state(2))[:5000]
    assert ckpt.read_bytes() == before
    assert load_checkpoint(ckpt)["step"] == 1
    assert leftovers(tmp_path) == []


def torch_bytes(state: dict) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_a_full_quota_says_so_and_a_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    free_now(monkeypatch)
    fill_disk(monkeypatch, err=errno.EDQUOT)
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(tmp_path / "classifier-ce.pt", {"step": 5, "model": {"w": torch.zeros(3)}})
    assert str(info.value) == (
        f"disk quota exceeded writing classifier-ce.pt in {tmp_path} (needs about 0.1 MB free, 12.3 MB free now); "
        f"{RESUME}"
    )
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    ckpt = tmp_path / "score.pt"
    save_checkpoint(ckpt, big_state(1))
    before = ckpt.read_bytes()
    fill_disk(monkeypatch, err=errno.EIO)
    with pytest.raises(RuntimeError) as info:  # torch.save's own report of the failed write, unchanged
        save_checkpoint(ckpt, big_state(2))
    assert not isinstance(info.value, DiskFullError) and isinstance(info.value.__context__, OSError)
    assert info.value.__context__.errno == errno.EIO
    assert ckpt.read_bytes() == before and leftovers(tmp_path) == []


def test_a_fetched_checkpoint_is_never_left_truncated(tmp_path, monkeypatch):
    src = tmp_path / "fetched.pt"
    src.write_bytes(b"x" * 250_001)
    (tmp_path / "run").mkdir()
    free_now(monkeypatch)
    fill_disk(monkeypatch)
    with pytest.raises(DiskFullError, match=r"writing score.pt in .*/run \(needs about 0.3 MB free, 12.3 MB free"):
        files.copy_atomic(src, tmp_path / "run" / "score.pt")
    assert list((tmp_path / "run").iterdir()) == []


class Gaussian:
    def posterior_fn(self, c: int):
        return lambda x, sigma: -(x - c) / (1.0 + sigma[:, None] ** 2)


def _sample_stage(rundir: Path) -> None:
    """The ``sample`` stage in process (no MLflow): 200 samples of 2 classes of the method ``base``."""
    spec = ExperimentSpec(
        name="full", seed=3, dataset=None, score_model=None, classifiers={}, score_loss=None, classifier_losses={},
        alpha=1.0, sampling_methods=None, sampler=lambda score_fn, x, sigmas, *, generator: x, stages=(),
    )
    data = LabelledData(x=torch.zeros(2, 2), y=torch.arange(2), num_classes=2, name="toy")
    schedule = NoiseSchedule(sigmas=geometric_sigmas(5.0, 0.1, 3), eps=2e-3, n_steps_each=1)
    run = Run(spec=spec, tracker=NullTracker(), parent_id="", rundir=rundir, params={}, device=torch.device("cpu"))
    sample(run, State(data=data, schedule=schedule, extra_methods={"base": Gaussian()}), n_per_class=200)


def test_full_disk_while_saving_samples_keeps_the_previous_npz(tmp_path, monkeypatch):
    _sample_stage(tmp_path)
    npz = tmp_path / "samples-base.npz"
    before = npz.read_bytes()
    free_now(monkeypatch)
    partial = fill_disk(monkeypatch, room=600)
    with pytest.raises(DiskFullError) as info:
        _sample_stage(tmp_path)
    monkeypatch.undo()
    assert str(info.value).splitlines()[0] == (  # gin appends "In call to configurable 'sample'" on a second line
        f"no space left on device writing samples-base.npz in {tmp_path} (needs about 0.1 MB free, 12.3 MB free "
        f"now); {RESUME}"
    )
    # 600 bytes of the new zip file were on disk (its header's sizes are filled in later, so it differs from before)
    (written,) = partial
    assert len(written) == 600 and written.startswith(b"PK\x03\x04") and b"c0.npy" in written
    assert npz.read_bytes() == before and leftovers(tmp_path) == []
    with np.load(npz) as z:
        assert sorted(z.files) == ["c0", "c1"] and z["c0"].shape == (200, 2)


ARGV = ["--gin", str(ROOT / "gin" / "moons.gin"), "--gin", str(ROOT / "gin" / "smoke.gin"),
        "--gin_param", "experiment.stop_after = 'stage1'", "--gin_param", "figures.plots = []"]


def test_relaunch_after_a_full_disk_resumes_from_the_kept_checkpoint(tmp_path, monkeypatch, capsys):
    """Stage 1 (20 steps, a checkpoint every 10) runs out of space writing step 20: one line, exit 5, the step-10
    checkpoint kept; the same command, space freed, resumes the run and trains steps 11-20 only."""
    monkeypatch.chdir(tmp_path)
    free_now(monkeypatch)
    real_save, saved, kept = loop.save_checkpoint, [], []

    def save_on_a_filling_disk(path, state) -> None:
        saved.append(state["step"])
        if state["step"] != 20:
            return real_save(path, state)
        kept.append(Path(path).read_bytes())  # the disk fills up now
        with monkeypatch.context() as m:
            m.setattr(files, "_open", lambda fd: FullDiskFile(os.fdopen(fd, "wb"), room=2000))
            real_save(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", save_on_a_filling_disk)
    assert launch.main(ARGV) == 5
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    (ckpt,) = (tmp_path / ".dlsm").rglob("score.pt")
    folder = ckpt.parent.relative_to(tmp_path)  # experiment.workdir is '.dlsm', relative to the launch folder
    assert err == [f"dlsm: error: no space left on device writing score.pt in {folder} (needs about 0.2 MB free, "
                   f"12.3 MB free now); {RESUME}"]
    assert saved == [10, 20] and ckpt.read_bytes() == kept[0] and load_checkpoint(ckpt)["step"] == 10
    assert leftovers(ckpt.parent) == [] and 100_000 < len(kept[0]) <= 200_000  # "needs about 0.2 MB"

    saved.clear()
    monkeypatch.setattr(loop, "save_checkpoint", lambda path, state: (saved.append(state["step"]),
                                                                      real_save(path, state))[-1])
    assert launch.main(ARGV) == 0
    out = capsys.readouterr().out
    assert "dlsm: resuming run " in out and f" from {folder}" in out
    assert saved == [20]  # from the kept step 10: a restart from scratch would save at 10 again
    assert load_checkpoint(ckpt)["step"] == 20 and leftovers(ckpt.parent) == []


def test_a_full_disk_while_mlflow_copies_the_checkpoint_stops_in_one_line_and_the_relaunch_logs_it(
        tmp_path, monkeypatch, capsys):
    """Stage 1's checkpoint is written, then MLflow's copy of it into the run's artifact folder (sqlite store: a
    local folder) runs out of space. One line naming that folder and exit 5; MLflow leaves no partial file there, the
    checkpoint itself is kept, and stage 1's child run ends FAILED. The same command, space freed, resumes the run,
    trains nothing and logs the checkpoint."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    free_now(monkeypatch)
    real_write = LocalArtifactRepository._write_to_destination_path

    def write_on_a_full_disk(self, name, writer, *args, **kwargs):
        if os.path.basename(name) != "score.pt":
            return real_write(self, name, writer, *args, **kwargs)
        return real_write(self, name, lambda f: writer(FullDiskFile(f, room=5000)), *args, **kwargs)

    monkeypatch.setattr(LocalArtifactRepository, "_write_to_destination_path", write_on_a_full_disk)
    assert launch.main(ARGV) == 5
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (stage1,) = client.search_runs([client.get_experiment_by_name("moons").experiment_id],
                                   filter_string="tags.`dlsm.stage` = 'stage1-score'")
    folder = Path(stage1.info.artifact_uri.removeprefix("file://"))
    (ckpt,) = (tmp_path / ".dlsm").rglob("score.pt")
    size = ckpt.stat().st_size
    assert err == [f"dlsm: error: no space left on device copying score.pt into MLflow's artifact folder {folder} "
                   f"(needs about {-(-size // 100_000) / 10:.1f} MB free, 12.3 MB free now); {RESUME}"]
    assert stage1.info.status == "FAILED" and load_checkpoint(ckpt)["step"] == 20
    assert not [p for p in folder.rglob("*") if p.is_file()]  # nothing partial in the artifact folder

    monkeypatch.setattr(LocalArtifactRepository, "_write_to_destination_path", real_write)
    saved = []
    real_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda path, state: (saved.append(state["step"]),
                                                                      real_save(path, state))[-1])
    assert launch.main(ARGV) == 0
    assert "dlsm: resuming run " in capsys.readouterr().out and saved == []  # nothing trained again
    (stage1,) = client.search_runs([client.get_experiment_by_name("moons").experiment_id],
                                   filter_string="tags.`dlsm.stage` = 'stage1-score'")
    assert stage1.info.status == "FINISHED"
    assert (folder / "checkpoints" / "score.pt").read_bytes() == ckpt.read_bytes()
