"""The bench's outputs: report.md (tables), summary.json (every number), PNG plots per pair
(report_plots.py).

Input: the results of `grid.run_bench`:
    {"bench": {name, baseline, lrs, max_grid_extensions, grid_step, tune_seeds, seeds,
               max_steps, eval_every, methods, pairs[, commit, report_commit]},
     "pairs": {pair: {"metric": "none"|"gsm8k",
                      "grid": PairPlan.info() (the pair's final grid, extensions, why not more),
                      "methods": {method: {"chosen_lr", "tuning": [{"lr", "best_loss", "score",
                                           "diverged", "errors"}], "edge": PairPlan.edge(),
                                           "runs": {seed: grid.read_run(...)}}},
                      "at_rates": {lr: metrics.compare_at_rate(...)},
                      "analysis": metrics.analyse_pair(...)}}}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from dirtune.bench.report_plots import plot_curves, plot_rates, plot_tradeoff

# ---------------------------------------------------------------- formatting


def _g(x: Optional[float], digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return "∞" if math.isinf(x) else f"{x:.{digits}g}"


def fmt_steps(s: dict) -> str:
    """'120 [80–200]', '120 [80–never] (2/3 reached)' or 'not reached (1/3)'."""
    if s["n"] == 0:
        return "no runs"
    if s["median"] is None:
        return f"not reached ({s['reached']}/{s['n']})"
    top = "never" if s["max"] is None else f"{s['max']:g}"
    text = f"{s['median']:g} [{s['min']:g}–{top}]"
    return text + (f" ({s['reached']}/{s['n']} reached)" if s["reached"] < s["n"] else "")


def fmt_speedup(s: Optional[dict]) -> str:
    """'2.00× [1.50–2.50]'; '–' when the method (or the target) is not reached."""
    if s is None or s["median"] is None:
        return "–"
    med = "∞" if math.isinf(s["median"]) else f"{s['median']:.2f}"
    if s["min"] is None:
        return f"{med}×"
    lo, hi = ("∞" if math.isinf(v) else f"{v:.2f}" for v in (s["min"], s["max"]))
    return f"{med}× [{lo}–{hi}]"


def _loss(x: Optional[float]) -> str:
    return "–" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.4f}"


def _signed(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:+.4f}"


def _pct(f: float) -> str:
    return f"{100 * f:g}%"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _grid_cell(edge: Optional[dict]) -> str:
    return "**FAILED**" if edge and edge["edge"] else "ok"


def _fastest(methods: dict, key, baseline: str) -> str:
    """The method with the highest median speedup over the baseline, if any beats 1.0."""
    best = max(((key(r)["median"], m) for m, r in methods.items()
                if m != baseline and key(r) and key(r)["median"] is not None), default=None)
    return f"{best[1]} {fmt_speedup({'median': best[0], 'min': None})}" if best and best[0] > 1 else "none"


# ---------------------------------------------------------------- report.md

HOW_TO_READ = """\
## How to read this

- One section per (source model, task) pair. Every method gets the same step budget and the
  same learning-rate grid; its rate is the one with the lowest best validation loss on the tune
  seeds, then it runs the final seeds at that rate. Numbers are medians over the final seeds,
  with [min–max] over seeds.
- **Target T**: {base}'s best validation loss (median over its seeds). **Steps to T**: the first
  evaluation at or below T ("never": a seed did not get there). **Speedup** = {base}'s median
  steps / the method's; its range is over per-seed ratios (seed s against {base}'s seed s).
- **Speed along the curve**: T_f = L0 − f·(L0 − T), the loss after a fraction f of {base}'s
  improvement from its step-0 loss L0 to T (100% is T). A method ahead early but caught up
  later shows a speedup at 50% and none at 100%.
- **Grid check**: a chosen rate on the smallest or largest rate of the grid means the best rate
  may lie outside it. The bench then adds a rate beyond that edge for every method of the pair
  (up to max_grid_extensions per side) and chooses again; a choice still on the edge is
  **FAILED**: that method's comparison is not a tuned one. A rate where a method diverged (no
  finite loss) bounds the grid.
- **At every rate**: each method against {base} *at the same rate* (tune seeds), next to the
  tuned comparison: a method can win at a rate too high for {base} and lose once both are tuned.
- **Overtraining**: best (early-stopped, the checkpoint kept) against final validation loss;
  the test loss is measured on the best checkpoint.
- **Forgetting**: change of the loss on text from the pretraining domain since step 0 (positive
  = forgot), at the end and at the best checkpoint, per forget set (`source`: the single
  data.forget_file of runs before named sets).
- "–": not measured (e.g. a task without a test split) or not defined (a target not reached).
"""


def _fractions(a: dict, base: str) -> list[str]:
    targets = a.get("fraction_targets")
    if not targets:
        return ["Speed along the curve: undefined (no target, or no step-0 evaluation of "
                f"{base}).", ""]
    fr = list(targets)
    head = ["method"] + [f"{_pct(f)} (≤ {targets[f]:.4f})" for f in fr]
    steps = [[m] + [fmt_steps(r["fractions"][f]["steps"]) for f in fr]
             for m, r in a["methods"].items()]
    speed = [[m] + [fmt_speedup(r["fractions"][f]["speedup"]) for f in fr]
             for m, r in a["methods"].items()]
    return ([f"### Speed along the curve (L0 = {a['start_loss']:.4f}, T = {a['target']:.4f})", "",
             "Steps to each fraction of the improvement, median [min–max] over seeds:", ""]
            + _table(head, steps) + [f"Speedup vs {base}, median [per-seed range]:", ""]
            + _table(head, speed))


def _at_rates(pair: dict, bench: dict) -> list[str]:
    rates, base = pair["grid"]["lrs"], bench["baseline"]
    added = {x["lr"] for x in pair["grid"].get("added", [])}
    head = ["method"] + [f"{lr:g}" + (" (added)" if lr in added else "") for lr in rates]
    loss_rows, reach_rows = [], []
    for m, r in pair["methods"].items():
        rows = {row["lr"]: row for row in r["tuning"]}
        cells = []
        for lr in rates:
            row = rows.get(lr) or {}
            text = ("diverged" if row.get("diverged") else "failed" if row.get("errors")
                    else _loss(row.get("score")))
            cells.append(f"**{text}**" if lr == r["chosen_lr"] else text)
        loss_rows.append([m] + cells)
        reach = []
        for lr in rates:
            c = pair["at_rates"][lr]["methods"][m]
            if c["diverged"]:
                reach.append("diverged")
            elif (rows.get(lr) or {}).get("errors") or lr not in rows:
                reach.append("failed")
            elif pair["at_rates"][lr]["target"] is None:
                reach.append("–")
            else:
                s = c["steps"]
                steps = (f"{s['median']:g}" if s["median"] is not None else "not reached")
                reach.append(steps + (f" ({s['reached']}/{s['n']})" if 0 < s["reached"] < s["n"] else "")
                             + (f" · {fmt_speedup(c['speedup']).split(' [')[0]}"
                                if s["median"] is not None else ""))
        reach_rows.append([m] + reach)
    targets = ", ".join(f"{lr:g}: {_loss(pair['at_rates'][lr]['target'])}" for lr in rates)
    seeds = bench["tune_seeds"]
    return ([f"### At every rate of the grid (tune seeds {seeds}, the runs the rate was chosen on)", "",
             f"Best validation loss, mean over tune seeds {seeds} (**bold** = the rate chosen):", ""]
            + _table(head, loss_rows)
            + [f"Steps to {base}'s best loss *at the same rate* · speedup vs {base} there "
               f"(median over tune seeds {seeds}; {base}'s best loss per rate: {targets}):", ""]
            + _table(head, reach_rows))


def _grid_lines(name: str, pair: dict) -> list[str]:
    g = pair["grid"]
    ext = ", ".join(f"{x['side']} to {x['lr']:g}" for x in g.get("added", [])) or "none"
    lines = [f"Learning-rate grid: {', '.join(f'{lr:g}' for lr in g['lrs'])} "
             f"(as given: {', '.join(f'{lr:g}' for lr in g['base_lrs'])}; extensions: {ext})."]
    if g.get("missing_runs"):
        lines += ["", f"**This pair is not complete**: {g['missing_runs']} of its runs are missing "
                  "(never started); its numbers use the runs there are."]
    failed = [(m, r) for m, r in pair["methods"].items() if r.get("edge") and r["edge"]["edge"]]
    if failed:
        lines += ["", f"Grid check: **FAILED** for {len(failed)} of {len(pair['methods'])} methods "
                  "(their comparison is not a tuned one):", ""]
        groups: dict[tuple, list[str]] = {}  # methods with the same rate and reason: one line
        for m, r in failed:
            groups.setdefault((r["chosen_lr"], r["edge"]["reason"]), []).append(m)
        lines += [f"- **FAILED: {', '.join(ms)}** (chosen lr {lr:g}): {reason}"
                  for (lr, reason), ms in groups.items()]
    else:
        lines += ["", "Grid check: ok (no chosen rate on an edge of the grid)."]
    return lines + [""]


def _overtraining(a: dict) -> list[str]:
    rows = [[m, _loss(r["best_loss_median"]), _loss(r["final_loss_median"]),
             _signed(r["overtrain_gap_median"]), _loss(r["test_loss_median"]),
             _g(r["epochs_median"], 3) if r["epochs_median"] is not None else "not recorded"]
            for m, r in a["methods"].items()]
    return (["### Overtraining", ""]
            + _table(["method", "best val loss", "final val loss", "final − best",
                      "test loss (best checkpoint)", "epochs in the budget"], rows))


def _forgetting(a: dict) -> list[str]:
    sets = list(dict.fromkeys(s for r in a["methods"].values() for s in r["forget_sets"]))
    if not sets:
        return ["Forgetting: not measured (no forget set).", ""]
    head = ["method"] + [h for s in sets for h in (f"{s}: end", f"{s}: at best")]
    rows = [[m] + [_signed((r["forget_sets"].get(s) or {}).get(k)) for s in sets
                   for k in ("end_median", "at_best_median")] for m, r in a["methods"].items()]
    return (["### Forgetting (Δ loss on each forget set since step 0; lower is better)", ""]
            + _table(head, rows))


def _pair_section(name: str, pair: dict, bench: dict) -> list[str]:
    a, base = pair["analysis"], bench["baseline"]
    n_base = len(pair["methods"].get(base, {}).get("runs", {}))
    lines = [f"## {name}", ""]
    if a["target"] is None:
        lines += [f"Target: none ({a['target_rule']}); steps and speedups are undefined.", ""]
    else:
        lines += [f"Target T = **{a['target']:.4f}**: {a['target_rule']}. "
                  f"{a['baseline_reached']}/{n_base} {base} seeds reach it.", ""]
    lines += _grid_lines(name, pair)
    metric = pair["metric"]
    first = next((s for r in a["methods"].values() for s in r["forget_sets"]), None)
    head = ["method", "lr", "grid", "steps to T: median [min–max]", f"speedup vs {base}",
            "final val loss", "test loss"]
    head += [f"{metric} (exact match)"] if metric != "none" else []
    head += [f"forgetting ({first}, end)"] if first else []
    rows = []
    for m, r in a["methods"].items():
        row = [m, _g(r["chosen_lr"], 3) if r["chosen_lr"] else "tuning failed",
               _grid_cell(pair["methods"][m].get("edge")), fmt_steps(r["steps"]),
               fmt_speedup(r["speedup"]), _loss(r["final_loss_median"]), _loss(r["test_loss_median"])]
        row += [_g(r["metric_median"], 3)] if metric != "none" else []
        row += [_signed((r["forget_sets"].get(first) or {}).get("end_median"))] if first else []
        rows.append(row)
    lines += [f"### Tuned comparison (each method at its chosen rate, seeds {bench['seeds']})", ""]
    lines += _table(head, rows)
    lines += _fractions(a, base) + _at_rates(pair, bench) + _overtraining(a) + _forgetting(a)
    notes = []
    for m, r in pair["methods"].items():
        for row in r["tuning"]:
            what = "diverged (no finite loss)" if row.get("diverged") else "failed"
            for s, err in (row.get("errors") or {}).items():
                notes.append(f"{m} tuning run lr {row['lr']:g} seed {s} {what}: {err}")
        for s, run in r["runs"].items():
            if run["summary"] is None:
                notes.append(f"{m} seed {s} failed: {run['error'] or 'no summary.json'} ({run['dir']})")
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    for kind in ("val_loss", "rates", "tradeoff", "angle"):
        if (pair.get("plots") or {}).get(kind):
            lines += [f"![{kind}]({kind}_{name}.png)", ""]
    return lines


def _glance(results: dict) -> list[str]:
    base = results["bench"]["baseline"]
    rows = []
    for name, pair in results["pairs"].items():
        a = pair["analysis"]
        n_edge = sum(bool(r.get("edge") and r["edge"]["edge"]) for r in pair["methods"].values())
        first = min(a["fraction_targets"]) if a["fraction_targets"] else None
        early = (_fastest(a["methods"], lambda r: r["fractions"][first]["speedup"], base)
                 if first is not None else "–")
        rows.append([name, _loss(a["target"]),
                     f"**FAILED** ({n_edge}/{len(pair['methods'])} methods on the edge)" if n_edge else "ok",
                     early, _fastest(a["methods"], lambda r: r["speedup"], base)])
    frac = "the first fraction"
    for pair in results["pairs"].values():
        if pair["analysis"]["fraction_targets"]:
            frac = _pct(min(pair["analysis"]["fraction_targets"]))
            break
    return (["## At a glance", ""]
            + _table(["pair", "target T", "grid check", f"fastest to {frac} of the improvement",
                      "fastest to T"], rows))


def render_markdown(results: dict) -> str:
    b = results["bench"]
    lines = [f"# Bench: {b['name']}", "", HOW_TO_READ.format(base=b["baseline"]), "## The bench", ""]
    if b.get("commit"):
        lines.append(f"- runs made by commit: {b['commit']}")
    if b.get("report_commit"):
        lines.append(f"- this report written from the runs in this folder (--report-only) by "
                     f"commit: {b['report_commit']}")
    step = f"ratio {b['grid_step']:g}" if b.get("grid_step") else "ratio of the two edge rates"
    lines += [f"- step budget: {b['max_steps']} optimizer steps; validation every {b['eval_every']} "
              "steps (and at step 0)",
              f"- learning-rate grid as given: {', '.join(f'{x:g}' for x in b['lrs'])}; extended per "
              f"pair at most {b.get('max_grid_extensions', 0)} time(s) per side ({step})",
              f"- tuning seeds: {b['tune_seeds']}; final seeds: {b['seeds']}; baseline: {b['baseline']}",
              "", "Methods:", ""]
    lines += [f"- **{m}**: {' '.join(o) or '(base config)'}" for m, o in b["methods"].items()] + [""]
    lines += _glance(results)
    for name, pair in results["pairs"].items():
        lines += _pair_section(name, pair, b)
    return "\n".join(lines)


# ---------------------------------------------------------------- summary.json

def _clean(x: Any) -> Any:
    """JSON-safe: NaN -> null, inf -> "inf", tuple -> list, keys -> str."""
    if isinstance(x, float):
        return None if math.isnan(x) else ("inf" if x == math.inf else "-inf" if x == -math.inf else x)
    if isinstance(x, dict):
        return {(f"{k:g}" if isinstance(k, float) else str(k)): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _rel(path: str, out: Optional[Path]) -> str:
    """A run folder relative to the results folder (portable), absolute if outside it."""
    if out is None:
        return path
    rel = os.path.relpath(path, out)
    return path if rel.startswith("..") else rel


def summary_dict(results: dict, out: Optional[Path] = None) -> dict:
    res = {"protocol": 2, "bench": results["bench"], "pairs": {}}
    for name, pair in results["pairs"].items():
        a = pair["analysis"]
        methods = {}
        for m, r in a["methods"].items():
            src = pair["methods"][m]
            edge = src.get("edge") or {"edge": False, "sides": [], "reason": None}
            methods[m] = {**r, "tuning": src["tuning"], "edge": edge["edge"],
                          "edge_sides": edge["sides"], "edge_reason": edge["reason"],
                          "runs": {s: _rel(run["dir"], out) for s, run in src["runs"].items()}}
        res["pairs"][name] = {"target": a["target"], "target_rule": a["target_rule"],
                              "baseline_reached": a["baseline_reached"], "metric": pair["metric"],
                              "start_loss": a["start_loss"], "fraction_targets": a["fraction_targets"],
                              "grid": pair["grid"], "at_rates": pair["at_rates"], "methods": methods}
    return _clean(res)


# ---------------------------------------------------------------- entry

def commit_line(text: str) -> str:
    """commit.txt's text as one line: '<sha>' or '<sha> (with uncommitted changes)'."""
    info = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    dirty = " (with uncommitted changes)" if info.get("dirty") == "true" else ""
    return info.get("commit", "unknown") + dirty


def write_report(out_dir: str | Path, results: dict) -> Path:
    """Write report.md, summary.json and the plots of every pair into out_dir; return report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    commit = out / "commit.txt"
    if commit.is_file() and "commit" not in results["bench"]:
        results["bench"]["commit"] = commit_line(commit.read_text())
    base = results["bench"]["baseline"]
    for name, pair in results["pairs"].items():
        target = pair["analysis"]["target"]
        pair["plots"] = {
            "val_loss": plot_curves(out / f"val_loss_{name}.png", pair, "curve",
                                    f"{name}: validation loss at each method's chosen rate",
                                    "validation loss (nats/token)", target),
            "rates": plot_rates(out / f"rates_{name}.png", pair, name, base),
            "tradeoff": plot_tradeoff(out / f"tradeoff_{name}.png", pair, name),
            "angle": plot_curves(out / f"angle_{name}.png", pair, "angle",
                                 f"{name}: mean angle to the pretrained weights",
                                 "angle (degrees)"),
        }
        for kind, drawn in pair["plots"].items():
            if not drawn:  # no data: leave no stale picture from an earlier report
                (out / f"{kind}_{name}.png").unlink(missing_ok=True)
    (out / "summary.json").write_text(json.dumps(summary_dict(results, out.resolve()), indent=2))
    report = out / "report.md"
    report.write_text(render_markdown(results), encoding="utf-8")
    return report
