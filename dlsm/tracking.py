"""MLflow tracking: one parent run per launch, one child run per stage.

Where the store is and whether it can be used: :mod:`dlsm.store` (every :class:`Tracker` checks it first and
creates an sqlite store under a lock). Telemetry is switched off in ``dlsm/__init__.py``, before mlflow loads.
Runs carry tags ``dlsm.config_hash`` (parent) and ``dlsm.stage`` (children) so a relaunch of the
same configuration finds its unfinished parent and resumes it, skipping stages already FINISHED.
Under torchrun only rank 0 holds a :class:`Tracker` (:func:`rank_tracker`); the other ranks hold a
:class:`NullTracker` that writes nothing.

A store that stops answering mid-run (an ``mlflow server`` restarted, a network cut) is first MLflow's business: its
HTTP client retries every request (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, 7 by default with a backoff factor of 2:
about four minutes), and training waits at its next log call. If the retries give up, tracking is *lost*: one
warning line, later writes are skipped (and counted), training goes on writing its checkpoints, and the stage (or
the run, outside a stage) ends with a one-line :class:`~dlsm.errors.TrackingError`: relaunching the same command
resumes the run from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from dlsm.errors import ConfigError, TrackingError
from dlsm.files import disk_full_cause, full_disk_error
from dlsm.store import (
    artifact_root,
    check_tracking_uri,
    creation_lock,
    default_tracking_uri,
    forget,
    is_lost_store,
    is_store_error,
    lost_message,
    one_try,
    store_message,
)
from dlsm.train import distributed as dist

__all__ = ["NullTracker", "Tracker", "check_tracking_uri", "default_tracking_uri", "rank_tracker"]

MAX_PARAM_LEN = 6000
T = TypeVar("T")
logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines about creating the database
logging.getLogger("alembic").setLevel(logging.WARNING)


class Tracker:
    """Thin wrapper over the fluent MLflow API holding the experiment and the parent run."""

    def __init__(
        self, experiment_name: str, *, on_metrics: Callable[[str, dict[str, float], int], None] | None = None
    ) -> None:
        self.on_metrics = on_metrics
        uri = check_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:  # the first contact with the store: a wrong scheme, a refused login, a broken database
            with creation_lock(uri):  # two launches on a fresh store: one creates it (and the experiment) at a time
                self.client = MlflowClient(uri)
                exp = self.client.get_experiment_by_name(experiment_name)
                if exp is None:
                    artifact_location = artifact_root() if uri.startswith("sqlite:") else None
                    exp_id = self.client.create_experiment(experiment_name, artifact_location=artifact_location)
                else:
                    exp_id = exp.experiment_id
        except Exception as err:
            if not is_store_error(err):
                raise
            forget(uri)
            raise TrackingError(store_message(uri, err)) from None
        self.experiment_id = exp_id
        mlflow.set_experiment(experiment_id=exp_id)
        self.uri = uri
        self.lost: str | None = None  # why the store stopped answering (one line), once it has
        self.dropped: Counter[str] = Counter()  # what was not recorded since: "metric values", "params", "artifacts"
        self._where = ""  # the stage being tracked ("" between stages), for the messages

    # -- a store that stops answering ---------------------------------------------------------
    def _lose(self, err: BaseException, *, warn: bool = True) -> None:
        """Tracking is lost: remember why, and say so once (training goes on)."""
        if self.lost is not None:
            return
        self.lost = lost_message(self.uri, err)
        if warn:
            stop = f"when {self._where} ends" if self._where else "before its next stage"
            print(f"dlsm: warning: {self.lost}; MLflow's retries gave up, so tracking is lost: training goes on and "
                  f"writes its checkpoints, nothing more is logged, and the run stops {stop}",
                  file=sys.stderr, flush=True)

    def lost_error(self) -> TrackingError:
        """The one line that ends a run whose tracking was lost."""
        dropped = ", ".join(f"{n} {what}" for what, n in self.dropped.items() if n)
        return TrackingError(f"{self.lost}; tracking was lost during {self._where or 'the run'}"
                             f"{f' ({dropped} not recorded)' if dropped else ''}; the checkpoints on disk are kept: "
                             "relaunch the same command to resume")

    def _record(self, what: str, n: int, write: Callable[[], object]) -> None:
        """``write()`` to the store; once the store is lost, it and every later write are skipped and counted."""
        if self.lost is None:
            try:
                write()
                return
            except Exception as err:
                if not is_lost_store(err):
                    raise
                self._lose(err)
        if n:
            self.dropped[what] += n

    def _read(self, read: Callable[[], T]) -> T:
        """``read()`` from the store, which the run cannot go on without: a lost store is a TrackingError now."""
        if self.lost is None:
            try:
                return read()
            except Exception as err:
                if not is_lost_store(err):
                    raise
                self._lose(err, warn=False)
        raise self.lost_error() from None

    @contextlib.contextmanager
    def _run(self, **kwargs: object) -> Iterator[mlflow.ActiveRun]:
        """``mlflow.start_run(**kwargs)``, ended FINISHED, or FAILED on an error; with the store lost it ends without
        MLflow's retries, and a run whose own work went on without tracking ends with :meth:`lost_error`."""
        run = self._read(lambda: mlflow.start_run(**kwargs))
        try:
            yield run
        except BaseException:
            self._end("FAILED")
            raise
        self._end("FINISHED")
        if self.lost is not None:
            raise self.lost_error()

    def _end(self, status: str) -> None:
        if self.lost is not None:  # MLflow takes the run off its stack before it calls the store
            with one_try(), contextlib.suppress(Exception):
                mlflow.end_run("FAILED")
            return
        try:
            mlflow.end_run(status)
        except Exception as err:
            if not is_lost_store(err):
                raise
            self._lose(err, warn=False)

    # -- finding runs -------------------------------------------------------------------------
    def unfinished_parent(self, config_hash: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`dlsm.config_hash` = '{config_hash}' and tags.`dlsm.kind` = 'parent'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs and runs[0].info.status != "FINISHED":
            return runs[0].info.run_id
        return None

    def child(self, parent_id: str, stage: str):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`dlsm.stage` = '{stage}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    # -- runs ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def parent(
        self, run_name: str, config_hash: str, resume_id: str | None, *, nest_under: str | None = None,
        kind: str = "parent",
    ) -> Iterator[str]:
        """Start or resume a top-level run; ``nest_under`` makes it a child of another run (a sweep)."""
        tags = {"dlsm.kind": kind, "dlsm.config_hash": config_hash}
        if nest_under:
            tags["mlflow.parentRunId"] = nest_under
        with self._run(run_id=resume_id, run_name=None if resume_id else run_name, tags=tags) as run:
            yield run.info.run_id

    @contextlib.contextmanager
    def stage(self, parent_id: str, stage: str) -> Iterator[tuple[str, bool]]:
        """Start or resume the child run of ``stage``; yields (run_id, already_finished). Tracking lost before the
        stage: a TrackingError now; during it: at its end, after its own work (training, checkpoints)."""
        prev = self._read(lambda: self.child(parent_id, stage))
        finished = prev is not None and prev.info.status == "FINISHED"
        run_id = prev.info.run_id if prev is not None else None
        outer, self._where = self._where, stage
        try:
            with self._run(
                run_id=run_id, run_name=None if run_id else stage, nested=True, tags={"dlsm.stage": stage}
            ) as run:
                yield run.info.run_id, finished
        finally:
            self._where = outer

    # -- logging ------------------------------------------------------------------------------
    # (writes: a store lost after MLflow's retries skips them, counted, and the stage goes on; see _record)
    def log_params(self, params: dict[str, object]) -> None:
        run_id = mlflow.active_run().info.run_id

        def write() -> None:
            have = self.client.get_run(run_id).data.params
            items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in have]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i : i + 100])

        self._record("params", len(params), write)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        run_id = mlflow.active_run().info.run_id
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]

        def write() -> None:
            for i in range(0, len(items), 1000):
                self.client.log_batch(run_id, metrics=items[i : i + 1000])

        self._record("metric values", len(items), write)
        if self.on_metrics is not None:
            self.on_metrics(mlflow.active_run().data.tags.get("dlsm.stage", ""), metrics, step or 0)

    def _artifact(self, name: str, write: Callable[[], object], size: int | None = None, run_id: str = "") -> None:
        """An artifact written to the store. A full disk while MLflow copies it (into a temporary file that it then
        renames: nothing partial is left) is a one-line DiskFullError; the stage stops FAILED, a relaunch redoes it."""

        def guarded() -> None:
            try:
                write()
            except Exception as err:
                cause = disk_full_cause(err)
                if cause is None:
                    raise
                uri = self.client.get_run(run_id).info.artifact_uri if run_id else mlflow.get_artifact_uri()
                folder = urllib.parse.unquote(urllib.parse.urlparse(uri).path) if uri.startswith("file:") else uri
                if "://" in folder:  # a remote store: what filled up is the local folder MLflow stages files in
                    folder = tempfile.gettempdir()
                raise full_disk_error(cause, f"copying {name} into MLflow's artifact folder", folder, size) from None

        self._record("artifacts", 1, guarded)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._artifact(Path(path).name, lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path),
                       Path(path).stat().st_size)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._artifact(artifact_file, lambda: mlflow.log_text(text, artifact_file), len(text.encode()))

    def log_text_to(self, run_id: str, text: str, artifact_file: str) -> None:
        """A text artifact in another run than the active one (e.g. a table beside the samples it scores)."""
        self._artifact(artifact_file, lambda: self.client.log_text(run_id, text, artifact_file), len(text.encode()),
                       run_id)

    def _read_if_kept(self, read: Callable[[], T]) -> T | None:
        """``read()`` from the store for something the run can do without (what it is read for is skipped, as every
        write is): None once the store is lost."""
        if self.lost is None:
            try:
                return read()
            except Exception as err:
                if not is_lost_store(err):
                    raise
                self._lose(err)
        return None

    def stage_run_id(self, parent_id: str, stage: str) -> str | None:
        """The run id of the latest ``stage`` child of ``parent_id``, or None (also once tracking is lost: what
        would go to that run is skipped then anyway)."""
        run = self._read_if_kept(lambda: self.child(parent_id, stage))
        return run.info.run_id if run is not None else None

    def metric_histories(self, run_id: str, prefix: str) -> dict[str, list[tuple[int, float]]] | None:
        """Every metric history of ``run_id`` whose key starts with ``prefix``, as sorted (step, value) lists; None
        once tracking is lost (the figure they are read for is skipped then, as every write is)."""
        def read() -> dict[str, list[tuple[int, float]]]:
            keys = [k for k in self.client.get_run(run_id).data.metrics if k.startswith(prefix)]
            return {k: sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, k)) for k in keys}

        return self._read_if_kept(read)

    def log_figure(self, fig, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self._artifact(artifact_file, lambda: mlflow.log_figure(fig, artifact_file))
        finally:
            plt.close(fig)

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image or uint8 array as a PNG artifact (sample grids)."""
        self._artifact(artifact_file, lambda: mlflow.log_image(image, artifact_file=artifact_file))

    def check_source_run(self, run_id: str, key: str) -> None:
        """Fail now (not after training the stages before it) if ``key`` names no run of this store."""
        try:
            self.client.get_run(run_id)
        except Exception as err:
            if is_lost_store(err):
                raise TrackingError(f"{lost_message(self.uri, err)}; cannot look up {key}") from None
            if not is_store_error(err):
                raise
            raise ConfigError(f"{key}: no MLflow run {run_id!r} in {default_tracking_uri()}") from None

    def download_checkpoint(
        self, run_id: str, stage: str, name: str = "score.pt", *, key: str, dst: Path, require_finished: bool = True,
    ) -> Path:
        """``checkpoints/<name>`` of the ``stage`` child run ``run_id``, or of that stage's child of a parent run,
        downloaded under ``dst`` (the caller's temporary folder, which the caller removes).

        ``key`` names what the user set (for the one-line error)."""
        try:
            run = self.client.get_run(run_id)
        except Exception as err:
            if is_lost_store(err):
                raise TrackingError(f"{lost_message(self.uri, err)}; cannot look up {key}") from None
            uri = default_tracking_uri()
            raise ConfigError(f"{key}: no MLflow run {run_id!r} in {uri}") from None
        if run.data.tags.get("dlsm.stage") != stage:
            child = self.child(run_id, stage)
            if child is None:
                raise ConfigError(f"{key}: run {run_id} has no {stage} child run")
            run = child
        if require_finished and run.info.status != "FINISHED":
            raise ConfigError(f"{key}: run {run.info.run_id} did not finish")
        artifact = f"checkpoints/{name}"
        try:
            return Path(
                mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifact, dst_path=str(dst))
            )
        except Exception:
            raise ConfigError(f"{key}: run {run.info.run_id} has no artifact {artifact}") from None


class NullTracker:
    """What ranks other than 0 hold under torchrun: the :class:`Tracker` calls of the training stages, writing
    nothing. ``parent`` yields None and ``stage`` (None, False): code that runs on every rank replaces them with
    rank 0's answers through :func:`dlsm.train.distributed.share` (a collective, so not inside :class:`Tracker`, whose
    stages also run on rank 0 alone), and searches and downloads on rank 0 through
    :func:`dlsm.train.distributed.from_main`.
    """

    client = None
    experiment_id = None
    on_metrics = None

    @contextlib.contextmanager
    def parent(self, *args: object, **kwargs: object) -> Iterator[str | None]:  # noqa: ARG002
        yield None

    @contextlib.contextmanager
    def stage(self, parent_id: str, stage: str) -> Iterator[tuple[str | None, bool]]:  # noqa: ARG002
        yield None, False

    def log_params(self, params: dict[str, object]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_text_to(self, run_id: str, text: str, artifact_file: str) -> None:
        pass

    def stage_run_id(self, parent_id: str, stage: str) -> str | None:  # noqa: ARG002
        return None

    def log_figure(self, fig, artifact_file: str) -> None:  # noqa: ARG002
        import matplotlib.pyplot as plt

        plt.close(fig)

    def log_image(self, image, artifact_file: str) -> None:
        pass


def rank_tracker(
    experiment_name: str, *, on_metrics: Callable[[str, dict[str, float], int], None] | None = None
) -> Tracker | NullTracker:
    """A :class:`Tracker` on rank 0 (one process: always), a :class:`NullTracker` on the other ranks; a store
    that cannot be used (TrackingError on rank 0) is raised on every rank."""
    made: list[Tracker] = []
    dist.from_main(lambda: made.append(Tracker(experiment_name, on_metrics=on_metrics)))
    return made[0] if made else NullTracker()
