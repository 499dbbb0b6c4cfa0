"""The MLflow store: where it is, whether it can be used, and one creation at a time.

Default store: ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts under ``<cwd>/mlruns/artifacts``;
``MLFLOW_TRACKING_URI`` overrides it. :func:`check_tracking_uri` fails fast, in one line naming the URI, when the
store's folder cannot be created or written or an ``http(s)`` server does not answer one short probe, instead of
MLflow's own retries and tracebacks. :func:`creation_lock` serialises the first use of an sqlite store between
processes. :func:`is_lost_store` tells a store that stopped answering mid-run (after MLflow's own retries) from a
request it refused, and :func:`one_try` makes MLflow's HTTP client try once, briefly. Nothing here imports mlflow at
module level.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from dlsm.errors import TrackingError
from dlsm.locks import exclusive

__all__ = [
    "artifact_root", "check_tracking_uri", "creation_lock", "default_tracking_uri", "forget", "is_lost_store",
    "is_store_error", "lost_message", "one_try", "store_message",
]


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def artifact_root() -> str:
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


def store_message(uri: str, err: BaseException) -> str:
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


def forget(uri: str) -> None:
    """Check ``uri`` again next time (its first use failed)."""
    _checked.discard(uri)


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


def creation_lock(uri: str) -> contextlib.AbstractContextManager:
    """For an sqlite store, the lock ``<database>.lock``: MLflow creates the tables and migrates them on first use,
    and two processes doing it at once crash (alembic's 'Online migration expected to match one row', 'duplicate
    column name'). A server or database URL serialises this itself."""
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not uri.startswith("sqlite:///") or not path or path == ":memory:":
        return contextlib.nullcontext()
    return exclusive(f"{path}.lock", what=f"the MLflow store {path}", wait=True, say=lambda line: None)


def is_store_error(err: BaseException) -> bool:
    """An error of the tracking store itself (not of this code): MLflow's own, its SQL layer's or its schema
    migration's (alembic, e.g. a database written by a newer MLflow)."""
    from alembic.util.exc import CommandError  # alembic and sqlalchemy are installed with mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(err, (MlflowException, SQLAlchemyError, CommandError))


# MLflow's codes for a store that is down or overloaded (a server's HTTP 5xx answer, sqlite's OperationalError)
_LOST_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"})


def is_lost_store(err: BaseException) -> bool:
    """The store stopped answering, after MLflow's own retries: a refused or broken connection, a timeout, HTTP 5xx,
    a database that is locked or cannot be opened. Not a request the store answered with a refusal (a changed param
    value, a missing run): that stays an error of the code."""
    import requests
    from mlflow.exceptions import MlflowException, RestException
    from sqlalchemy.exc import OperationalError

    if isinstance(err, (requests.exceptions.RequestException, ConnectionError, TimeoutError, OperationalError)):
        return True
    if isinstance(err, RestException):  # the server's own answer
        return err.error_code in _LOST_CODES
    if not isinstance(err, MlflowException):
        return False
    text = str(err)  # MLflow's HTTP client wraps what its retries gave up on as "API request to URL failed with ..."
    if text.startswith("API request to ") and re.search(r"failed with (timeout )?exception|error code 5\d\d", text):
        return True
    return err.error_code == "TEMPORARILY_UNAVAILABLE"  # the SQL store's OperationalError


def lost_message(uri: str, err: BaseException) -> str:
    """``MLFLOW_TRACKING_URI=URL: Connection refused``: the store and why it stopped answering, in a few words."""
    text = str(err)
    m = re.search(r"Caused by \w+\('([^']+)'\)", text)  # urllib3's ResponseError('too many 503 error responses')
    if m:
        return f"{_label(uri)}: {m.group(1)}"
    if "timed out" in text or "timeout exception" in text:
        return f"{_label(uri)}: no answer within MLFLOW_HTTP_REQUEST_TIMEOUT"
    return store_message(uri, err)


_ONE_TRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@contextlib.contextmanager
def one_try() -> Iterator[None]:
    """MLflow's HTTP client tries each request once and waits 5 s at most (it reads these variables at every
    request): closing the runs of a store already lost takes seconds, not another round of retries."""
    saved = {k: os.environ.get(k) for k in _ONE_TRY}
    os.environ.update(_ONE_TRY)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
