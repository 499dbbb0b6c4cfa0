"""dlsm.report.frontier on synthetic seed runs with known answers: which points beat base and scaling on both axes
(paired over seeds), the table's marks, the figure's points, and missing metrics as one-line errors."""

from __future__ import annotations

import pytest

from dlsm.errors import ConfigError
from dlsm.report.frontier import (
    Axis,
    beats,
    closest_point,
    frontier_figure,
    frontier_points,
    frontier_table,
    parse_sampling_methods,
)
from dlsm.report.stats import paired_ci

X = Axis("cw/fid.evaluator", "CW-FID", higher_is_better=False)
Y = Axis("cw/recall.evaluator", "CW-recall", higher_is_better=True)
METHODS = {"base": ("ce", 1.0), "scaling": ("ce", 10.0), "good": ("total", 3.0), "half": ("total", 1.0)}


def _runs() -> list[dict[str, float]]:
    """Three seeds with seed effects shared by every method (+-5 on FID, +-0.1 on recall):
    'good' is better than base and scaling on both axes on every seed by a fixed margin; 'half' has a lower FID
    than both but a recall between them."""
    runs = []
    for shift in (-5.0, 0.0, 5.0):
        r = shift / 50
        m = {"base": (30.0, 0.80), "scaling": (20.0, 0.60), "good": (18.0, 0.85), "half": (19.0, 0.70)}
        runs.append({f"{k}/{X.key}": fid + shift for k, (fid, _) in m.items()}
                    | {f"{k}/{Y.key}": rec + r for k, (_, rec) in m.items()})
    return runs


def test_points_carry_classifier_alpha_and_seed_means():
    pts = {p.method: p for p in frontier_points(_runs(), METHODS, X, Y)}
    assert pts["good"].classifier == "total" and pts["good"].alpha == 3.0
    assert pts["base"].x.mean == pytest.approx(30.0) and pts["base"].y.n == 3
    assert pts["base"].x.half_width > 5  # the seed effect makes unpaired intervals wide


def test_beats_is_paired_over_seeds():
    runs = _runs()
    verdict, diff = beats(runs, "good", "base", X)
    assert verdict == "agrees" and diff.mean == pytest.approx(-12.0) and diff.half_width == pytest.approx(0.0, abs=1e-9)
    expected = paired_ci([r[f"half/{Y.key}"] for r in runs], [r[f"base/{Y.key}"] for r in runs])
    assert beats(runs, "half", "base", Y) == ("does not", expected)
    assert beats(runs, "half", "scaling", Y)[0] == "agrees"


def test_table_marks_only_the_point_that_beats_both_baselines_on_both_axes():
    runs = _runs()
    table = frontier_table(runs, frontier_points(runs, METHODS, X, Y), X, Y)
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in table.splitlines()[2:]}
    assert set(rows) == {"base", "scaling", "good **(beats all)**", "half"}
    assert rows["good **(beats all)**"][-2:] == ["yes", "yes"]
    assert rows["half"][-2:] == ["no", "yes"]  # below base on recall; better than scaling on both
    assert rows["base"][-2:] == ["—", "no"]


def test_figure_has_one_marker_per_point_and_names_the_paper_methods():
    runs = _runs()
    fig = frontier_figure(frontier_points(runs, METHODS, X, Y), X, Y)
    ax = fig.axes[0]
    assert len(ax.containers) == len(METHODS)  # one errorbar per point
    names = {t.get_text() for t in ax.texts}
    assert {"base (α1)", "scaling (α10)"} <= names and "α3" in names and not any("ours" in n for n in names)


def test_missing_metrics_and_baselines_are_one_line_errors():
    runs = _runs()
    with pytest.raises(ConfigError, match="seed run 0 has no metric ours/cw/fid.evaluator"):
        frontier_points(runs, {**METHODS, "ours": ("total", 1.0)}, X, Y)
    pts = frontier_points(runs, {"good": ("total", 3.0), "base": ("ce", 1.0)}, X, Y)
    with pytest.raises(ConfigError, match="baseline scaling is not among the sampled methods"):
        frontier_table(runs, pts, X, Y)


def test_sampling_methods_with_guidance_references_and_macros_are_read_back():
    text = ("{'base': ('ce', 1.0), 'scaling': ('ce', %SCALING_ALPHA), "
            "'above0.1': ('ce', @above0_1/interval_guidance()), 'entropy_ce': ('ce', @entropy_guidance())}")
    got = parse_sampling_methods(text, {"SCALING_ALPHA": "10.0"})
    assert got == {"base": ("ce", 1.0), "scaling": ("ce", 10.0), "above0.1": ("ce", "above0_1/interval_guidance"),
                   "entropy_ce": ("ce", "entropy_guidance")}
    with pytest.raises(ConfigError, match="cannot read experiment.sampling_methods"):
        parse_sampling_methods("{'base': ('ce', %UNKNOWN)}")


def test_schedule_points_are_labelled_by_name_and_the_closest_point_is_the_one_with_the_best_worst_margin():
    runs = _runs()
    methods = {**METHODS, "good": ("total", "mid/interval_guidance")}
    pts = {p.method: p for p in frontier_points(runs, methods, X, Y)}
    assert pts["good"].alpha is None and pts["good"].label == "good" and pts["half"].label == "α1"
    assert "| good **(beats all)** | total | schedule |" in frontier_table(runs, list(pts.values()), X, Y)
    name, margins = closest_point(runs, list(pts.values()), X, Y)
    assert name == "good"  # 'half' is worse than base on recall; 'good' is better than both on both
    assert margins[("base", "CW-FID")].mean == pytest.approx(18.0 - 30.0)
    assert margins[("scaling", "CW-recall")].mean == pytest.approx(0.85 - 0.60)
    only_half = [p for p in pts.values() if p.method != "good"]
    assert closest_point(runs, only_half, X, Y)[0] == "half"
    assert closest_point(runs, [pts["base"], pts["scaling"]], X, Y) is None


def test_crowded_labels_do_not_overlap_and_fid_is_on_a_log_axis():
    """Nine points within 1 % of each other (the scaling corner): every label's box is apart from the others."""
    methods = {"base": ("ce", 1.0), "scaling": ("ce", 10.0)} | {f"p{i}": ("total", float(i)) for i in range(9)}
    runs = []
    for shift in (-0.5, 0.0, 0.5):
        m = {"base": (30.0, 0.80), "scaling": (2.0, 0.60)} | {f"p{i}": (2.0 + 0.01 * i, 0.6 + 0.001 * i)
                                                              for i in range(9)}
        runs.append({f"{k}/{X.key}": fid + shift for k, (fid, _) in m.items()}
                    | {f"{k}/{Y.key}": rec for k, (_, rec) in m.items()})
    fig = frontier_figure(frontier_points(runs, methods, X, Y), X, Y)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the labels' text, without leader lines
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert len(boxes) == len(methods) and not overlaps
    area = ax.get_window_extent(renderer)
    assert all(area.x0 <= b.x0 and b.x1 <= area.x1 and area.y0 <= b.y0 and b.y1 <= area.y1 for b in boxes)
