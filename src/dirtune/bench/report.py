"""The bench's outputs: report.md (tables), summary.json (every number), PNG plots per pair.

Input: the results of `grid.run_bench`:
    {"bench": {name, baseline, lrs, tune_seeds, seeds, max_steps, eval_every, methods, pairs},
     "pairs": {pair: {"metric": "none"|"gsm8k",
                      "methods": {method: {"chosen_lr", "tuning": [{"lr", "best_loss", "score"}],
                                           "runs": {seed: grid.read_run(...)}}},
                      "analysis": metrics.analyse_pair(...)}}}
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional

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
    return "–" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _signed(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:+.4f}"


# ---------------------------------------------------------------- report.md

def _pair_section(name: str, pair: dict, bench: dict) -> list[str]:
    a = pair["analysis"]
    base = bench["baseline"]
    n_base = len(pair["methods"].get(base, {}).get("runs", {}))
    lines = [f"## {name}", ""]
    if a["target"] is None:
        lines += [f"Target: none ({a['target_rule']}); steps and speedups are undefined.", ""]
    else:
        lines += [f"Target T = **{a['target']:.4f}**: {a['target_rule']}. "
                  f"{a['baseline_reached']}/{n_base} {base} seeds reach it.", ""]
    metric = pair["metric"]
    head = ["method", "lr", "steps to T: median [min–max]", f"speedup vs {base}",
            "final val loss", "test loss"]
    if metric != "none":
        head.append(f"{metric} (exact match)")
    head.append("forgetting (Δ forget loss)")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in a["methods"].items():
        row = [m, _g(r["chosen_lr"], 3) if r["chosen_lr"] else "tuning failed",
               fmt_steps(r["steps"]), fmt_speedup(r["speedup"]),
               _loss(r["final_loss_median"]), _loss(r["test_loss_median"])]
        if metric != "none":
            row.append(_g(r["metric_median"], 3))
        row.append(_signed(r["forgetting_median"]))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Medians over seeds; the speedup range is over per-seed ratios (seed s of the "
              f"method against seed s of {base}); 'never' = some seed did not reach T.", ""]
    lines += _tuning_table(pair, bench)
    notes = []
    for m, r in pair["methods"].items():
        lr = r["chosen_lr"]
        if lr is not None and len(bench["lrs"]) > 1 and lr in (min(bench["lrs"]), max(bench["lrs"])):
            notes.append(f"{m}: the chosen lr {lr:g} is at the edge of the grid; a wider grid may do better.")
        for row in r["tuning"]:
            for s, err in (row.get("errors") or {}).items():
                notes.append(f"{m} tuning run lr {row['lr']:g} seed {s} failed: {err}")
        for s, run in r["runs"].items():
            if run["summary"] is None:
                notes.append(f"{m} seed {s} failed: {run['error'] or 'no summary.json'} ({run['dir']})")
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    for kind in ("val_loss", "angle", "tradeoff"):
        if (pair.get("plots") or {}).get(kind):
            lines += [f"![{kind}]({kind}_{name}.png)", ""]
    return lines


def _tuning_table(pair: dict, bench: dict) -> list[str]:
    lrs = bench["lrs"]
    lines = [f"Learning-rate sweep (mean best validation loss over tune seeds {bench['tune_seeds']}; "
             "**bold** = chosen):", "",
             "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m, r in pair["methods"].items():
        scores = {row["lr"]: row["score"] for row in r["tuning"]}
        cells = [(f"**{_loss(scores.get(lr))}**" if lr == r["chosen_lr"] else _loss(scores.get(lr)))
                 for lr in lrs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(results: dict) -> str:
    b = results["bench"]
    lines = [f"# Bench: {b['name']}", "",
             f"- step budget: {b['max_steps']} optimizer steps; validation every {b['eval_every']} "
             "steps (and at step 0)",
             f"- learning-rate grid (the same for every method): {', '.join(f'{x:g}' for x in b['lrs'])}",
             f"- tuning seeds: {b['tune_seeds']}; final seeds: {b['seeds']}",
             f"- baseline: {b['baseline']}; target T = its median best validation loss within the budget",
             "- steps to T = first evaluated step with validation loss <= T; speedup = baseline median "
             "steps / method median steps (none if the method does not reach T)",
             "- forgetting = loss on pretraining-domain text at the end minus at the start "
             "(lower is better)", ""]
    if b.get("commit"):
        lines.insert(2, f"- commit: {b['commit']}")
    lines += ["Methods:", ""] + [f"- **{m}**: {' '.join(o) or '(base config)'}"
                                 for m, o in b["methods"].items()] + [""]
    for name, pair in results["pairs"].items():
        lines += _pair_section(name, pair, b)
    return "\n".join(lines)


# ---------------------------------------------------------------- summary.json

def _clean(x: Any) -> Any:
    """JSON-safe: NaN -> null, inf -> "inf", tuple -> list, keys -> str."""
    if isinstance(x, float):
        return None if math.isnan(x) else ("inf" if x == math.inf else "-inf" if x == -math.inf else x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def summary_dict(results: dict) -> dict:
    out = {"bench": results["bench"], "pairs": {}}
    for name, pair in results["pairs"].items():
        a = pair["analysis"]
        methods = {}
        for m, r in a["methods"].items():
            methods[m] = {**r, "tuning": pair["methods"][m]["tuning"],
                          "runs": {s: run["dir"] for s, run in pair["methods"][m]["runs"].items()}}
        out["pairs"][name] = {"target": a["target"], "target_rule": a["target_rule"],
                              "baseline_reached": a["baseline_reached"], "metric": pair["metric"],
                              "methods": methods}
    return _clean(out)


# ---------------------------------------------------------------- plots

def _band(curves: list[list[tuple[int, float]]]) -> tuple[list, list, list, list]:
    """steps, median, min, max over the curves that have a finite value at each step."""
    at: dict[int, list[float]] = {}
    for c in curves:
        for s, v in c:
            if v is not None and math.isfinite(v):
                at.setdefault(s, []).append(v)
    steps = sorted(at)
    return (steps, [statistics.median(at[s]) for s in steps],
            [min(at[s]) for s in steps], [max(at[s]) for s in steps])


def _figure(width: float = 7.0, height: float = 4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # files only, no display: runs happen on headless machines
    return fig, fig.add_subplot(1, 1, 1)


def _colour(i: int) -> str:
    return f"C{i % 10}"


def plot_curves(path: Path, pair: dict, key: str, title: str, ylabel: str,
                target: Optional[float] = None) -> bool:
    """Median line and min–max band over seeds per method; False (no file) if there is no data.

    Two panels: the whole run, and the last two thirds of the budget with the y-axis fitted to
    it, where the methods separate (the first evaluations' large losses flatten them otherwise)."""
    fig, ax = _figure(12.5, 4.6)
    zoom = fig.add_subplot(1, 2, 2)
    ax.set_subplotspec(fig.add_gridspec(1, 2)[0])
    drawn, tail_values, last = False, [], 0
    bands = []
    for i, (m, r) in enumerate(pair["methods"].items()):
        curves = [run[key] for run in r["runs"].values() if run["summary"] is not None]
        steps, med, lo, hi = _band(curves)
        if steps:
            bands.append((i, m, r, steps, med, lo, hi, len(curves)))
            last = max(last, steps[-1])
    start = last / 3
    for i, m, r, steps, med, lo, hi, n in bands:
        drawn = True
        lr = f", lr {r['chosen_lr']:g}" if r["chosen_lr"] else ""
        for a in (ax, zoom):
            a.plot(steps, med, "o-", ms=2.5, lw=1.6, color=_colour(i), label=f"{m}{lr} (n={n})")
            a.fill_between(steps, lo, hi, color=_colour(i), alpha=0.18, lw=0)
        tail_values += [v for s, a, b, c in zip(steps, med, lo, hi) if s >= start
                        for v in (a, b, c) if v is not None and math.isfinite(v)]
    if not drawn:
        return False
    if target is not None:
        for a in (ax, zoom):
            a.axhline(target, ls="--", lw=1, color="0.3", label=f"target T = {target:.4g}")
        tail_values.append(target)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    zoom.set(xlabel="optimizer step", title="zoom: last two thirds of the budget")
    if tail_values:
        lo_v, hi_v = min(tail_values), max(tail_values)
        pad = 0.05 * (hi_v - lo_v or abs(hi_v) or 1.0)
        zoom.set_xlim(start, last * 1.02)
        zoom.set_ylim(lo_v - pad, hi_v + pad)
    for a in (ax, zoom):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot_tradeoff(path: Path, pair: dict, name: str) -> bool:
    """Final validation loss against forgetting: one dot per seed, a large marker per median."""
    fig, ax = _figure(6.2, 4.6)
    drawn = False
    a = pair["analysis"]["methods"]
    for i, (m, r) in enumerate(a.items()):
        pts = [(r["final_loss"][s], r["forgetting"][s]) for s in r["final_loss"]
               if r["final_loss"][s] is not None and r["forgetting"][s] is not None]
        if not pts:
            continue
        drawn = True
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, alpha=0.5, color=_colour(i))
        ax.scatter([statistics.median(p[0] for p in pts)], [statistics.median(p[1] for p in pts)],
                   s=120, marker="D", color=_colour(i), edgecolors="black", label=m)
    if not drawn:
        return False
    ax.set(xlabel="final validation loss (lower is better)",
           ylabel="forgetting: Δ loss on source text (lower is better)",
           title=f"{name}: fit vs forgetting (dots: seeds, ◆: median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# ---------------------------------------------------------------- entry

def write_report(out_dir: str | Path, results: dict) -> Path:
    """Write report.md, summary.json and the plots of every pair into out_dir; return report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    commit = out / "commit.txt"
    if commit.is_file() and "commit" not in results["bench"]:
        info = dict(line.split(": ", 1) for line in commit.read_text().splitlines() if ": " in line)
        results["bench"]["commit"] = info.get("commit", "unknown") + (
            " (with uncommitted changes)" if info.get("dirty") == "true" else "")
    for name, pair in results["pairs"].items():
        target = pair["analysis"]["target"]
        pair["plots"] = {
            "val_loss": plot_curves(out / f"val_loss_{name}.png", pair, "curve",
                                    f"{name}: validation loss (median, min–max over seeds)",
                                    "validation loss (nats/token)", target),
            "angle": plot_curves(out / f"angle_{name}.png", pair, "angle",
                                 f"{name}: mean angle to the pretrained weights",
                                 "angle (degrees)"),
            "tradeoff": plot_tradeoff(out / f"tradeoff_{name}.png", pair, name),
        }
        for kind, drawn in pair["plots"].items():
            if not drawn:  # no data: leave no stale picture from an earlier report
                (out / f"{kind}_{name}.png").unlink(missing_ok=True)
    (out / "summary.json").write_text(json.dumps(summary_dict(results), indent=2))
    report = out / "report.md"
    report.write_text(render_markdown(results), encoding="utf-8")
    return report
