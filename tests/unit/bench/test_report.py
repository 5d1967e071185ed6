"""report.md, summary.json and the plots from hand-made results."""

import json

import pytest

from dirtune.bench.metrics import analyse_pair
from dirtune.bench.report import fmt_speedup, fmt_steps, write_report

BASE = [(0, 3.0), (10, 2.5), (20, 2.0), (30, 1.5), (40, 1.6)]   # best 1.5 at step 30
FAST = [(0, 3.0), (10, 2.0), (20, 1.5), (30, 1.4), (40, 1.3)]   # 1.5 at step 20: 30/20 = 1.5x
HALF = [(0, 3.0), (10, 2.0), (15, 1.5), (30, 1.4), (40, 1.3)]   # 1.5 at step 15: 30/15 = 2x
SLOW = [(0, 3.0), (10, 2.8), (20, 2.6), (30, 2.4), (40, 2.2)]   # never


def _run(curve, seed, forget_end=2.2, angle=True, metric=None):
    return {"dir": f"runs/x/s{seed}", "curve": curve, "error": None, "metric": metric,
            "forget_curve": [], "angle": [(10, 1.0), (20, 2.0)] if angle else [],
            "summary": {"final_eval_loss": curve[-1][1], "best_eval_loss": min(v for _, v in curve),
                        "test_loss": curve[-1][1] + 0.05, "forget_loss_start": 2.0,
                        "forget_loss_end": forget_end}}


def _results(angle=True, metric="none"):
    methods = {
        "adamw": {"chosen_lr": 1e-3, "tuning": [{"lr": 1e-3, "best_loss": {0: 1.5}, "score": 1.5},
                                                 {"lr": 3e-3, "best_loss": {0: None}, "score": None,
                                                  "errors": {0: "ValueError: nan loss"}}],
                  "runs": {s: _run(BASE, s, angle=angle, metric=0.25) for s in (0, 1, 2)}},
        "anchored": {"chosen_lr": 3e-3,
                     "tuning": [{"lr": 1e-3, "best_loss": {0: 1.5}, "score": 1.5},
                                {"lr": 3e-3, "best_loss": {0: 1.3}, "score": 1.3}],
                     "runs": {0: _run(HALF, 0, 2.05, angle), 1: _run(HALF, 1, 2.05, angle),
                              2: _run(FAST, 2, 2.05, angle)}},
        "slow": {"chosen_lr": 1e-3, "tuning": [{"lr": 1e-3, "best_loss": {0: 2.2}, "score": 2.2},
                                                {"lr": 3e-3, "best_loss": {0: 2.5}, "score": 2.5}],
                 "runs": {0: _run(SLOW, 0, angle=angle), 1: _run(SLOW, 1, angle=angle),
                          2: {"dir": "runs/x/s2", "curve": [], "angle": [], "forget_curve": [],
                              "summary": None, "metric": None, "error": "RuntimeError: boom"}}},
    }
    bench = {"name": "hand", "baseline": "adamw", "lrs": [1e-3, 3e-3], "tune_seeds": [0],
             "seeds": [0, 1, 2], "max_steps": 40, "eval_every": 10,
             "methods": {"adamw": [], "anchored": ["optimizer.name=balanced_adamw"], "slow": []},
             "pairs": {"p": []}}
    return {"bench": bench, "pairs": {"p": {"metric": metric, "methods": methods,
                                            "analysis": analyse_pair(methods, "adamw")}}}


def test_report_tables_hold_the_expected_numbers(tmp_path):
    write_report(tmp_path, _results())
    md = (tmp_path / "report.md").read_text()
    assert "Target T = **1.5000**" in md and "3/3 adamw seeds reach it" in md
    main_table = [line for line in md.splitlines()
                  if line.startswith("| ") and ("×" in line or "not reached" in line)]
    rows = {line.split(" | ")[0].strip("| "): line for line in main_table}
    assert len(rows) == 3
    assert "| 15 [15–20] | 2.00× [1.50–2.00] |" in rows["anchored"]
    assert "| 30 [30–30] | 1.00× [1.00–1.00] |" in rows["adamw"]
    assert "not reached (0/3)" in rows["slow"] and "| – |" in rows["slow"]
    assert "+0.0500" in rows["anchored"] and "+0.2000" in rows["adamw"]
    assert "| 1.3000 | 1.3500 |" in rows["anchored"]  # final val loss, test loss medians
    assert "slow seed 2 failed: RuntimeError: boom" in md
    assert "adamw tuning run lr 0.003 seed 0 failed: ValueError: nan loss" in md
    assert "**1.3000**" in md  # the chosen lr's score in the sweep table
    assert "at the edge of the grid" in md
    for name in ("val_loss_p.png", "angle_p.png", "tradeoff_p.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in md


def test_summary_json_numbers(tmp_path):
    write_report(tmp_path, _results())
    s = json.loads((tmp_path / "summary.json").read_text())
    p = s["pairs"]["p"]
    assert p["target"] == 1.5 and s["bench"]["max_steps"] == 40
    a = p["methods"]["anchored"]
    assert a["chosen_lr"] == 3e-3
    assert a["steps_to_target"] == {"0": 15, "1": 15, "2": 20}
    assert a["speedup"]["median"] == 2.0
    assert a["forgetting"]["0"] == pytest.approx(0.05)
    assert a["final_loss"]["2"] == 1.3 and a["best_loss"]["0"] == 1.3
    slow = p["methods"]["slow"]
    assert slow["steps_to_target"] == {"0": None, "1": None, "2": None}
    assert slow["speedup"]["median"] is None and slow["failed"] == [2]
    assert p["methods"]["adamw"]["tuning"][1]["score"] is None


def test_metric_column_and_missing_plots(tmp_path):
    (tmp_path / "angle_p.png").write_bytes(b"stale")
    write_report(tmp_path, _results(angle=False, metric="gsm8k"))
    md = (tmp_path / "report.md").read_text()
    assert "gsm8k (exact match)" in md and "| 0.25 |" in md
    assert not (tmp_path / "angle_p.png").exists()  # no angle data: no (stale) picture
    assert "angle_p.png" not in md


@pytest.mark.parametrize("summary, text", [
    ({"median": 20, "min": 10, "max": 30, "reached": 3, "n": 3}, "20 [10–30]"),
    ({"median": 30, "min": 10, "max": None, "reached": 2, "n": 3}, "30 [10–never] (2/3 reached)"),
    ({"median": None, "min": 10, "max": None, "reached": 1, "n": 3}, "not reached (1/3)"),
    ({"median": None, "min": None, "max": None, "reached": 0, "n": 0}, "no runs"),
])
def test_fmt_steps(summary, text):
    assert fmt_steps(summary) == text


def test_fmt_speedup():
    assert fmt_speedup(None) == "–"
    assert fmt_speedup({"median": None, "min": 2.0, "max": 2.0, "defined": 1}) == "–"
    assert fmt_speedup({"median": 2.0, "min": None, "max": None, "defined": 0}) == "2.00×"
    assert fmt_speedup({"median": float("inf"), "min": 1.5, "max": float("inf"),
                        "defined": 2}) == "∞× [1.50–∞]"
