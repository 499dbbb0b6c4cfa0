"""What the report commands share: the MLflow client, markdown tables, the commit, the figure folder and the
written report, and the command's error handling."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from dlsm.errors import ConfigError, DlsmError, print_error

__all__ = ["client", "commit", "figure_folder", "machine", "run_report", "table", "write_report"]


def client():
    from mlflow.tracking import MlflowClient

    from dlsm.tracking import default_tracking_uri

    return MlflowClient(default_tracking_uri())


def commit() -> str:
    """The short commit of the checked-out project ('' outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent).stdout.strip()


def machine() -> str:
    """What a report was generated on: ``N CPU cores (arch), torch X, CUDA`` or ``… no GPU``."""
    import torch

    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
            f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}")


def figure_folder(out: Path) -> Path:
    """``<out's folder>/<out's stem>/``, emptied: where a report's figures go."""
    fig_dir = out.parent / out.stem
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    fig_dir.mkdir(parents=True)
    return fig_dir


def write_report(client, out: Path, lines: list[str], fig_dir: Path, sweep_id: str | None) -> Path:
    """Write the report; with a sweep run, log its figures and the report there too (the MLflow UI shows them
    beside the sweep's runs). Returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    if sweep_id:
        for png in sorted(fig_dir.glob("*.png")):
            client.log_artifact(sweep_id, str(png), "report")
        client.log_artifact(sweep_id, str(out), "report")
    return out


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
