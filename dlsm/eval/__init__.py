"""Evaluation. Point sets (moons): ``dlsm.eval.points``, the score errors against the Parzen oracle, classifier and
sample metrics as gin suites. Image samples, as the DLSM paper's Table 2 uses them (each a plain function of features
and labels):

- ``dlsm.eval.prdc``: precision / recall (Kynkaanniemi et al. 2019), density / coverage (Naeem et al. 2020), chunked
  on the device; ``classwise`` for the paper's "(CW)" rows;
- ``dlsm.eval.fid``: FID, KID, IS through torchmetrics, from features; Inception-v3 features from a local weights file;
- ``dlsm.eval.evaluator``: the project's own evaluator classifier (features, logits, sample accuracy), cached, trained
  with one ``EvaluatorSettings`` (its network, ``EvaluatorNet``, in ``dlsm.eval.evaluator_net``);
- ``dlsm.eval.cas``: the classification accuracy score (Ravuri & Vinyals 2019), with the evaluator's settings;
- ``dlsm.eval.images``: all of them as the gin-bound suite ``image_metrics`` (Table 2, Figure 4), feature networks
  ``evaluator_network`` / ``inception_network``, features streamed while sampling and cached for the real data.

``from dlsm.eval.prdc import prdc`` for the function (the module keeps the metric's name).
"""

from dlsm.eval.cas import cas
from dlsm.eval.evaluator import (
    EVALUATOR_VERSION,
    EvaluatorNet,
    EvaluatorSettings,
    evaluator_cache_key,
    evaluator_cache_path,
    features_and_logits,
    load_or_train_evaluator,
    sample_accuracy,
    train_evaluator,
)
from dlsm.eval.fid import (
    fid_from_features,
    inception_features,
    inception_score_from_logits,
    inception_score_from_probs,
    inception_weights_path,
    kid_from_features,
    load_inception,
)
from dlsm.eval.images import (
    FeatureNet,
    FeatureStream,
    evaluator_network,
    image_features,
    image_metrics,
    inception_network,
    table2_markdown,
)
from dlsm.eval.prdc import classwise

__all__ = [
    "EVALUATOR_VERSION",
    "EvaluatorNet",
    "EvaluatorSettings",
    "FeatureNet",
    "FeatureStream",
    "cas",
    "classwise",
    "evaluator_cache_key",
    "evaluator_cache_path",
    "evaluator_network",
    "features_and_logits",
    "fid_from_features",
    "image_features",
    "image_metrics",
    "inception_features",
    "inception_network",
    "inception_score_from_logits",
    "inception_score_from_probs",
    "inception_weights_path",
    "kid_from_features",
    "load_inception",
    "load_or_train_evaluator",
    "sample_accuracy",
    "table2_markdown",
    "train_evaluator",
]
