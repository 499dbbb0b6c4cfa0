"""The digits report (``python -m dlsm.report digits``): its tables and claim sentences on synthetic seed runs with
known answers, and end to end on a tiny Ray Tune sweep of gin/digits_frontier.gin (2 lambda x 2 alpha x 1 seed with
smoke settings) that must produce the frontier plot and table, the point runs and the report."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlsm.report.digits import sampling_methods
from dlsm.report.seeds import (
    SeedRuns,
    claim_lines,
    count_sentence,
    mechanism_rows,
    paired_mechanism,
    paired_rows,
    table2_rows,
)

ROOT = Path(__file__).resolve().parent.parent
T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 at 2 degrees of freedom (printed tables)
KEYS = {  # metric key -> higher is better
    "fid.evaluator": False, "is.evaluator": True, "kid.evaluator": False, "precision.evaluator": True,
    "recall.evaluator": True, "density.evaluator": True, "coverage.evaluator": True, "cw/fid.evaluator": False,
    "cw/precision.evaluator": True, "cw/recall.evaluator": True, "cw/density.evaluator": True,
    "cw/coverage.evaluator": True, "cas": True, "sample_acc": True,
}


def _runs(ours_gain: float, *, seed_noise: float = 0.01, scaling: dict[str, float] | None = None) -> SeedRuns:
    """Three seeds; every metric of base is 0.5 plus a seed effect shared by all methods; ours is base moved by
    ``ours_gain`` in the better direction of each metric (negative: worse), plus a small per-seed wobble."""
    metrics = []
    for i, shift in enumerate((-0.1, 0.0, 0.1)):
        m: dict[str, float] = {}
        wobble = (-seed_noise, 0.0, seed_noise)[i]
        for key, up in KEYS.items():
            sign = 1.0 if up else -1.0
            m[f"base/{key}"] = 0.5 + shift
            m[f"ours/{key}"] = 0.5 + shift + sign * ours_gain + wobble
            m[f"scaling/{key}"] = 0.5 + shift + (scaling or {}).get(key.split(".")[0], 0.0) + wobble
            m[f"real/{key}"] = 0.9
        metrics.append(m)
    return SeedRuns("synthetic", [0, 1, 2], metrics, {}, ["a", "b", "c"], [1.0, 1.0, 1.0])


def test_table2_cells_are_student_t_intervals_over_seeds():
    runs = _runs(0.2, seed_noise=0.0)
    table = table2_rows(runs, ("real", "uncond", "base", "ours"))
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in table.splitlines()[2:]}
    assert list(rows) == ["real", "base", "ours"]  # uncond was not sampled: no row
    header = [c.strip() for c in table.splitlines()[0].split("|")[2:-1]]
    fid = rows["ours"][header.index("FID ↓")]
    # ours FID per seed: 0.3 - 0.1, 0.3, 0.3 + 0.1 -> mean 0.3, sd 0.1
    mean, half = (float(x) for x in fid.split(" ± "))
    assert mean == pytest.approx(0.3)
    assert half == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3), rel=1e-2)
    assert rows["real"][header.index("FID ↓")] == "0.9 ± 0"


@pytest.mark.parametrize(("gain", "verdict"), [
    (0.05, "agrees"), (-0.05, "does not"), (0.0, "cannot tell at this sample size"),
])
def test_paired_verdict_uses_each_metrics_direction(gain, verdict):
    """ours = base + gain in each metric's better direction: lower FID/KID, higher everything else."""
    _, out = paired_rows(_runs(gain, seed_noise=0.001), "ours", "base")
    assert set(out) == set(KEYS)
    assert {v for v, _ in out.values()} == {verdict}
    fid_diff = out["fid.evaluator"][1]
    assert fid_diff.mean == pytest.approx(-gain, abs=1e-9)  # paired: the seed effect (+-0.1) cancels


@pytest.mark.parametrize(("gain", "word"), [
    (0.05, "**agrees**"), (-0.05, "**does not**"), (0.0, "**cannot tell at this sample size**"),
])
def test_ours_vs_base_claim_follows_the_numbers(gain, word):
    line = claim_lines(_runs(gain, seed_noise=0.001, scaling={}), "digits")[0]
    assert "ours beats base" in line and word in line


@pytest.mark.parametrize(("scaling", "word"), [
    ({"precision": 0.1, "density": 0.1, "recall": -0.1, "coverage": -0.1}, "**agrees**"),
    ({"precision": -0.1, "density": -0.1, "recall": 0.1, "coverage": 0.1}, "**does not**"),
    ({"precision": 0.1, "density": 0.1, "recall": 0.1, "coverage": 0.1}, "**mixed** (agrees on 2 of 4, opposite on 2)"),
    ({"precision": 0.1, "density": 0.1, "recall": 0.0, "coverage": 0.0},
     "**agrees on 2 of 4 metrics, cannot tell on 2**"),
])
def test_scaling_claim_follows_the_numbers(scaling, word):
    line = claim_lines(_runs(0.0, seed_noise=0.001, scaling=scaling), "digits")[1]
    assert "scaling raises precision" in line and word in line


def _mech_runs() -> SeedRuns:
    """E[D_L] of two classes at two sigmas; total is below ce by 0.5 at sigma 0.1 on every seed and equal at 1."""
    metrics = []
    for seed in range(3):
        m = {}
        for c, base in ((0, 1.0), (1, 3.0)):
            m[f"base/c{c}/D_L/s0.1"] = base + seed
            m[f"ours/c{c}/D_L/s0.1"] = base + seed - 0.5
            m[f"base/c{c}/D_L/s1"] = base + seed
            m[f"ours/c{c}/D_L/s1"] = base + seed + (0.01, -0.01, 0.0)[seed]
        m["ce/heldout/acc/s0.1"], m["total/heldout/acc/s0.1"] = 0.5 + 0.1 * seed, 0.6 + 0.1 * seed
        metrics.append(m)
    return SeedRuns("synthetic", [0, 1, 2], metrics, {}, ["a", "b", "c"], [1.0, 1.0, 1.0])


def test_mechanism_rows_average_classes_then_seeds():
    runs = _mech_runs()
    rows = mechanism_rows(runs, "D_L", {"CE": "base", "Total": "ours"}, per_class=True)
    # seed s: class mean (1 + 3)/2 + s = 2 + s -> mean over seeds 3; ours 0.5 lower at sigma 0.1
    assert rows["CE"][0].mean == pytest.approx(3.0) and rows["Total"][0].mean == pytest.approx(2.5)
    acc = mechanism_rows(runs, "acc", {"ce": "ce", "total": "total"}, per_class=False)
    assert acc["total"][0].mean == pytest.approx(0.7) and acc["total"][1] is None  # no sigma-1 accuracy logged


def test_mechanism_sentence_counts_the_sigmas_where_total_is_closer():
    res = paired_mechanism(_mech_runs(), "ours", "base", "D_L", per_class=True, higher_is_better=False)
    assert [(s, v) for s, v, _ in res] == [("0.1", "agrees"), ("1", "cannot tell at this sample size")]
    text = count_sentence(res, "E[D_L]")
    assert "**agrees at some σ**" in text and "better at 1 of 2 σ" in text
    higher = paired_mechanism(_mech_runs(), "ours", "base", "D_L", per_class=True, higher_is_better=True)
    assert higher[0][1] == "does not"


def test_sampling_methods_resolve_the_scaling_macro():
    runs = SeedRuns("x", [0], [{}], {"experiment.sampling_methods": "{'base': ('ce', 1.0), 'scaling': ('ce', "
                                     "%SCALING_ALPHA)}", "macro.SCALING_ALPHA": "7.5"}, ["a"], [1.0])
    assert sampling_methods(runs) == {"base": ("ce", 1.0), "scaling": ("ce", 7.5)}


# -- end to end: a tiny sweep, then the report on it -----------------------------------------------------------------
TINY_FRONTIER = [
    "experiment.classifier_losses = {'ce': @ce_loss, 'total': @total_loss, 'total_lam8': @lam_large/total_loss}",
    "experiment.sampling_methods = {'base': ('ce', 1.0), 'scaling': ('ce', 10.0), 'ours': ('total', 1.0), "
    "'total_a3': ('total', 3.0), 'total_lam8_a1': ('total_lam8', 1.0), 'total_lam8_a3': ('total_lam8', 3.0)}",
    "score_error_metrics.methods = ['base', 'ours', 'total_lam8_a1', 'exact']",
    "score_error_metrics.sigmas = (0.1, 1.0)", "heldout_metrics.sigmas = (0.1, 1.0)",
    "sweep.cpus_per_trial = 1", "sweep.metric = 'ours/cw/fid.evaluator'",
]


def test_tiny_frontier_sweep_and_the_report_on_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tune" / "sweep.py"), "--gin", str(ROOT / "gin" / "digits_frontier.gin"),
           "--gin", str(ROOT / "gin" / "smoke.gin"), "--param", "SEED", "--values", "0", "--share", "none"]
    cmd += [x for p in TINY_FRONTIER for x in ("--gin_param", p)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("digits_frontier")
    points = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'point'")
    by_method = {p.data.params["method"]: p for p in points}
    assert sorted(by_method) == sorted(["base", "scaling", "ours", "total_a3", "total_lam8_a1", "total_lam8_a3",
                                        "exact"])
    assert by_method["total_lam8_a3"].data.params["lam"] == "8.0"
    assert by_method["total_lam8_a3"].data.params["alpha"] == "3.0"
    assert by_method["ours"].data.params["lam"] == "1.0" and by_method["ours"].data.params["seed"] == "0"
    assert "lam" not in by_method["base"].data.params and by_method["base"].data.params["loss"] == "ce_loss"
    assert math.isfinite(by_method["total_a3"].data.metrics["cw/fid.evaluator"])

    out = tmp_path / "docs" / "digits.md"
    rep = subprocess.run([sys.executable, "-m", "dlsm.report", "digits", "--images32", "", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    text = out.read_text()
    figs = out.parent / "digits"
    for name in ("frontier-1.png", "figure3-digits8.png", "figure4-digits8.png", "mechanism.png"):
        assert (figs / name).stat().st_size > 1000, name
        assert f"digits/{name}" in text
    frontier_rows = [ln for ln in text.split("### class-wise recall against class-wise FID")[1].splitlines()
                     if ln.startswith("| ") and not ln.startswith("| point")]
    assert [r.split("|")[1].strip() for r in frontier_rows[:6]] == ["base", "scaling", "ours", "total_a3",
                                                                    "total_lam8_a1", "total_lam8_a3"]
    assert "| total_lam8_a3 | total_lam8 | 3 |" in text
    assert "ours beats base on FID, IS, CAS" in text and "cannot tell at this sample size" in text  # one seed
    assert "No finished" not in text.split("## Table 2 on 8")[1].split("##")[0]
    (sweep_run,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'sweep'")
    logged = {a.path for a in c.list_artifacts(sweep_run.info.run_id, "report")}
    assert {"report/frontier-1.png", "report/digits.md"} <= logged  # beside the sweep in the MLflow UI


def test_report_without_runs_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'x.db'}"}
    proc = subprocess.run([sys.executable, "-m", "dlsm.report", "digits", "--out", str(tmp_path / "d.md")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "make reproduce-digits" in lines[0], proc.stderr[-2000:]
