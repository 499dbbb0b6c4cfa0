"""The report's claim checks (dlsm.report) follow the numbers: synthetic metrics where each claim holds and
where it does not, and the verdict must flip with them (the wording alone proves nothing)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlsm.report.moons import _claims_table1, _figure5_text

SIGMAS = ("0.5", "7.5")
POINTS = ("", "_grid")


class FakeRun:
    """What the claim checks read from a finished parent run: metrics, shapes, stage-2 histories."""

    def __init__(self, metrics: dict[str, float], shape: str = "mlp", histories: dict | None = None) -> None:
        self.metrics, self._shape, self.params = metrics, shape, {}
        self.histories = histories or {}
        self.children = {stage: SimpleNamespace(data=SimpleNamespace(metrics={k: 0.0 for k in per}))
                         for stage, per in self.histories.items()}

    def shapes(self) -> list[str]:
        return [self._shape]

    def history(self, stage: str, key: str) -> list[tuple[int, float]]:
        return self.histories.get(stage, {}).get(key, [])


def _keys(stem: str) -> list[str]:
    return [f"c{c}/{stem}{pts}/s{s}" for c in (0, 1) for pts in POINTS for s in SIGMAS]


def _score_metrics(ours: dict[str, float], base: dict[str, float], shape: str = "mlp") -> dict[str, float]:
    m = {f"ours-{shape}/{k}": v for k, v in ours.items()}
    m.update({f"base-{shape}/{k}": v for k, v in base.items()})
    return m


def _line(lines: list[str], needle: str) -> str:
    (found,) = [ln for ln in lines if needle in ln]
    return found


def _verdict(line: str) -> str:
    return re.search(r"comparisons: \*\*(.+?)\*\*", line).group(1)


@pytest.mark.parametrize(
    ("ours_minus_base", "verdict", "wins"),
    [
        ([-1.0] * 8, "agrees", 8),  # ours lower everywhere
        ([+1.0] * 8, "does not agree", 0),  # ours higher everywhere
        ([-1.0] * 5 + [+1.0] * 3, "mostly agrees", 5),
        ([-1.0] * 4 + [+1.0] * 4, "does not agree", 4),  # a tie is not "mostly"
        ([-1.0] * 7 + [0.0], "mostly agrees", 7),  # equal is not lower
    ],
)
def test_ours_vs_base_verdict_flips_with_the_numbers(ours_minus_base, verdict, wins):
    keys = _keys("D_L")
    base = {k: 2.0 for k in keys}
    ours = {k: 2.0 + d for k, d in zip(keys, ours_minus_base, strict=True)}
    lines = _claims_table1(FakeRun(_score_metrics(ours, base)))
    line = _line(lines, "E[D_L] ours (Total) < base (CE)")
    assert _verdict(line) == verdict
    assert f"**{wins} of 8**" in line
    not_lower = sorted(k for k, d in zip(keys, ours_minus_base, strict=True) if d >= 0)
    if not_lower:
        assert line.rstrip(".").endswith("not lower at: " + ", ".join(not_lower))
    else:
        assert "not lower at" not in line


@settings(max_examples=30, deadline=None, derandomize=True)
@given(vals=st.lists(st.tuples(st.floats(0.01, 10.0), st.floats(0.01, 10.0)), min_size=8, max_size=8))
def test_ours_vs_base_count_is_the_number_of_lower_values(vals):
    keys = _keys("D_P")
    ours = {k: a for k, (a, _) in zip(keys, vals, strict=True)}
    base = {k: b for k, (_, b) in zip(keys, vals, strict=True)}
    line = _line(_claims_table1(FakeRun(_score_metrics(ours, base))), "E[D_P] ours (Total) < base (CE)")
    wins = sum(a < b for a, b in vals)
    assert f"**{wins} of 8**" in line
    assert _verdict(line) == ("agrees" if wins == 8 else "mostly agrees" if wins > 4 else "does not agree")


def _scaling_metrics(recall_gap: float, sw_gap: float, dp_gap: float) -> dict[str, float]:
    m = {}
    for k in _keys("D_P"):
        m[f"base-mlp/{k}"] = 1.0
        m[f"scaling-mlp/{k}"] = 1.0 + dp_gap
    for c in (0, 1):
        m[f"base-mlp/c{c}/recall"], m[f"scaling-mlp/c{c}/recall"] = 0.9, 0.9 + recall_gap
        m[f"base-mlp/c{c}/sw1"], m[f"scaling-mlp/c{c}/sw1"] = 2.0, 2.0 + sw_gap
    return m


@pytest.mark.parametrize(("recall_gap", "sw_gap", "dp_gap", "rec_word", "sw_word", "raised"), [
    (-0.1, +0.5, +0.3, "**lower**", "**higher** (worse)", 8),  # the paper's claim: scaling hurts diversity
    (+0.05, -0.5, -0.3, "**not lower** in both classes", "**not higher** in both classes", 0),
])
def test_scaling_claim_verdict_flips_with_the_numbers(recall_gap, sw_gap, dp_gap, rec_word, sw_word, raised):
    line = _line(_claims_table1(FakeRun(_scaling_metrics(recall_gap, sw_gap, dp_gap))), "scaling raises E[D_P]")
    assert f"**{raised} of 8**" in line
    assert f"— {rec_word};" in line and line.endswith(f"— {sw_word}.")
    assert f"c1 {0.9 + recall_gap:.4f} vs 0.9000" in line


def _oracle_metrics(precision: float, recall: float, sw1: float, sw_hi: float = 1.0) -> dict[str, float]:
    m = {}
    for c in (0, 1):
        m.update({f"oracle/c{c}/precision": precision, f"oracle/c{c}/recall": recall, f"oracle/c{c}/sw1": sw1,
                  f"data/c{c}/sw1_lo": 0.5, f"data/c{c}/sw1_hi": sw_hi})
    return m


@pytest.mark.parametrize(("precision", "recall", "sw1", "verdict"), [
    (0.99, 0.98, 0.8, "**passes**"),
    (0.94, 0.99, 0.8, "**fails**: precision or recall ≤ 0.95"),
    (0.99, 0.95, 0.8, "**fails**"),  # 0.95 is not > 0.95
    (0.99, 0.99, 1.2, "SW1 is **above** the exact samples' range for c1, c2"),
])
def test_oracle_check_verdict_flips_with_the_numbers(precision, recall, sw1, verdict):
    line = _line(_claims_table1(FakeRun(_oracle_metrics(precision, recall, sw1))), "Sampler and metric check")
    assert verdict in line.split(" — ")[-1]


def _curve(start: float, end: float, n: int = 4) -> list[tuple[int, float]]:
    return [(10 * i, start + (end - start) * i / (n - 1)) for i in range(n)]


def _ablation(ce_end: float, total_end: float, ce_key: str = "track/D_L/s7.5") -> FakeRun:
    hist = {}
    for seed in (0, 1):
        hist[f"stage2-ce-mlp-seed{seed}"] = {ce_key: _curve(1.0, ce_end)}
        hist[f"stage2-dlsm-mlp-seed{seed}"] = {ce_key: _curve(1.0, 0.8)}
        hist[f"stage2-total-mlp-seed{seed}"] = {ce_key: _curve(1.0, total_end)}
    return FakeRun({}, histories=hist)


@pytest.mark.parametrize(("ce_end", "total_end", "rises", "total_lower"), [
    (1.5, 0.7, "**rises**", "**yes**"),  # Figure 5's claim: CE alone drifts away, Total does not
    (0.6, 0.7, "**does not rise**", "**no**"),
    (1.5, 1.6, "**rises**", "**no**"),
])
def test_figure5_likelihood_error_claim_follows_the_curves(ce_end, total_end, rises, total_lower):
    text = "\n".join(_figure5_text(_ablation(ce_end, total_end)))
    line = _line(text.splitlines(), "`track/D_L/s7.5`: with CE alone")
    assert f"the score error {rises} over training (1 → {ce_end:.3g})" in line
    assert line.endswith(f"Final error Total < CE: {total_lower}.")


def test_figure5_stability_claim_follows_the_curves():
    """Total is 'more stable' than DLSM' alone when both its final rise above its minimum and its
    final spread over seeds are smaller."""

    def run(total_rise: float, total_spread: float) -> FakeRun:
        hist = {}
        for seed, sign in ((0, -1), (1, 1)):
            hist[f"stage2-ce-mlp-seed{seed}"] = {"track/ce/s7.5": _curve(0.7, 0.5)}
            hist[f"stage2-dlsm-mlp-seed{seed}"] = {"track/ce/s7.5": [(0, 0.7), (10, 0.3), (20, 0.5 + sign * 0.1)]}
            hist[f"stage2-total-mlp-seed{seed}"] = {
                "track/ce/s7.5": [(0, 0.7), (10, 0.3), (20, 0.3 + total_rise + sign * total_spread)]}
        return FakeRun({}, histories=hist)

    def verdict(r: FakeRun) -> str:
        line = _line(_figure5_text(r), "`track/ce/s7.5`: rise of the mean CE")
        return re.search(r"Total more stable than DLSM' alone \(both smaller\): \*\*(\w+)\*\*", line).group(1)

    assert verdict(run(0.05, 0.01)) == "yes"  # rise 0.05 < 0.2, spread smaller
    assert verdict(run(0.3, 0.01)) == "no"  # rises more than DLSM'
    assert verdict(run(0.05, 0.2)) == "no"  # spread over seeds wider than DLSM'
