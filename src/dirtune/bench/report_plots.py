"""The bench's PNG plots, one set per pair: validation and angle curves, the learning-rate
picture (best validation loss against rate), and loss against forgetting per forget set.

Each function returns False (and writes nothing) when there is no data to draw.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional


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


def _figure(width: float = 7.0, height: float = 4.4, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # files only, no display: runs happen on headless machines
    return fig, [fig.add_subplot(1, cols, i + 1) for i in range(cols)]


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _save(fig, path: Path, dpi: int = 110) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return True


def plot_curves(path: Path, pair: dict, key: str, title: str, ylabel: str,
                target: Optional[float] = None) -> bool:
    """Median line and min–max band over seeds per method, at each method's chosen rate.

    Two panels: the whole run, and the last two thirds of the budget with the y-axis fitted to
    it, where the methods separate (the first evaluations' large losses flatten them otherwise)."""
    fig, (ax, zoom) = _figure(12.5, 4.6, cols=2)
    tail_values, last, bands = [], 0, []
    for i, (m, r) in enumerate(pair["methods"].items()):
        curves = [run[key] for run in r["runs"].values() if run["summary"] is not None]
        steps, med, lo, hi = _band(curves)
        if steps:
            bands.append((i, m, r, steps, med, lo, hi, len(curves)))
            last = max(last, steps[-1])
    if not bands:
        return False
    start = last / 3
    for i, m, r, steps, med, lo, hi, n in bands:
        lr = f", lr {r['chosen_lr']:g}" if r["chosen_lr"] else ""
        edge = " (grid check FAILED)" if (r.get("edge") or {}).get("edge") else ""
        for a in (ax, zoom):
            a.plot(steps, med, "o-", ms=2.5, lw=1.6, color=_colour(i), label=f"{m}{lr} (n={n}){edge}")
            a.fill_between(steps, lo, hi, color=_colour(i), alpha=0.18, lw=0)
        tail_values += [v for s, a, b, c in zip(steps, med, lo, hi) if s >= start for v in (a, b, c)]
    if target is not None:
        for a in (ax, zoom):
            a.axhline(target, ls="--", lw=1, color="0.3", label=f"target T = {target:.4g}")
        tail_values.append(target)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    zoom.set(xlabel="optimizer step", ylabel=ylabel, title="zoom: last two thirds of the budget")
    if tail_values:
        lo_v, hi_v = min(tail_values), max(tail_values)
        pad = 0.05 * (hi_v - lo_v or abs(hi_v) or 1.0)
        zoom.set_xlim(start, last * 1.02)
        zoom.set_ylim(lo_v - pad, hi_v + pad)
    for a in (ax, zoom):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8, title="line: median over seeds; band: min–max", title_fontsize=8)
    return _save(fig, path)


def plot_rates(path: Path, pair: dict, name: str, baseline: str) -> bool:
    """Best validation loss (tune seeds) against learning rate, a line per method, log x; right:
    the same minus the baseline's at that rate (below 0: better than the baseline there).

    ★ the rate each method chose; ✕ (on the top edge) a rate where it diverged; dotted vertical
    lines: rates the grid extension added."""
    fig, (ax, rel) = _figure(13.0, 4.9, cols=2)
    base_rows = {row["lr"]: row["score"] for row in
                 (pair["methods"].get(baseline) or {}).get("tuning", [])}
    drawn, diverged_at, rates = False, [], set()
    for i, (m, r) in enumerate(pair["methods"].items()):
        rows = sorted(r["tuning"], key=lambda row: row["lr"])
        pts = [(row["lr"], row["score"]) for row in rows if row["score"] is not None]
        diverged_at += [(row["lr"], i) for row in rows if row.get("diverged")]
        rates.update(row["lr"] for row in rows)
        if not pts:
            continue
        drawn = True
        edge = r.get("edge") or {}
        label = m + (" (grid check FAILED)" if edge.get("edge") else "")
        style = dict(marker="s" if m == baseline else "o", ms=4, lw=2.4 if m == baseline else 1.4,
                     color=_colour(i))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        diff = [(lr, v - base_rows[lr]) for lr, v in pts if base_rows.get(lr) is not None]
        if diff:
            rel.plot([p[0] for p in diff], [p[1] for p in diff], **style)
        chosen = r.get("chosen_lr")
        if chosen in dict(pts):
            ax.plot([chosen], [dict(pts)[chosen]], "*", ms=13, color=_colour(i), mec="black", mew=0.6)
            if dict(diff).get(chosen) is not None:
                rel.plot([chosen], [dict(diff)[chosen]], "*", ms=13, color=_colour(i), mec="black", mew=0.6)
    if not drawn:
        return False
    for a in (ax, rel):
        a.set_xscale("log")
        a.set_xticks(sorted(rates), [f"{lr:g}" for lr in sorted(rates)])
        a.minorticks_off()
        for added in (pair.get("grid") or {}).get("added", []):
            a.axvline(added["lr"], ls=":", lw=1, color="0.4")
        a.grid(alpha=0.3)
    top = ax.get_ylim()[1]
    for lr, i in diverged_at:
        ax.plot([lr], [top], "x", ms=9, mew=2, color=_colour(i), clip_on=False)
    rel.axhline(0, color="black", lw=0.8)
    # linear near 0, log beyond: a method far off (a strong penalty) would flatten the rest
    rel.set_yscale("symlog", linthresh=0.01)
    # legend entries for the marks, which belong to no one method
    ax.plot([], [], "*", ms=11, color="0.5", mec="black", mew=0.6, label="★ chosen rate")
    if diverged_at:
        ax.plot([], [], "x", ms=8, mew=2, color="0.5", label="✕ diverged (no finite loss)")
    if (pair.get("grid") or {}).get("added"):
        ax.plot([], [], ":", color="0.4", label="rate added by grid extension")
    ax.set(xlabel="learning rate (log scale)", ylabel="best validation loss (mean over tune seeds)",
           title=f"{name}: best validation loss at every rate of the grid")
    rel.set(xlabel="learning rate (log scale)",
            ylabel=f"best val loss − {baseline}'s at that rate\n(linear within ±0.01, log beyond)",
            title=f"the same, relative to {baseline} at each rate (< 0: better there)")
    ax.legend(fontsize=8, title=f"thick line, squares: {baseline}", title_fontsize=8)
    return _save(fig, path)


def plot_tradeoff(path: Path, pair: dict, name: str) -> bool:
    """Final validation loss against forgetting, one panel per forget set: a dot per seed, a
    large marker per median."""
    a = pair["analysis"]["methods"]
    sets = list(dict.fromkeys(s for r in a.values() for s in r.get("forget_sets", {})))
    if not sets:
        return False
    fig, axes = _figure(5.6 * len(sets) + 0.6, 4.6, cols=len(sets))
    drawn = False
    for ax, fs in zip(axes, sets):
        for i, (m, r) in enumerate(a.items()):
            delta = (r.get("forget_sets") or {}).get(fs, {}).get("end", {})
            pts = [(r["final_loss"][s], delta.get(s)) for s in r["final_loss"]
                   if r["final_loss"][s] is not None and delta.get(s) is not None]
            if not pts:
                continue
            drawn = True
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, alpha=0.5, color=_colour(i))
            ax.scatter([statistics.median(p[0] for p in pts)], [statistics.median(p[1] for p in pts)],
                       s=120, marker="D", color=_colour(i), edgecolors="black", label=m)
        ax.set(xlabel="final validation loss (lower is better)",
               ylabel=f"forgetting on '{fs}': Δ loss, end − start (lower is better)",
               title=f"{name}: fit vs forgetting, forget set '{fs}'")
        ax.grid(alpha=0.3)
    if not drawn:
        return False
    axes[0].legend(fontsize=8, title="dots: seeds; ◆: median", title_fontsize=8)
    return _save(fig, path, dpi=120)
