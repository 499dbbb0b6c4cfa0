"""MLflow tracking: one parent run per launch, one child run per stage.

Default store: ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts under ``<cwd>/mlruns/artifacts``;
``MLFLOW_TRACKING_URI`` overrides it. Telemetry is switched off before mlflow is imported.
:func:`check_tracking_uri` (run by every :class:`Tracker`) fails fast, in one line naming the URI,
when the store's folder cannot be created or written or an ``http(s)`` server does not answer one
short probe, instead of MLflow's own retries and tracebacks.
Runs carry tags ``dlsm.config_hash`` (parent) and ``dlsm.stage`` (children) so a relaunch of the
same configuration finds its unfinished parent and resumes it, skipping stages already FINISHED.
Under torchrun only rank 0 holds a :class:`Tracker` (:func:`rank_tracker`); the other ranks hold a
:class:`NullTracker` that writes nothing.
"""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # the project sends no telemetry
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars before a one-line error

import contextlib  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from dlsm.errors import ConfigError, TrackingError  # noqa: E402
from dlsm.train import distributed as dist  # noqa: E402

__all__ = ["NullTracker", "Tracker", "check_tracking_uri", "default_tracking_uri", "rank_tracker"]

MAX_PARAM_LEN = 6000
logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines about creating the database
logging.getLogger("alembic").setLevel(logging.WARNING)


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def _artifact_root() -> str:
    return (Path.cwd() / "mlruns" / "artifacts").as_uri()


PROBE_TIMEOUT_S = 5.0  # one probe of an http(s) tracking server; MLflow's own client retries for minutes
_checked: set[str] = set()  # URIs that passed check_tracking_uri in this process


def _label(uri: str) -> str:
    """How a message names the store: the variable the user set, or the default and how to change it."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return f"MLFLOW_TRACKING_URI={uri}"
    return f"MLflow store {uri} (the default; set MLFLOW_TRACKING_URI to use another)"


def _reason(err: BaseException) -> str:
    """The OS's reason inside an exception chain ('Connection refused'), else its first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip().rstrip(".:")
    return (text.strip().splitlines() or [type(err).__name__])[0]


def _store_message(uri: str, err: BaseException) -> str:
    """One line for an error of the store's first use: MLflow's first sentence, or a hint for old file stores."""
    text = str(err)
    if "MLFLOW_ALLOW_FILE_STORE" in text:
        return (f"{_label(uri)}: MLflow no longer writes plain-folder stores; use an sqlite:/// URI, "
                "e.g. sqlite:///mlruns/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)")
    if "unsupported URI" in text:
        scheme = urllib.parse.urlparse(uri).scheme
        return (f"{_label(uri)}: MLflow cannot track to a {scheme}:// URI; use sqlite:///PATH.db, "
                "http(s)://HOST:PORT or a database URL")
    first = _reason(err)
    cut = first.find(". ")
    return f"{_label(uri)}: {first[: cut + 1] if 0 < cut < len(first) - 2 else first}"


def _check_writable_folder(uri: str, folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingError(f"{_label(uri)}: cannot create the folder {folder} for {what} ({_reason(err)})") from None
    try:  # os.access says yes to root even on read-only file systems: try it
        with tempfile.TemporaryFile(dir=folder, prefix=".dlsm-write-test-"):
            pass
    except OSError as err:
        raise TrackingError(f"{_label(uri)}: cannot write in {folder} ({_reason(err)})") from None


def _check_sqlite(uri: str) -> None:
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return
    db = Path(path)
    _check_writable_folder(uri, db.parent, "the database")
    if db.is_dir():
        raise TrackingError(f"{_label(uri)}: {db} is a folder, not an SQLite database file")
    if db.exists():
        try:
            with open(db, "rb") as f:
                head = f.read(16)
            with open(db, "ab"):
                pass
        except OSError as err:
            raise TrackingError(f"{_label(uri)}: cannot write {db} ({_reason(err)})") from None
        if head and head != b"SQLite format 3\x00":
            raise TrackingError(f"{_label(uri)}: {db} is not an SQLite database")


def _probe_http(uri: str) -> None:
    """One GET of the server's /health with a short timeout, through the proxies that MLflow's client
    would use (``HTTP(S)_PROXY``, ``NO_PROXY``); any HTTP answer below 500 means a server is there."""
    import requests
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_TIMEOUT,
        MLFLOW_TRACKING_INSECURE_TLS,
        MLFLOW_TRACKING_SERVER_CERT_PATH,
    )

    url = uri.rstrip("/") + "/health"
    # connecting must be quick; a user who set MLflow's request timeout gets it for the answer
    read_s = float(MLFLOW_HTTP_REQUEST_TIMEOUT.get()) if MLFLOW_HTTP_REQUEST_TIMEOUT.defined else PROBE_TIMEOUT_S
    verify: bool | str = True
    if MLFLOW_TRACKING_INSECURE_TLS.get():
        verify = False
    elif MLFLOW_TRACKING_SERVER_CERT_PATH.get():
        verify = MLFLOW_TRACKING_SERVER_CERT_PATH.get()
    try:
        with requests.Session() as session:  # trust_env: the same proxy settings as MLflow's requests
            resp = session.get(url, timeout=(PROBE_TIMEOUT_S, read_s), verify=verify, allow_redirects=True)
    except requests.exceptions.ProxyError as err:
        proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url)) or "the proxy"
        raise TrackingError(f"{_label(uri)}: cannot reach the server through the proxy {proxy} ({_reason(err)}); "
                            "check HTTP(S)_PROXY and NO_PROXY") from None
    except requests.exceptions.SSLError as err:
        raise TrackingError(f"{_label(uri)}: TLS error ({_reason(err)}); see MLFLOW_TRACKING_SERVER_CERT_PATH or "
                            "MLFLOW_TRACKING_INSECURE_TLS") from None
    except requests.exceptions.Timeout:
        raise TrackingError(f"{_label(uri)}: the MLflow server did not answer within "
                            f"{max(PROBE_TIMEOUT_S, read_s):g} s; is it running and reachable?") from None
    except requests.exceptions.RequestException as err:
        raise TrackingError(f"{_label(uri)}: cannot reach the MLflow server ({_reason(err)}); start it "
                            "(mlflow server) or unset MLFLOW_TRACKING_URI to track in ./mlruns") from None
    if resp.status_code >= 500:
        raise TrackingError(f"{_label(uri)}: the MLflow server answered HTTP {resp.status_code} {resp.reason}")


def check_tracking_uri(uri: str | None = None) -> str:
    """Fail fast, in one line naming the URI, if the tracking store cannot be used: the folder of an
    ``sqlite:`` database cannot be created or written, the file is not a database, or an ``http(s)``
    server does not answer one short probe. Returns the URI (default :func:`default_tracking_uri`)."""
    uri = uri or default_tracking_uri()
    if uri in _checked:
        return uri
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("http", "https"):
        _probe_http(uri)
    _checked.add(uri)
    return uri


def _is_store_error(err: BaseException) -> bool:
    """An error of the tracking store itself (not of this code): MLflow's own, or its SQL layer's."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError  # installed with mlflow

    return isinstance(err, (MlflowException, SQLAlchemyError))


class Tracker:
    """Thin wrapper over the fluent MLflow API holding the experiment and the parent run."""

    def __init__(
        self, experiment_name: str, *, on_metrics: Callable[[str, dict[str, float], int], None] | None = None
    ) -> None:
        self.on_metrics = on_metrics
        uri = check_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:  # the first contact with the store: a wrong scheme, a refused login, a broken database
            self.client = MlflowClient(uri)
            exp = self.client.get_experiment_by_name(experiment_name)
            if exp is None:
                artifact_location = _artifact_root() if uri.startswith("sqlite:") else None
                exp_id = self.client.create_experiment(experiment_name, artifact_location=artifact_location)
            else:
                exp_id = exp.experiment_id
        except Exception as err:
            if not _is_store_error(err):
                raise
            _checked.discard(uri)
            raise TrackingError(_store_message(uri, err)) from None
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

    def log_text_to(self, run_id: str, text: str, artifact_file: str) -> None:
        """A text artifact in another run than the active one (e.g. a table beside the samples it scores)."""
        self.client.log_text(run_id, text, artifact_file)

    def stage_run_id(self, parent_id: str, stage: str) -> str | None:
        """The run id of the latest ``stage`` child of ``parent_id``, or None."""
        run = self.child(parent_id, stage)
        return run.info.run_id if run is not None else None

    def log_figure(self, fig, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        mlflow.log_figure(fig, artifact_file)
        plt.close(fig)

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image or uint8 array as a PNG artifact (sample grids)."""
        mlflow.log_image(image, artifact_file=artifact_file)

    def check_source_run(self, run_id: str, key: str) -> None:
        """Fail now (not after training the stages before it) if ``key`` names no run of this store."""
        try:
            self.client.get_run(run_id)
        except Exception as err:
            if not _is_store_error(err):
                raise
            raise ConfigError(f"{key}: no MLflow run {run_id!r} in {default_tracking_uri()}") from None

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
