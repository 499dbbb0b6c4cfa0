"""Classification Accuracy Score (Ravuri & Vinyals 2019, "Classification Accuracy Score for Conditional Generative
Models", Sec. 3): train a classifier only on a method's labelled samples, report its accuracy on the real test split.

    CAS = (1 / |test|) sum_{(x, y) in test} 1[argmax_k f_theta(x)_k = y],   theta trained on {(x_i^gen, y_i)} only

The same protocol on the real training set gives the ceiling (their "real data" row). The protocol is fixed and is
that of the project's evaluator (:mod:`dlsm.eval.evaluator`), trained from scratch by
:func:`~dlsm.eval.evaluator.train_evaluator`:

- network: :class:`~dlsm.eval.evaluator.EvaluatorNet`, the CIFAR ResNet-(6 depth + 2) of He et al. 2016 with widths
  (w, 2w, 4w), BatchNorm; default ``width=16, depth=1``;
- steps: ``n_iters`` (default 200) of ``batch_size`` (default 64) images drawn uniformly with replacement, i.e. the
  same number of gradient steps whatever the number of samples;
- optimiser: Adam (betas 0.9, 0.999, no weight decay), ``lr`` (default 2e-3) decayed to 0 by a half cosine;
- augmentation: none by default; ``augment=True`` adds random mirroring and a random crop from the image padded by
  max(1, H // 8) pixels (He et al. 2016; for CIFAR, not for digits);
- seed: weights from ``torch.manual_seed(seed)``, batches and augmentation from ``make_generator(seed, device)``;
  on the CPU the score is a deterministic function of the samples, labels, test split and settings;
- accuracy: argmax of the logits in eval mode (BatchNorm running statistics) over the whole test split.

Samples are quantised to the 256 grey levels of the data, as saved images are (``test.decode``: round, clamp), and
read back in the test split's model space. Ravuri & Vinyals train a ResNet-50 on ImageNet-scale sample sets; the
small network and fixed step budget here are ours, chosen to make CAS cheap enough to report for every method.
"""

from __future__ import annotations

import torch

from dlsm.data.images import ImageData
from dlsm.errors import DataError
from dlsm.eval.evaluator import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEPTH,
    DEFAULT_LR,
    DEFAULT_N_ITERS,
    DEFAULT_WIDTH,
    train_evaluator,
)

__all__ = ["cas"]


def cas(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test: ImageData,
    *,
    seed: int = 0,
    n_iters: int = DEFAULT_N_ITERS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    augment: bool = False,
    width: int = DEFAULT_WIDTH,
    depth: int = DEFAULT_DEPTH,
    device: str | torch.device = "cpu",
) -> float:
    """Classification Accuracy Score of labelled images: accuracy on ``test`` of an evaluator network trained from
    scratch on (``train_images``, ``train_labels``) alone, with the protocol of the module docstring.

    ``train_images`` (N, C, H, W) are uint8 pixels or floats in ``test``'s model space (quantised by
    ``test.decode``); ``train_labels`` (N,) integers in [0, test.num_classes), the class each sample was drawn for.
    The ceiling is ``cas(train.x_uint8, train.y, test, ...)`` with the real training split.
    """
    n = train_images.shape[0] if train_images.dim() == 4 else -1
    if n < 1 or tuple(train_images.shape[1:]) != test.shape:
        raise DataError(f"cas: images must be a non-empty (N, {', '.join(map(str, test.shape))}) batch like the test "
                        f"split {test.name}, got {tuple(train_images.shape)}")
    if train_labels.shape != (n,) or train_labels.is_floating_point() or train_labels.is_complex():
        raise DataError(f"cas: labels must be {n} integers, one per image, got {train_labels.dtype} "
                        f"{tuple(train_labels.shape)}")
    u = train_images if train_images.dtype == torch.uint8 else test.decode(train_images)
    samples = ImageData(u.contiguous(), train_labels.to(u.device, torch.int64), test.num_classes,
                        f"{test.name}-samples", test.class_names, test.centered)
    _, acc = train_evaluator(samples, test, seed=seed, n_iters=n_iters, batch_size=batch_size, lr=lr,
                             augment=augment, width=width, depth=depth, device=device)
    return acc
