"""dlsm: declarative, gin-configured conditional score-based generation (DLSM, Chao et al. ICLR 2022).

Where things are (one idea per module; docs/architecture.md has the full map):

- entry points: :mod:`dlsm.launch` (run an experiment), :mod:`dlsm.evaluate` (re-evaluate a run),
  ``python -m dlsm.report`` (reports), ``tune/*.py`` (sweeps, :mod:`dlsm.sweep.driver`);
- the boundary: :mod:`dlsm.config` (gin parsing and checks), :mod:`dlsm.errors` (one-line user errors),
  :mod:`dlsm.components` (registers every configurable);
- the pipeline: :mod:`dlsm.experiment` (an experiment = a gin-bound list of stages), :mod:`dlsm.stages`
  (score model, classifiers, sampling, evaluation, figures), :mod:`dlsm.tracking` (MLflow);
- the paper's mathematics: :mod:`dlsm.math` (schedules, losses, scores, samplers, Parzen oracle);
- components: :mod:`dlsm.data`, :mod:`dlsm.nets`, :mod:`dlsm.train`, :mod:`dlsm.eval`;
- around experiments: :mod:`dlsm.sweep` (Ray Tune), :mod:`dlsm.report` (reports, statistics, figures).
"""

__version__ = "0.1.0"
