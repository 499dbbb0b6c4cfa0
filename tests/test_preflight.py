"""Settings that would fail late -- after training, at evaluation -- fail before training instead, in one line
(:mod:`dlsm.preflight`): impossible network sizes, k-NN metrics with fewer than k + 1 points of a class in the data,
the samples or the test split, unusable metric settings, an evaluator that cannot fit the images. For the moons,
digits and CIFAR files alike (CIFAR on small archives the tests write). Most cases call the pre-flight in this
process on a parsed config; one launches ``python -m dlsm.launch`` and checks that nothing was trained or tracked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gin
import pytest
from cifar_archives import make_cifar10, make_cifar100  # tests/, on sys.path

from dlsm import (
    components,  # noqa: F401  (registers every configurable)
    launch,
)
from dlsm import config as cfg
from dlsm.errors import ConfigError
from dlsm.experiment import experiment
from dlsm.preflight import check_before_training

ROOT = Path(__file__).resolve().parent.parent
GIN = ROOT / "gin"
MOONS, DIGITS, SMOKE = str(GIN / "moons.gin"), str(GIN / "digits.gin"), str(GIN / "smoke.gin")


def preflight(files: list[str], params: list[str]) -> str | None:
    """Parse the config, load the data as a launch does, run the pre-flight: its one line, or None when it passes."""
    try:
        cfg.parse_config(files, params)
        spec = cfg.call_configurable(experiment)
        data = spec.dataset()
        try:
            check_before_training(spec, data)
        except ConfigError as err:
            return str(err).splitlines()[0]
        return None
    finally:
        gin.clear_config()


MOONS_CASES = [
    (["two_moons.n = 3", "sample_metrics.k = 5"],
     "sample_metrics.k = 5 needs at least 6 points per class: two_moons.n = 3 gives 1 data point in class 0; "
     "raise two_moons.n or lower sample_metrics.k"),
    (["sample_metrics.k = 5"],  # smoke.gin samples 4 per class
     "sample_metrics.k = 5 needs at least 6 points per class: sample.n_per_class = 4 gives 4 samples in class 0; "
     "raise sample.n_per_class or lower sample_metrics.k"),
    (["sample.n_per_class = {0: 10, 1: 3}"],
     "sample_metrics.k = 3 needs at least 4 points per class: sample.n_per_class = {0: 10, 1: 3} gives 3 samples in "
     "class 1; raise sample.n_per_class or lower sample_metrics.k"),
    (["sample_metrics.k = 0"], "sample_metrics.k = 0: must be a positive integer, e.g. 5"),
    (["sample_metrics.n_projections = 0"], "sample_metrics.n_projections = 0: must be a positive integer, e.g. 256"),
    (["ScoreMLP.hidden = 0"], "ScoreMLP.hidden = 0: must be a positive integer"),
    (["ScoreMLP.depth = 0"], "ScoreMLP.depth = 0: must be a positive integer"),
    (["classifier/ClassifierMLP.hidden = -4"], "ClassifierMLP.hidden = -4: must be a positive integer"),
    (["ClassifierMLP.emb_dim = 1"], "ClassifierMLP.emb_dim = 1: must be an integer >= 2"),
    (["experiment.classifier = @BranchClassifier", "BranchClassifier.x_widths = ()"],
     "BranchClassifier.x_widths = (): must be a non-empty tuple of positive integers, e.g. (256, 128, 64)"),
    (["experiment.classifier = @BranchClassifier", "BranchClassifier.sigma_widths = (8, 0)"],
     "BranchClassifier.sigma_widths = (8, 0): must be a non-empty tuple of positive integers, e.g. (256, 128, 64)"),
]


@pytest.mark.parametrize(("params", "expected"), MOONS_CASES, ids=[e[:45] for _, e in MOONS_CASES])
def test_moons_settings_that_would_fail_late_fail_before_training(params, expected):
    assert preflight([MOONS, SMOKE], params) == expected


DIGITS_CASES = [
    (["digits.test_fraction = 0.99"],  # 18 training images, 1 or 2 per class
     "sample_metrics.k = 3 needs at least 4 points per class: digits.test_fraction = 0.99 gives 1 training image in "
     "class 0; lower digits.test_fraction or lower sample_metrics.k"),
    (["digits.test_fraction = 0.01"],  # 18 test images: the real row scores each class's test images
     "image_metrics.k = 3 needs at least 4 points per class: digits.test_fraction = 0.01 gives 2 test images in "
     "class 0; raise digits.test_fraction or lower image_metrics.k"),
    (["image_metrics.k = 0"], "image_metrics.k = 0: must be a positive integer, e.g. 5"),
    (["image_metrics.kid_subset_size = 1"], "image_metrics.kid_subset_size = 1: must be an integer >= 2, e.g. 1000"),
    (["digits.size = 6"],  # the U-Net and the classifier halve once: 6x6 fits them, not the evaluator's 2 halvings
     "image_metrics: the evaluator network (features, CAS) needs image height and width divisible by 4, got 6x6; "
     "set digits.size to a multiple of 4 or drop @image_metrics from evaluate.suites"),
    (["ScoreUNet.norm_groups = 0"], "ScoreUNet.norm_groups = 0: must be a positive integer"),
    (["ConvClassifier.emb_dim = 0"], "ConvClassifier.emb_dim = 0: must be a positive integer"),
]


@pytest.mark.parametrize(("params", "expected"), DIGITS_CASES, ids=[e[:45] for _, e in DIGITS_CASES])
def test_digits_settings_that_would_fail_late_fail_before_training(params, expected):
    assert preflight([DIGITS, SMOKE], params) == expected


@pytest.mark.parametrize(("files", "params"), [
    ([MOONS], []), ([MOONS, SMOKE], []), ([DIGITS], []), ([DIGITS, SMOKE], []),
    ([str(GIN / "moons_table1.gin"), SMOKE], []), ([str(GIN / "digits32.gin"), SMOKE], []),
    ([DIGITS, SMOKE], ["digits.size = 6", "evaluate.suites = [@classifier_metrics, @sample_metrics]",
                       "ConvClassifier.channels = (8, 16)"]),  # a classifier that halves 6x6 once (smoke's: thrice)
    ([DIGITS, SMOKE], ["digits.test_fraction = 0.01", "image_metrics.real_row = False"]),  # test split unscored
    ([MOONS, SMOKE], ["sample_metrics.k = 5", "experiment.stop_after = 'stage2'"]),  # this run does not evaluate
    ([MOONS, SMOKE], ["sample_metrics.k = 5", "evaluate.suites = [@classifier_metrics]"]),
], ids=["moons", "moons-smoke", "digits", "digits-smoke", "table1-smoke", "digits32-smoke", "no-image-metrics",
        "no-real-row", "stops-before-evaluation", "no-knn-suite"])
def test_the_shipped_files_and_unaffected_settings_pass(files, params):
    assert preflight(files, params) is None


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """DATA_ROOT for archives written by the test; torchvision's md5 check becomes 'the file exists'."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    return tmp_path / "data"


CIFAR_CASES = [  # (gin file, archive writer, bindings, expected line or None); smoke.gin: k = 3, 4 samples per class
    ("cifar10.gin", lambda d: make_cifar10(d, per_batch=20, n_test=40, balanced=True), [], None),  # 10 / 4 per class
    ("cifar10.gin", lambda d: make_cifar10(d, per_batch=2, n_test=40, balanced=True), [],
     "image_metrics.k = 3 needs at least 4 points per class: the train split of cifar10 has 1 training image in "
     "class 0; use a larger train split or lower image_metrics.k"),
    ("cifar10.gin", lambda d: make_cifar10(d, per_batch=20, n_test=30, balanced=True), [],
     "image_metrics.k = 3 needs at least 4 points per class: the test split of cifar10 has 3 test images in class 0; "
     "use a larger test split or lower image_metrics.k"),
    ("cifar10.gin", lambda d: make_cifar10(d, per_batch=20, n_test=40, balanced=True), ["sample.n_per_class = 3"],
     "image_metrics.k = 3 needs at least 4 points per class: sample.n_per_class = 3 gives 3 samples in class 0; "
     "raise sample.n_per_class or lower image_metrics.k"),
    ("cifar100.gin", lambda d: make_cifar100(d, n_train=400, n_test=200, balanced=True), [],
     "image_metrics.k = 3 needs at least 4 points per class: the test split of cifar100 has 2 test images in class 0; "
     "use a larger test split or lower image_metrics.k"),
]


@pytest.mark.parametrize(("gin_file", "write", "params", "expected"), CIFAR_CASES,
                         ids=["cifar10-ok", "cifar10-train", "cifar10-test", "cifar10-samples", "cifar100-test"])
def test_cifar_files_on_small_archives(cifar_root, gin_file, write, params, expected):
    write(cifar_root)
    assert preflight([str(GIN / gin_file), SMOKE], params) == expected


def _nothing_trained_or_tracked(folder: Path) -> None:
    assert not list(folder.rglob("*.pt"))  # no checkpoint
    db = folder / "mlruns" / "mlflow.db"
    if db.exists():  # the store may have been opened; it holds no run
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        ids = [e.experiment_id for e in client.search_experiments()]
        assert not ids or not client.search_runs(ids)


def test_too_few_points_for_k_stops_the_launch_before_training(tmp_path):
    cmd = [sys.executable, "-m", "dlsm.launch", "--gin", MOONS, "--gin", SMOKE,
           "--gin_param", "two_moons.n = 3", "--gin_param", "sample_metrics.k = 5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "dlsm: error: sample_metrics.k = 5 needs at least 6 points per class: two_moons.n = 3 gives 1 data point in "
        "class 0; raise two_moons.n or lower sample_metrics.k"]
    _nothing_trained_or_tracked(tmp_path)


def test_zero_width_network_stops_the_launch_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = launch.main(["--gin", MOONS, "--gin", SMOKE, "--gin_param", "ScoreMLP.hidden = 0"])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == ["dlsm: error: ScoreMLP.hidden = 0: must be a positive integer"]
    _nothing_trained_or_tracked(tmp_path)
