"""The stages of an experiment, in the paper's order; ``experiment.stages`` lists the ones to run.

    train_score_model -> train_classifiers -> sample -> evaluate -> figures

plus :func:`calibrate_temperature` (each classifier's temperature per sigma, for the temperature guidance;
between ``train_classifiers`` and ``sample``), moons-only stages: :func:`posterior_sm` (method (c)) and
:func:`parzen_oracle` (method (e)), and
:func:`exact_likelihood` (the prior model with the oracle's exact likelihood: a perfect classifier) for small data.
Each is ``stage(run, state) -> state`` (:mod:`dlsm.experiment`); gin binds their settings
(``train_classifiers.seeds``, ``sample.n_per_class``, ``evaluate.suites``, ``figures.plots``).
"""

from dlsm.stages.calibrate import calibrate_temperature
from dlsm.stages.classifier import train_classifiers
from dlsm.stages.evaluate import evaluate, figures
from dlsm.stages.sample import exact_likelihood, parzen_oracle, sample, sample_grid_snapshot
from dlsm.stages.score import posterior_sm, train_score_model

__all__ = [
    "DEFAULT_STAGES", "calibrate_temperature", "evaluate", "exact_likelihood", "figures", "parzen_oracle",
    "posterior_sm", "sample", "sample_grid_snapshot", "train_classifiers", "train_score_model",
]

DEFAULT_STAGES = (train_score_model, train_classifiers, sample, evaluate, figures)
