"""The guidance report (``python -m dlsm.report guidance``) end to end: a tiny Ray Tune sweep of
gin/digits_guidance.gin under smoke settings (2 seeds sharing stage 1), each guidance point an MLflow run with its
schedule's settings as params, then the report with its ablation, mechanism, calibration and frontier sections."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_guidance_sweep_and_the_report_on_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tune" / "sweep.py"), "--gin", str(ROOT / "gin" / "digits_guidance.gin"),
           "--gin", str(ROOT / "gin" / "smoke.gin"), "--param", "SEED", "--values", "0", "1", "--share", "stage1",
           "--gin_param", "sweep.cpus_per_trial = 1", "--gin_param", "sweep.metric = 'ours/cw/fid.evaluator'",
           "--gin_param", "MECHANISM_SIGMAS = (0.1, 4.8)"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("digits_guidance")
    points = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'point' and params.seed = '1'")
    by_method = {p.data.params["method"]: p.data for p in points}
    assert {"base", "scaling", "ours", "above0.5", "below0.5", "interval", "power_ce", "entropy_ours", "temp_ce",
            "exact"} <= set(by_method)
    above = by_method["above0.5"].params
    assert (above["guidance"], above["guidance.sigma_lo"], above["guidance.sigma_hi"]) == ("interval", "0.5", "inf")
    assert above["alpha"] == "10.0" and by_method["base"].params["alpha"] == "1.0"
    assert "guidance" not in by_method["base"].params  # a constant alpha is the paper's point, no schedule
    assert by_method["power_ce"].params["guidance.power"] == "1.0"
    assert by_method["temp_ce"].params["guidance"] == "temperature"
    assert math.isfinite(by_method["entropy_ours"].metrics["cw/fid.evaluator"])
    (seed1,) = c.search_runs([exp.experiment_id], filter_string="tags.`dlsm.kind` = 'parent' and params.`macro.SEED`"
                             " = '1'")
    tau = {k: v for k, v in seed1.data.metrics.items() if "/calibration/tau/" in k}
    assert len(tau) == 2 * 5 and all(0.05 <= v <= 20.0 for v in tau.values())  # 2 classifiers x 5 smoke levels
    assert "ce/heldout/ece/s4.8" in seed1.data.metrics and "base/c0/D_L/s4.8" in seed1.data.metrics

    out = tmp_path / "docs" / "guidance.md"
    rep = subprocess.run([sys.executable, "-m", "dlsm.report", "guidance", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    text = out.read_text()
    for name in ("frontier-1.png", "frontier-3.png", "mechanism.png", "temperature.png"):
        assert (out.parent / "guidance" / name).stat().st_size > 1000, name
        assert f"guidance/{name}" in text
    assert "over 2 seeds (0, 1); the seeds share one stage-1 score model" in text
    assert "| σ ≥ 0.5 |" in text and "| σ ≤ 2 |" in text  # the ablation rows
    assert "| interval | ce | `mid/interval_guidance` |" in text
    assert "| entropy_ours | total | `entropy_guidance` |" in text
    assert text.count("### ") == 3  # the three planes, each with its verdict
    assert text.count("No point beats both base and scaling") + text.count("Beats both base and scaling") == 3


def test_guidance_report_without_runs_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'x.db'}"}
    proc = subprocess.run([sys.executable, "-m", "dlsm.report", "guidance", "--out", str(tmp_path / "g.md")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "make reproduce-guidance" in lines[0], proc.stderr[-2000:]
