"""Classification Accuracy Score (Ravuri & Vinyals 2019, "Classification Accuracy Score for Conditional Generative
Models", Sec. 3): train a classifier only on a method's labelled samples, report its accuracy on the real test split.

    CAS = (1 / |test|) sum_{(x, y) in test} 1[argmax_k f_theta(x)_k = y],   theta trained on {(x_i^gen, y_i)} only

The same protocol on the real training set gives the ceiling (their "real data" row). The protocol is that of the
project's evaluator (:mod:`dlsm.eval.evaluator`), trained from scratch by :func:`~dlsm.eval.evaluator.train_evaluator`
with an :class:`~dlsm.eval.evaluator.EvaluatorSettings`:

- network: :class:`~dlsm.eval.evaluator.EvaluatorNet`, the CIFAR ResNet-(6 depth + 2) of He et al. 2016 with widths
  (w, 2w, 4w), BatchNorm; ``width``, ``depth`` (default 16, 1); or, with ``network = 'resnet50'`` (the official DLSM
  CAS, ``gin/eval_official.gin``), torchvision's ResNet-50 with a 7x7 stride-2 stem on the data's channels;
- steps: ``n_iters`` (default 200) of ``batch_size`` (default 64) images drawn uniformly with replacement, i.e. the
  same number of gradient steps whatever the number of samples;
- optimiser: Adam (betas 0.9, 0.999, no weight decay), ``lr`` (default 2e-3) decayed to 0 by a half cosine, or
  constant with ``lr_schedule = 'constant'``;
- augmentation: none by default; ``augment=True`` adds random mirroring and a random crop from the image padded by
  max(1, H // 8) pixels (He et al. 2016; for CIFAR, not for digits);
- seed: weights from ``torch.manual_seed(seed)``, batches and augmentation from ``make_generator(seed, device)``;
  on the CPU the score is a deterministic function of the samples, labels, test split and settings;
- accuracy: argmax of the logits in eval mode (BatchNorm running statistics) over the whole test split.

In the metric suite (``image_metrics`` in :mod:`dlsm.eval.images`) the settings are the evaluator's own: the
gin-bound ``EvaluatorSettings()`` read in the gin scope ``cas`` (so every ``EvaluatorSettings.*`` binding applies,
and ``cas/EvaluatorSettings.<field>`` overrides one for CAS alone), with the experiment's seed.

Samples are quantised to the 256 grey levels of the data, as saved images are (``test.decode``: round, clamp), and
read back in the test split's model space. Ravuri & Vinyals train a ResNet-50 on ImageNet-scale sample sets; the
small network and fixed step budget here are ours, chosen to make CAS cheap enough to report for every method.
"""

from __future__ import annotations

import torch

from dlsm.data.images import ImageData
from dlsm.errors import DataError
from dlsm.eval.evaluator import EvaluatorSettings, train_evaluator

__all__ = ["cas"]


def cas(
    images: torch.Tensor,
    labels: torch.Tensor,
    test: ImageData,
    settings: EvaluatorSettings,
    *,
    device: str | torch.device = "cpu",
) -> float:
    """Classification Accuracy Score of labelled images: accuracy on ``test`` of an evaluator network trained from
    scratch with ``settings`` on (``images``, ``labels``) alone, with the protocol of the module docstring.

    ``images`` (N, C, H, W) are uint8 pixels or floats in ``test``'s model space (quantised by ``test.decode``);
    ``labels`` (N,) integers in [0, test.num_classes), the class each sample was drawn for. The ceiling is
    ``cas(train.x_uint8, train.y, test, settings)`` with the real training split.
    """
    n = images.shape[0] if images.dim() == 4 else -1
    if n < 1 or tuple(images.shape[1:]) != test.shape:
        raise DataError(f"cas: images must be a non-empty (N, {', '.join(map(str, test.shape))}) batch like the test "
                        f"split {test.name}, got {tuple(images.shape)}")
    if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex():
        raise DataError(f"cas: labels must be {n} integers, one per image, got {labels.dtype} {tuple(labels.shape)}")
    u = images if images.dtype == torch.uint8 else test.decode(images)
    samples = ImageData(u.contiguous(), labels.to(u.device, torch.int64), test.num_classes, f"{test.name}-samples",
                        test.class_names, test.centered)
    _, acc = train_evaluator(samples, test, settings, device=device)
    return acc
