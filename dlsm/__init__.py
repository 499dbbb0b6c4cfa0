"""dlsm: declarative, gin-configured conditional score-based generation (DLSM, Chao et al. ICLR 2022).

Where things are (one idea per module; docs/architecture.md has the full map):

- entry points: :mod:`dlsm.launch` (run an experiment), :mod:`dlsm.evaluate` (re-evaluate a run),
  ``python -m dlsm.report`` (reports), ``tune/*.py`` (sweeps, :mod:`dlsm.sweep.driver`);
- the boundary: :mod:`dlsm.config` (gin parsing and checks), :mod:`dlsm.errors` (one-line user errors),
  :mod:`dlsm.components` (registers every configurable), :mod:`dlsm.locks` (what two processes must not do at once);
- the pipeline: :mod:`dlsm.experiment` (an experiment = a gin-bound list of stages), :mod:`dlsm.stages`
  (score model, classifiers, sampling, evaluation, figures), :mod:`dlsm.tracking` (MLflow runs),
  :mod:`dlsm.store` (the MLflow store: where, whether usable, created once);
- the paper's mathematics: :mod:`dlsm.math` (schedules, losses, scores, samplers, Parzen oracle);
- components: :mod:`dlsm.data`, :mod:`dlsm.nets`, :mod:`dlsm.train`, :mod:`dlsm.eval`;
- around experiments: :mod:`dlsm.sweep` (Ray Tune), :mod:`dlsm.report` (reports, statistics, figures).
"""

import os as _os

__version__ = "0.1.0"

# The project sends no telemetry: switched off here, before any dlsm module can import mlflow.
_os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
_os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars before a one-line error
_os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no run links per run on a server
