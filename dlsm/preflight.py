"""What can be checked before training: settings that would otherwise fail late, after hours of training.

:func:`check_before_training` runs once the data are loaded and before any MLflow run or checkpoint exists
(:func:`dlsm.experiment.run_experiment`); every problem is a one-line :class:`~dlsm.errors.ConfigError`:

- the networks: :func:`check_networks` builds each one once on the CPU in its gin scope, so impossible widths,
  depths or channel counts (``ScoreMLP.hidden = 0``, checked by the constructors) and image sizes fail now, and
  checks ``train.batch_size`` against the data;
- the evaluation, when ``experiment.stages`` lists ``evaluate`` (and no ``experiment.stop_after`` ends the run
  before it): each k-NN suite of ``evaluate.suites`` (``sample_metrics``, ``image_metrics``) needs k + 1 points of
  every class in each set it compares -- the training data, the samples (``sample.n_per_class``) and, for
  ``image_metrics``' ``real`` row, the test split; ``k``, ``sample_metrics.n_projections`` and
  ``image_metrics.kid_subset_size`` must be usable; and the evaluator network and CAS (``EvaluatorSettings``,
  also read in the gin scope ``cas``) must fit the images;
- the official checkpoint files (:func:`check_published`): each file bound to ``train_score_model.checkpoint`` or
  ``train_classifiers.checkpoints`` is set, exists, and imports strictly into the network the experiment declares.

:func:`check_workdir` (``experiment.workdir`` can be written) runs before the folder's lock is taken.
Values are read as the stages will see them: the gin binding (macros resolved), else the signature default.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable
from pathlib import Path

import gin

from dlsm.errors import ConfigError
from dlsm.stages.base import ExperimentSpec, build_network
from dlsm.train import distributed as dist

__all__ = [
    "check_before_training", "check_evaluation", "check_networks", "check_published", "check_workdir", "setting",
]

PUBLISHED = "https://github.com/chen-hao-chao/dlsm#pretrained-weights"  # the official DLSM files (README's table)


def check_workdir(workdir: str) -> None:
    """Fail now, in one line, if ``experiment.workdir`` (checkpoints, samples) cannot be created or written."""
    path = Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".dlsm-write-test-"):
            pass
    except OSError as err:
        reason = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror
        raise ConfigError(f"experiment.workdir = {workdir!r}: cannot create or write this folder ({reason}); "
                          "bind experiment.workdir to a writable folder") from None


def check_networks(spec: ExperimentSpec, data) -> None:
    """Build every network once (on the CPU, in its gin scope) so that one that does not fit the data
    fails in one line before anything is written; the stages build their own, from their own seeds."""
    with gin.config_scope("score"):
        build_network(spec.score_model, data)
    with gin.config_scope("classifier"):
        for make in spec.classifiers.values():
            build_network(make, data, num_classes=data.num_classes)
    for scope in ("score", "classifier"):
        try:
            batch = gin.query_parameter(f"{scope}/train.batch_size")
        except ValueError:  # not bound in this scope: train's default
            continue
        if isinstance(batch, int) and batch > len(data):
            raise ConfigError(f"{scope}/train.batch_size = {batch} is larger than the data ({len(data)} examples); "
                              "lower it")
        if isinstance(batch, int):  # the global batch must split evenly across torchrun's processes
            dist.shard(batch, f"{scope}/train.batch_size")


def check_before_training(spec: ExperimentSpec, data) -> None:
    """Every check that needs the loaded data: the evaluation's settings (on rank 0, which evaluates; its error
    stops every rank), then the networks (:func:`check_networks`), then the official checkpoint files (rank 0)."""
    dist.from_main(lambda: check_evaluation(spec, data))
    check_networks(spec, data)
    dist.from_main(lambda: check_published(spec, data))


def check_guidance(spec: ExperimentSpec, data, schedule) -> None:
    """Each guidance of ``experiment.sampling_methods`` against the noise schedule and the class count
    (:meth:`dlsm.math.guidance.Guidance.check`), and a temperature guidance against the stage list: it needs
    ``calibrate_temperature`` listed before ``sample``."""
    from dlsm.math.guidance import Guidance, TemperatureGuidance
    from dlsm.stages.calibrate import calibrate_temperature
    from dlsm.stages.sample import sample

    lo, hi = float(schedule.sigmas.min()), float(schedule.sigmas.max())
    stages = [inspect.unwrap(s) for s in spec.stages]
    calibrate, draw = inspect.unwrap(calibrate_temperature), inspect.unwrap(sample)
    calibrated = calibrate in stages and (draw not in stages or stages.index(calibrate) < stages.index(draw))
    for name, (_, guidance) in (spec.sampling_methods or {}).items():
        if not isinstance(guidance, Guidance):
            continue
        try:
            guidance.check(lo, hi, int(data.num_classes))
        except ConfigError as err:
            raise ConfigError(f"experiment.sampling_methods[{name!r}]: {err}") from None
        if isinstance(guidance, TemperatureGuidance) and not guidance.taus and not calibrated:
            raise ConfigError(f"experiment.sampling_methods[{name!r}] uses temperature_guidance: list "
                              "@calibrate_temperature in experiment.stages before @sample (it fits the temperatures)")


def setting(fn: Callable, param: str) -> object:
    """The value configurable ``fn`` will get for ``param`` (outside any scope): its gin binding with macros
    resolved, else the default in its signature."""
    bound = gin.get_bindings(fn, resolve_references=True)
    if param in bound:
        return bound[param]
    return inspect.signature(inspect.unwrap(fn)).parameters[param].default


def _listed(stages, fn: Callable) -> bool:
    return any(inspect.unwrap(s) is inspect.unwrap(fn) for s in stages)


def check_evaluation(spec: ExperimentSpec, data) -> None:
    """The evaluation's settings against the data, before training (see the module docstring)."""
    from dlsm.eval.images import image_metrics
    from dlsm.eval.points import sample_metrics
    from dlsm.stages.evaluate import evaluate
    from dlsm.stages.sample import class_counts, sample

    if spec.stop_after is not None or not _listed(spec.stages, evaluate):
        return
    suites = [inspect.unwrap(s) for s in setting(evaluate, "suites")]
    n_per_class = setting(sample, "n_per_class")
    counts = class_counts(data, n_per_class) if _listed(spec.stages, sample) else None  # None: nothing sampled
    if inspect.unwrap(sample_metrics) in suites:
        k = _positive("sample_metrics", "k", setting(sample_metrics, "k"), "e.g. 5")
        _positive("sample_metrics", "n_projections", setting(sample_metrics, "n_projections"), "e.g. 256")
        _check_knn("sample_metrics", k, data, counts, n_per_class)
    if inspect.unwrap(image_metrics) in suites:
        _check_image_metrics(spec, data, counts, n_per_class)


def _positive(fn: str, param: str, value: object, example: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{fn}.{param} = {value!r}: must be {what}, {example}")
    return value


def _per_class(data) -> list[int]:
    return [int((data.y == c).sum()) for c in range(data.num_classes)]


def _data_source(data, split: str) -> tuple[str, str, str]:
    """How to name a split's size in a message: (what gives it, its unit, how to raise it)."""
    from dlsm.data.images import digits
    from dlsm.data.points import two_moons

    image = len(tuple(data.shape)) == 3
    unit = f"{'training' if split == 'train' else 'test'} image" if image else "data point"
    if data.name == "two_moons":
        return f"two_moons.n = {setting(two_moons, 'n')!r} gives", unit, "raise two_moons.n"
    if data.name == "digits":
        fraction = setting(digits, "test_fraction")
        fix = "lower digits.test_fraction" if split == "train" else "raise digits.test_fraction"
        return f"digits.test_fraction = {fraction!r} gives", unit, fix
    return f"the {split} split of {data.name} has", unit, f"use a larger {split} split"


def _check_knn(suite: str, k: int, data, counts: list[int] | None, n_per_class: object, test=None) -> None:
    """Every class of the training data, the samples and the test split (when given) has k + 1 points."""
    sets = [(_per_class(data), *_data_source(data, "train"))]
    if counts is not None:
        sets.append((counts, f"sample.n_per_class = {n_per_class!r} gives", "sample", "raise sample.n_per_class"))
    if test is not None:
        sets.append((_per_class(test), *_data_source(test, "test")))
    for per_class, source, unit, fix in sets:
        small = [c for c, n in enumerate(per_class) if n < k + 1]
        if small:
            c, n = small[0], per_class[small[0]]
            raise ConfigError(f"{suite}.k = {k} needs at least {k + 1} points per class: {source} {n} "
                              f"{unit}{'' if n == 1 else 's'} in class {c}; {fix} or lower {suite}.k")


def _check_image_metrics(spec: ExperimentSpec, data, counts: list[int] | None, n_per_class: object) -> None:
    """image_metrics' k-NN sets (training split, samples, test split for the ``real`` row), KID and evaluator."""
    from dlsm.data.images import ImageData
    from dlsm.eval.images import evaluator_network, image_features, image_metrics

    if not isinstance(data, ImageData):
        raise ConfigError("image_metrics needs image data; for point data use sample_metrics")
    k = _positive("image_metrics", "k", setting(image_metrics, "k"), "e.g. 5")
    _positive("image_metrics", "kid_subset_size", setting(image_metrics, "kid_subset_size"), "e.g. 1000", 2)
    real_row, with_cas = setting(image_metrics, "real_row"), setting(image_metrics, "with_cas")
    test = spec.dataset(split="test") if real_row or with_cas else None  # rank 0 alone (check_before_training)
    _check_knn("image_metrics", k, data, counts, n_per_class, test if real_row else None)
    networks = [inspect.unwrap(n) for n in setting(image_features, "networks")]
    scopes = ([None] if inspect.unwrap(evaluator_network) in networks else []) + (["cas"] if with_cas else [])
    for scope in scopes:
        _check_evaluator(data, scope)


def _check_evaluator(data, scope: str | None) -> None:
    """The evaluator network (scope None) or CAS's (scope ``cas``), built once on the CPU with its settings."""
    from dlsm.eval.evaluator import EvaluatorNet, EvaluatorSettings

    _, h, w = data.shape
    if h % 4 or w % 4:
        fix = "set digits.size to a multiple of 4" if data.name == "digits" else "use images of such a size"
        raise ConfigError(f"image_metrics: the evaluator network (features, CAS) needs image height and width "
                          f"divisible by 4, got {h}x{w}; {fix} or drop @image_metrics from evaluate.suites")
    with gin.config_scope(scope):
        settings = EvaluatorSettings()
    if scope is None and settings.network != "evaluator":
        raise ConfigError(f"EvaluatorSettings.network = {settings.network!r} has no feature layer for the metrics: "
                          f"bind it for CAS alone, cas/EvaluatorSettings.network = {settings.network!r}")
    EvaluatorNet(tuple(data.shape), data.num_classes, width=settings.width, depth=settings.depth)


def _published_path(binding: str, value: object, reference: object, what: str) -> str:
    """The file bound to ``binding`` (``reference``: the binding as written, e.g. the macro ``%SCORE_CKPT``), or a
    one-line ConfigError naming what to set and where the official file is published."""
    ref = str(reference)
    target = f"the macro {ref[1:]}" if ref.startswith("%") else binding
    example = f"--gin_param \"{ref[1:] if ref.startswith('%') else binding} = '/path/to/checkpoint.pth'\""
    where = f"the official {what} is published at {PUBLISHED}"
    if value is None or value == "":
        raise ConfigError(f"{binding} is not set: give {target} the checkpoint file ({example}); {where}")
    if not isinstance(value, str):
        raise ConfigError(f"{binding} = {value!r}: expected the path of a checkpoint file")
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{binding} = {value!r} is a directory, not a checkpoint file; give {target} the file "
                          f"(e.g. .../checkpoint.pth)")
    if not path.is_file():
        raise ConfigError(f"{binding} = {value!r}: no such file; give {target} the checkpoint file ({example}); "
                          f"{where}")
    return str(path)


def check_published(spec: ExperimentSpec, data) -> None:
    """The official checkpoint files the experiment loads instead of training (``train_score_model.checkpoint``,
    ``train_classifiers.checkpoints``): every one set, existing, and imported into the declared network (built on
    the CPU in its gin scope) without a missing, unexpected or mis-shaped tensor, before any MLflow run exists; a
    classifier name must be one the experiment trains, and a loaded stage cannot also be reused from a run."""
    from dlsm.stages.base import method_key
    from dlsm.stages.classifier import train_classifiers
    from dlsm.stages.score import train_score_model
    from dlsm.train.official import import_classifier_checkpoint, import_score_checkpoint

    if _listed(spec.stages, train_score_model) and "checkpoint" in gin.get_bindings(train_score_model):
        ref = gin.get_bindings(train_score_model, resolve_references=False)["checkpoint"]
        value = setting(train_score_model, "checkpoint")
        if value is not None or str(ref).startswith("%"):  # None bound directly: train as usual
            if spec.stage1_run_id:
                raise ConfigError("train_score_model.checkpoint and experiment.stage1_run_id both give stage 1; "
                                  "bind one of them")
            path = _published_path("train_score_model.checkpoint", value, ref,
                                   "score model (Cifar10/score/checkpoint.pth, Cifar100/score/checkpoint.pth)")
            with gin.config_scope("score"):
                import_score_checkpoint(path, build_network(spec.score_model, data))
    files = setting(train_classifiers, "checkpoints") if _listed(spec.stages, train_classifiers) else None
    if not files:
        return
    refs = gin.get_bindings(train_classifiers, resolve_references=False)["checkpoints"]
    names = {method_key(loss, shape): make for shape, make in spec.classifiers.items()
             for loss in spec.classifier_losses}
    if not isinstance(files, dict) or not set(files) <= set(names):
        raise ConfigError(f"train_classifiers.checkpoints = {files!r}: expected {{classifier name: file}} with names "
                          f"from {sorted(names)}")
    if spec.stage2_run_id:
        raise ConfigError("train_classifiers.checkpoints and experiment.stage2_run_id both give the classifiers; "
                          "bind one of them")
    if setting(train_classifiers, "seeds") != 1:
        raise ConfigError("train_classifiers.checkpoints loads one classifier per name; train_classifiers.seeds "
                          "must be 1")
    for name, value in files.items():
        ref = refs.get(name, value) if isinstance(refs, dict) else value
        path = _published_path(f"train_classifiers.checkpoints[{name!r}]", value, ref,
                               f"classifier {name!r} (Cifar10/base|ours/checkpoint.pth, Cifar100/...)")
        with gin.config_scope("classifier"):
            import_classifier_checkpoint(path, build_network(names[name], data, num_classes=data.num_classes))
