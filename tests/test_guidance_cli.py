"""Bad guidance settings through ``dlsm.launch`` (issue 25 item 5): one line each, before anything trains. Kept apart
from tests/test_guidance.py, whose tests mutmut runs (it cannot trace a subprocess)."""

from __future__ import annotations

from pathlib import Path

from cases import one_line, run_cases  # tests/, on sys.path


def test_bad_guidance_bindings_stop_a_launch_in_one_line_before_training(tmp_path):
    """Through ``dlsm.launch`` of gin/digits_guidance.gin under smoke.gin: each mistake is one line, before any
    network is trained (no checkpoint folder with a stage in it)."""
    root = Path(__file__).resolve().parent.parent
    base = ["--gin", str(root / "gin" / "digits_guidance.gin"), "--gin", str(root / "gin" / "smoke.gin")]
    bad = {
        "equal": (["mid/interval_guidance.sigma_lo = 2.0"],
                  "interval_guidance needs 0 <= sigma_lo < sigma_hi, got sigma_lo=2.0, sigma_hi=2.0"),
        "outside": (["above2/interval_guidance.sigma_lo = 9.0"],
                    "experiment.sampling_methods['above2']: interval_guidance [9, inf] lies outside the noise "
                    "schedule's [0.01, 4.814]: it would never guide"),
        "negative": (["power_guidance.alpha = -3.0"], "power_guidance.alpha must be a finite number >= 0, got -3.0"),
        "uncalibrated": (["experiment.stages = [@train_score_model, @train_classifiers, @sample]"],
                         "experiment.sampling_methods['temp_ce'] uses temperature_guidance: list "
                         "@calibrate_temperature in experiment.stages before @sample (it fits the temperatures)"),
        "bounds": (["calibrate_temperature.bounds = (-1.0, 5.0)"],
                   "calibrate_temperature.bounds = (-1.0, 5.0): must be (lo, hi) temperatures with 0 < lo < hi, "
                   "e.g. (0.05, 20.0)"),
    }
    cases = [{"cwd": tmp_path / name, "argv": base + [x for p in params for x in ("--gin_param", p)]}
             for name, (params, _) in bad.items()]
    for (name, (_, message)), result in zip(bad.items(), run_cases(cases), strict=True):
        assert one_line(result) == f"dlsm: error: {message}", name
        assert not list((tmp_path / name).glob(".dlsm/*/*/*.pt")), name  # nothing trained
