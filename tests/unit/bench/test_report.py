"""report.md, summary.json and the plots from hand-made results."""

import json

import pytest

from dirtune.bench.metrics import analyse_pair, compare_at_rate
from dirtune.bench.report import fmt_speedup, fmt_steps, write_report

BASE = [(0, 3.0), (10, 2.5), (20, 2.0), (30, 1.5), (40, 1.6)]   # best 1.5 at step 30
FAST = [(0, 3.0), (10, 2.0), (20, 1.5), (30, 1.4), (40, 1.3)]   # 1.5 at step 20: 30/20 = 1.5x
HALF = [(0, 3.0), (10, 2.0), (15, 1.5), (30, 1.4), (40, 1.3)]   # 1.5 at step 15: 30/15 = 2x
SLOW = [(0, 3.0), (10, 2.8), (20, 2.6), (30, 2.4), (40, 2.2)]   # never


def _run(curve, seed, forget_end=2.2, angle=True, metric=None, sets=None):
    summary = {"final_eval_loss": curve[-1][1], "best_eval_loss": min(v for _, v in curve),
               "best_step": min(curve, key=lambda p: (p[1], p[0]))[0],
               "test_loss": curve[-1][1] + 0.05, "forget_loss_start": 2.0,
               "forget_loss_end": forget_end}
    if sets:
        summary["forget"] = sets
    return {"dir": f"/res/runs/x/s{seed}", "curve": curve, "error": None, "metric": metric,
            "forget_curve": [(0, 2.0), (30, 2.1)], "diverged": False,
            "angle": [(10, 1.0), (20, 2.0)] if angle else [], "summary": summary}


def _results(angle=True, metric="none", sets=None, edge_reason="largest rate of the grid; "
             "grid not extended: no runs at 0.009 in this folder"):
    methods = {
        "adamw": {"chosen_lr": 1e-3, "tuning": [{"lr": 1e-3, "best_loss": {0: 1.5}, "score": 1.5},
                                                 {"lr": 3e-3, "best_loss": {0: None}, "score": None,
                                                  "diverged": True,
                                                  "errors": {0: "NonFiniteError: nan loss"}}],
                  "runs": {s: _run(BASE, s, angle=angle, metric=0.25, sets=sets) for s in (0, 1, 2)}},
        "anchored": {"chosen_lr": 3e-3,
                     "tuning": [{"lr": 1e-3, "best_loss": {0: 1.5}, "score": 1.5},
                                {"lr": 3e-3, "best_loss": {0: 1.3}, "score": 1.3}],
                     "runs": {0: _run(HALF, 0, 2.05, angle, sets=sets),
                              1: _run(HALF, 1, 2.05, angle, sets=sets),
                              2: _run(FAST, 2, 2.05, angle, sets=sets)}},
        "slow": {"chosen_lr": 1e-3, "tuning": [{"lr": 1e-3, "best_loss": {0: 2.2}, "score": 2.2},
                                                {"lr": 3e-3, "best_loss": {0: 2.5}, "score": 2.5}],
                 "runs": {0: _run(SLOW, 0, angle=angle, sets=sets), 1: _run(SLOW, 1, angle=angle, sets=sets),
                          2: {"dir": "/res/runs/x/s2", "curve": [], "angle": [], "forget_curve": [],
                              "summary": None, "metric": None, "error": "RuntimeError: boom",
                              "diverged": False}}},
    }
    for m, r in methods.items():
        failed = r is methods["anchored"]
        r["edge"] = {"edge": failed, "sides": ["up"] if failed else [],
                     "reason": edge_reason if failed else None}
    # the tune runs at each rate (seed 0): each method's curve at its chosen rate, and at the
    # other rate a copy of SLOW (adamw diverged at 3e-3)
    at = {}
    for lr in (1e-3, 3e-3):
        runs = {m: {0: (r["runs"][0] if r["chosen_lr"] == lr else _run(SLOW, 0))} for m, r in methods.items()}
        if lr == 3e-3:
            runs["adamw"] = {0: {"curve": [], "summary": None, "metric": None, "diverged": True}}
        at[lr] = compare_at_rate(runs, "adamw")
    bench = {"name": "hand", "baseline": "adamw", "lrs": [1e-3, 3e-3], "tune_seeds": [0],
             "seeds": [0, 1, 2], "max_steps": 40, "eval_every": 10, "max_grid_extensions": 2,
             "grid_step": None,
             "methods": {"adamw": [], "anchored": ["optimizer.name=balanced_adamw"], "slow": []},
             "pairs": {"p": []}}
    grid = {"lrs": [1e-3, 3e-3], "base_lrs": [1e-3, 3e-3], "extensions": {"down": 0, "up": 0},
            "added": [], "blocked": {"up": "grid not extended: no runs at 0.009 in this folder"},
            "missing_runs": 0}
    return {"bench": bench, "pairs": {"p": {"metric": metric, "methods": methods, "grid": grid,
                                            "at_rates": at,
                                            "analysis": analyse_pair(methods, "adamw")}}}


def _rows(md: str, heading: str) -> dict[str, str]:
    """The rows of the first table after `heading`, by their first cell."""
    part = md.split(heading, 1)[1]
    table = [line for line in part.split("\n\n| ", 1)[1].split("\n\n")[0].splitlines()]
    return {line.strip("| ").split(" | ")[0]: line for line in ["| " + table[0]] + table[1:]}


def test_report_tables_hold_the_expected_numbers(tmp_path):
    write_report(tmp_path, _results())
    md = (tmp_path / "report.md").read_text()
    assert md.index("## How to read this") < md.index("## At a glance") < md.index("## p")
    assert "Target T = **1.5000**" in md and "3/3 adamw seeds reach it" in md
    rows = _rows(md, "### Tuned comparison")
    assert "| 15 [15–20] | 2.00× [1.50–2.00] |" in rows["anchored"]
    assert "| 30 [30–30] | 1.00× [1.00–1.00] |" in rows["adamw"]
    assert "not reached (0/3)" in rows["slow"] and "| – |" in rows["slow"]
    assert "+0.0500" in rows["anchored"] and "+0.2000" in rows["adamw"]
    assert "| 1.3000 | 1.3500 |" in rows["anchored"]  # final val loss, test loss medians
    assert "| anchored | 0.003 | **FAILED** |" in rows["anchored"]
    assert "| adamw | 0.001 | ok |" in rows["adamw"]
    assert ("- **FAILED: anchored** (chosen lr 0.003): largest rate of the grid; grid not extended: "
            "no runs at 0.009 in this folder") in md
    assert "| p | 1.5000 | **FAILED** (1/3 methods on the edge) |" in md  # at a glance
    assert "slow seed 2 failed: RuntimeError: boom" in md
    assert "adamw tuning run lr 0.003 seed 0 diverged (no finite loss): NonFiniteError: nan loss" in md
    for name in ("val_loss_p.png", "rates_p.png", "angle_p.png", "tradeoff_p.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in md


def test_speed_along_the_curve_tables(tmp_path):
    write_report(tmp_path, _results())
    md = (tmp_path / "report.md").read_text()
    # L0 = 3, T = 1.5: 50% -> 2.25, adamw at 20 (2.0); HALF/FAST at 10 (2.0): 2x
    assert "### Speed along the curve (L0 = 3.0000, T = 1.5000)" in md
    steps = _rows(md, "Steps to each fraction of the improvement")
    assert steps["method"].startswith("| method | 50% (≤ 2.2500) | 75% (≤ 1.8750) |")
    assert steps["adamw"].startswith("| adamw | 20 [20–20] | 30 [30–30] |")
    assert steps["anchored"].startswith("| anchored | 10 [10–10] | 15 [15–20] |")
    speed = _rows(md, "Speedup vs adamw, median")
    assert speed["anchored"].startswith("| anchored | 2.00× [2.00–2.00] | 2.00× [1.50–2.00] |")


def test_comparison_at_every_rate(tmp_path):
    write_report(tmp_path, _results())
    md = (tmp_path / "report.md").read_text()
    assert "### At every rate of the grid (tune seeds [0]" in md
    best = _rows(md, "Best validation loss, mean over tune seeds")
    assert best["adamw"] == "| adamw | **1.5000** | diverged |"
    assert best["anchored"] == "| anchored | 1.5000 | **1.3000** |"
    reach = _rows(md, "Steps to adamw's best loss *at the same rate*")
    # at 1e-3 adamw reaches its 1.5 at step 30; anchored ran SLOW there (never); at 3e-3 adamw
    # diverged: no reference
    assert reach["adamw"] == "| adamw | 30 · 1.00× | diverged |"
    assert reach["anchored"] == "| anchored | not reached | – |"
    res = _results()  # a tune run that failed (not diverged) says so in both tables
    res["pairs"]["p"]["methods"]["slow"]["tuning"][1].update(score=None, errors={0: "OOM"})
    write_report(tmp_path, res)
    md = (tmp_path / "report.md").read_text()
    assert _rows(md, "Best validation loss, mean over")["slow"] == "| slow | **2.2000** | failed |"
    assert _rows(md, "Steps to adamw's best loss")["slow"] == "| slow | not reached | failed |"


def test_overtraining_and_forgetting_tables(tmp_path):
    sets = {"wiki": {"start": 3.0, "end": 3.3, "at_best": 3.1}, "code": {"start": 1.0, "end": 1.2}}
    write_report(tmp_path, _results(sets=sets))
    md = (tmp_path / "report.md").read_text()
    over = _rows(md, "### Overtraining")
    assert over["adamw"] == "| adamw | 1.5000 | 1.6000 | +0.1000 | 1.6500 | not recorded |"
    forget = _rows(md, "### Forgetting")
    assert forget["method"] == "| method | wiki: end | wiki: at best | code: end | code: at best |"
    assert forget["adamw"] == "| adamw | +0.3000 | +0.1000 | +0.2000 | – |"
    wide = (tmp_path / "tradeoff_p.png").read_bytes()
    write_report(tmp_path, _results())  # legacy runs: one set, `source`
    md = (tmp_path / "report.md").read_text()
    assert _rows(md, "### Forgetting")["adamw"] == "| adamw | +0.2000 | +0.1000 |"
    narrow = (tmp_path / "tradeoff_p.png").read_bytes()
    width = lambda png: int.from_bytes(png[16:20], "big")  # noqa: E731 - PNG IHDR width
    assert width(wide) > 1.6 * width(narrow)  # one panel per forget set


def test_summary_json_numbers(tmp_path):
    write_report(tmp_path, _results())
    s = json.loads((tmp_path / "summary.json").read_text())
    p = s["pairs"]["p"]
    assert s["protocol"] == 2 and p["target"] == 1.5 and s["bench"]["max_steps"] == 40
    assert p["start_loss"] == 3.0 and p["fraction_targets"]["0.5"] == 2.25
    a = p["methods"]["anchored"]
    assert a["chosen_lr"] == 3e-3 and a["edge"] is True and a["edge_sides"] == ["up"]
    assert "grid not extended" in a["edge_reason"] and p["methods"]["adamw"]["edge"] is False
    assert a["steps_to_target"] == {"0": 15, "1": 15, "2": 20}
    assert a["speedup"]["median"] == 2.0 and a["fractions"]["0.5"]["speedup"]["median"] == 2.0
    assert a["forgetting"]["0"] == pytest.approx(0.05)
    # adamw's best step (30) is on the forget curve, anchored's (40) is not
    assert p["methods"]["adamw"]["forget_sets"]["source"]["at_best_median"] == pytest.approx(0.1)
    assert a["forget_sets"]["source"]["at_best_median"] is None
    assert a["final_loss"]["2"] == 1.3 and a["best_loss"]["0"] == 1.3
    assert a["overtrain_gap_median"] == 0.0 and a["runs"]["0"] == "/res/runs/x/s0"
    slow = p["methods"]["slow"]
    assert slow["steps_to_target"] == {"0": None, "1": None, "2": None}
    assert slow["speedup"]["median"] is None and slow["failed"] == [2]
    assert p["methods"]["adamw"]["tuning"][1]["score"] is None
    assert p["at_rates"]["0.003"]["methods"]["adamw"]["diverged"] is True
    assert p["grid"]["blocked"]["up"].startswith("grid not extended")


def test_run_folders_are_written_relative_to_the_results_folder(tmp_path):
    res = _results()
    for r in res["pairs"]["p"]["methods"].values():
        for s, run in r["runs"].items():
            run["dir"] = str(tmp_path / "runs" / "p" / f"s{s}")
    write_report(tmp_path, res)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["pairs"]["p"]["methods"]["adamw"]["runs"]["1"] == "runs/p/s1"


def test_metric_column_and_missing_plots(tmp_path):
    (tmp_path / "angle_p.png").write_bytes(b"stale")
    write_report(tmp_path, _results(angle=False, metric="gsm8k"))
    md = (tmp_path / "report.md").read_text()
    assert "gsm8k (exact match)" in md and "| 0.25 |" in md
    assert not (tmp_path / "angle_p.png").exists()  # no angle data: no (stale) picture
    assert "angle_p.png" not in md


def test_an_incomplete_pair_says_so(tmp_path):
    res = _results()
    res["pairs"]["p"]["grid"]["missing_runs"] = 4
    write_report(tmp_path, res)
    assert "**This pair is not complete**: 4 of its runs are missing" in (tmp_path / "report.md").read_text()


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
