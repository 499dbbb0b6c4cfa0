"""A sweep's results: the per-trial rows Tune returns, the printed table and the metric-vs-value plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["SweepResult", "class_mean", "collect", "metric_plot", "table_text"]


def class_mean(metrics: dict[str, float], key: str) -> float | None:
    """``key`` itself, or the mean of ``{method}/c*/{rest}`` for ``key = {method}/{rest}``."""
    if key in metrics:
        return metrics[key]
    method, _, rest = key.partition("/")
    vals = [v for k, v in metrics.items() if k.startswith(f"{method}/c") and k.split("/", 2)[1][1:].isdigit()
            and k.split("/", 2)[2] == rest]
    return sum(vals) / len(vals) if vals else None


@dataclass
class SweepResult:
    rows: list[dict] = field(default_factory=list)  # one per trial: value, metric, status, run id
    failed: int = 0
    run_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def collect(grid, settings) -> SweepResult:
    out = SweepResult()
    for res in grid:
        value = res.config.get("value") if res.config else None
        metrics = res.metrics or {}
        if res.error is not None:
            out.failed += 1
            first = str(res.error).strip().splitlines()
            msg = next((ln for ln in reversed(first) if "Error" in ln), first[-1] if first else "error")
            out.rows.append({"value": value, "metric": math.nan, "status": "failed", "error": msg[:300],
                             "run_id": metrics.get("mlflow_run_id", "")})
            continue
        m = metrics.get(settings.metric, math.nan)
        stopped = "trial_compute_s" not in metrics  # a scheduler stopped it before its final report
        out.rows.append({"value": value, "metric": float(m) if m is not None else math.nan,
                         "status": "stopped early" if stopped else "ok", "run_id": metrics.get("mlflow_run_id", ""),
                         "compute_s": metrics.get("trial_compute_s", math.nan),
                         "ray_s": metrics.get("time_total_s", math.nan)})
    sign = 1 if settings.mode == "min" else -1
    out.rows.sort(key=lambda r: (r["status"] != "ok", sign * r["metric"] if math.isfinite(r["metric"]) else math.inf))
    return out


def table_text(rows: list[dict], param: str, metric: str) -> str:
    lines = [f"| {param} | {metric} | status | MLflow run |", "|---|---|---|---|"]
    for r in rows:
        m = f"{r['metric']:.4g}" if math.isfinite(r["metric"]) else "–"
        lines.append(f"| {r['value']} | {m} | {r['status']}{': ' + r['error'] if r.get('error') else ''} "
                     f"| {r.get('run_id', '')} |")
    return "\n".join(lines)


def metric_plot(rows: list[dict], param: str, metric: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = all(isinstance(r["value"], (int, float)) for r in rows)
    pts = sorted(rows, key=lambda r: r["value"]) if numeric else rows
    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    xs = [r["value"] if numeric else str(r["value"]) for r in pts]
    ax.plot(xs, [r["metric"] for r in pts], "o-")
    if numeric and all(x > 0 for x in xs) and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.set(xlabel=param, ylabel=metric, title=f"sweep of {param}")
    return fig
