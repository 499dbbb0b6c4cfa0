"""MLflow tracking: one parent run per launch, one child run per stage.

Default store: ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts under ``<cwd>/mlruns/artifacts``;
``MLFLOW_TRACKING_URI`` overrides it. Telemetry is switched off before mlflow is imported.
Runs carry tags ``dlsm.config_hash`` (parent) and ``dlsm.stage`` (children) so a relaunch of the
same configuration finds its unfinished parent and resumes it, skipping stages already FINISHED.
"""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # the project sends no telemetry
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import contextlib  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from dlsm.errors import ConfigError  # noqa: E402

__all__ = ["Tracker", "default_tracking_uri"]

MAX_PARAM_LEN = 6000
logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines about creating the database
logging.getLogger("alembic").setLevel(logging.WARNING)


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def _artifact_root() -> str:
    return (Path.cwd() / "mlruns" / "artifacts").as_uri()


class Tracker:
    """Thin wrapper over the fluent MLflow API holding the experiment and the parent run."""

    def __init__(
        self, experiment_name: str, *, on_metrics: Callable[[str, dict[str, float], int], None] | None = None
    ) -> None:
        self.on_metrics = on_metrics
        uri = default_tracking_uri()
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is None:
            artifact_location = _artifact_root() if uri.startswith("sqlite:") else None
            exp_id = self.client.create_experiment(experiment_name, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        mlflow.set_experiment(experiment_id=exp_id)

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
        with mlflow.start_run(run_id=resume_id, run_name=None if resume_id else run_name, tags=tags) as run:
            yield run.info.run_id

    @contextlib.contextmanager
    def stage(self, parent_id: str, stage: str) -> Iterator[tuple[str, bool]]:
        """Start or resume the child run of ``stage``; yields (run_id, already_finished)."""
        prev = self.child(parent_id, stage)
        finished = prev is not None and prev.info.status == "FINISHED"
        run_id = prev.info.run_id if prev is not None else None
        with mlflow.start_run(
            run_id=run_id, run_name=None if run_id else stage, nested=True, tags={"dlsm.stage": stage}
        ) as run:
            yield run.info.run_id, finished

    # -- logging ------------------------------------------------------------------------------
    def log_params(self, params: dict[str, object]) -> None:
        run_id = mlflow.active_run().info.run_id
        have = self.client.get_run(run_id).data.params
        items = [
            Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in have
        ]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        run_id = mlflow.active_run().info.run_id
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])
        if self.on_metrics is not None:
            self.on_metrics(mlflow.active_run().data.tags.get("dlsm.stage", ""), metrics, step or 0)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_figure(self, fig, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        mlflow.log_figure(fig, artifact_file)
        plt.close(fig)

    def download_checkpoint(
        self, run_id: str, stage: str, name: str = "score.pt", *, key: str, require_finished: bool = True
    ) -> Path:
        """``checkpoints/<name>`` of the ``stage`` child run ``run_id``, or of that stage's child of a parent run.

        ``key`` names what the user set (for the one-line error)."""
        try:
            run = self.client.get_run(run_id)
        except Exception:
            uri = default_tracking_uri()
            raise ConfigError(f"{key}: no MLflow run {run_id!r} in {uri}") from None
        if run.data.tags.get("dlsm.stage") != stage:
            child = self.child(run_id, stage)
            if child is None:
                raise ConfigError(f"{key}: run {run_id} has no {stage} child run")
            run = child
        if require_finished and run.info.status != "FINISHED":
            raise ConfigError(f"{key}: run {run.info.run_id} did not finish")
        dst = Path(tempfile.mkdtemp(prefix="dlsm-ckpt-"))
        artifact = f"checkpoints/{name}"
        try:
            return Path(
                mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifact, dst_path=str(dst))
            )
        except Exception:
            raise ConfigError(f"{key}: run {run.info.run_id} has no artifact {artifact}") from None
