"""What the report commands share: the MLflow client, markdown tables, and the command's error handling."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dlsm.errors import ConfigError, DlsmError, print_error

__all__ = ["client", "run_report", "table"]


def client():
    from mlflow.tracking import MlflowClient

    from dlsm.tracking import default_tracking_uri

    return MlflowClient(default_tracking_uri())


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def run_report(notes: Path | None, write: Callable[[], Path]) -> int:
    """The report commands' common part: no telemetry or progress bars, a missing ``--notes`` file or any
    DlsmError as one line (exit 2), else ``write()`` and the path it wrote."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        if notes is not None and not notes.is_file():
            raise ConfigError(f"--notes {notes}: no such file")
        path = write()
    except DlsmError as err:
        return print_error(err)
    print(f"dlsm: wrote {path}")
    return 0
