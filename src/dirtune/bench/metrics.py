"""What "fewer iterations" means, as numbers (method.md §3). Pure functions on plain data.

A *curve* is a list of `(step, validation_loss)` pairs, one per evaluation. The bench reads
curves from run folders; everything here only computes.

Definitions (the report and summary.json use exactly these):
- target `T` of a pair: the median over the baseline's seeds of each seed's best validation
  loss within the step budget; with an even number of seeds the *upper* of the two middle
  values (see `target_from_baseline` for why).
- steps to target: the first evaluated step whose validation loss is `<= T` (ties reach).
- a seed that never reaches `T` counts as `+inf` in medians; a median of `+inf` is reported as
  "not reached" (None), never as a number.
- speedup = baseline median steps / method median steps; its range comes from the per-seed
  ratios (baseline seed s against method seed s).
- forgetting = forget_loss(end) − forget_loss(start): positive means the pretraining-domain
  loss rose; per forget set, and also at the best checkpoint (forget loss at best_step − start).
- speed along the curve: with L0 the baseline's step-0 validation loss (median over its seeds)
  and L* = T, the target at fraction f of the baseline's improvement is
  T_f = L0 − f (L0 − L*), computed as L* + (1 − f)(L0 − L*) so that T_1 is T exactly.
- learning-rate grid edge: a method's chosen rate sits on an edge when no rate beyond it (in
  that direction) has a result for the method: a finite score, or a divergence (a rate with no
  finite loss bounds the grid). A rate that failed for another reason, or was not run, does not.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Mapping, Optional, Sequence

Curve = Sequence[tuple[int, float]]


def _finite(x: Optional[float]) -> bool:
    """A real, finite number (run files spell NaN/Inf as strings: "nan", "inf")."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def steps_to_target(curve: Curve, target: float) -> Optional[int]:
    """First evaluated step whose loss is <= target; None if no evaluation gets there.

    NaN (and None) losses never reach. The curve is read in step order whatever its order.
    """
    for step, loss in sorted(curve, key=lambda p: p[0]):
        if loss is not None and not math.isnan(loss) and loss <= target:
            return int(step)
    return None


def best_loss(curve: Curve) -> float:
    """Lowest finite loss of a curve; +inf if it has none (a run that diverged at once)."""
    vals = [loss for _, loss in curve if loss is not None and not math.isnan(loss)]
    return min(vals, default=math.inf)


def target_from_baseline(curves: Iterable[Curve] | Mapping[object, Curve]) -> float:
    """The target T from the tuned baseline's curves, one per seed.

    T = the k-th smallest of the per-seed best losses, k = n // 2 + 1 (n seeds): the median for
    odd n, the upper middle value for even n. Then at least k baseline seeds reach T, so the
    baseline's own median steps to target (unreached = +inf) is always finite; the other
    n - k seeds may never reach it, and the report says how many did.
    Raises ValueError when no curve has a finite loss.
    """
    if isinstance(curves, Mapping):
        curves = curves.values()
    bests = sorted(best_loss(c) for c in curves)
    if not bests or math.isinf(bests[0]):
        raise ValueError("no baseline run has a finite validation loss: the target is undefined")
    return bests[len(bests) // 2]


def summarise(per_seed_steps: Sequence[Optional[int]]) -> dict:
    """median, min, max, reached, n of steps to target over seeds (None = never reached).

    The median counts unreached seeds as +inf and is None when it would be +inf. min is over
    the seeds that reached (None if none did); max is None as soon as one seed did not reach
    (the range is open above).
    """
    n = len(per_seed_steps)
    reached = [s for s in per_seed_steps if s is not None]
    if n == 0:
        return {"median": None, "min": None, "max": None, "reached": 0, "n": 0}
    med = statistics.median([math.inf if s is None else float(s) for s in per_seed_steps])
    return {
        "median": None if math.isinf(med) else med,
        "min": min(reached) if reached else None,
        "max": max(reached) if len(reached) == n else None,
        "reached": len(reached),
        "n": n,
    }


def speedup(baseline_steps: Optional[float], method_steps: Optional[float]) -> Optional[float]:
    """baseline steps / method steps; None if either never reached.

    Step 0 is an evaluation like any other: 0 / 0 (both at the start) is 1.0, and a method at
    step 0 against a baseline that needed steps is +inf.
    """
    if baseline_steps is None or method_steps is None:
        return None
    if method_steps == 0:
        return 1.0 if baseline_steps == 0 else math.inf
    return float(baseline_steps) / float(method_steps)


def speedup_summary(baseline: Mapping[object, Optional[int]],
                    method: Mapping[object, Optional[int]]) -> dict:
    """Speedup of `method` over `baseline`, both {seed: steps to target or None}.

    median = speedup(baseline median steps, method median steps); min/max over the per-seed
    ratios of the seeds both have and both reached; `defined` counts those ratios.
    """
    b_med = summarise(list(baseline.values()))["median"]
    m_med = summarise(list(method.values()))["median"]
    ratios = [speedup(baseline[s], method[s]) for s in baseline if s in method]
    ratios = [r for r in ratios if r is not None]
    return {
        "median": speedup(b_med, m_med),
        "min": min(ratios) if ratios else None,
        "max": max(ratios) if ratios else None,
        "defined": len(ratios),
    }


def forgetting(start: Optional[float], end: Optional[float]) -> Optional[float]:
    """Change of the loss on pretraining-domain text: end − start (None if either is missing)."""
    return _difference(end, start)


def _difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a − b; None if either is missing or not finite."""
    if not (_finite(a) and _finite(b)):
        return None
    return float(a) - float(b)


def choose_lr(results: Mapping[float, Optional[float]]) -> float:
    """The learning rate with the lowest best validation loss; ties go to the smaller rate.

    None/NaN/inf scores (failed or diverged runs) are never chosen; ValueError if all are.
    """
    ok = [(loss, lr) for lr, loss in results.items() if _finite(loss)]
    if not ok:
        raise ValueError(f"no learning rate has a finite validation loss: {dict(results)}")
    return min(ok)[1]


def median_or_none(values: Iterable[Optional[float]]) -> Optional[float]:
    """Median of the finite values, None if there are none."""
    vals = [float(v) for v in values if _finite(v)]
    return statistics.median(vals) if vals else None


FRACTIONS = (0.5, 0.75, 0.9, 0.95, 1.0)


def start_loss(curve: Curve) -> Optional[float]:
    """The validation loss at step 0 (before any update); None if step 0 was not evaluated."""
    at = [loss for step, loss in curve if step == 0 and _finite(loss)]
    return float(at[-1]) if at else None


def fraction_targets(l0: float, l_star: float,
                     fractions: Sequence[float] = FRACTIONS) -> dict[float, float]:
    """{f: T_f}, T_f = L0 − f (L0 − L*): the loss after fraction f of the baseline's improvement.

    Written L* + (1 − f)(L0 − L*) so that T_1 == L* bit for bit (the baseline's own best seeds
    must reach it). With L0 == L* (no improvement) every target is L0.
    """
    if not (_finite(l0) and _finite(l_star)):
        raise ValueError(f"fraction targets need finite L0 and L*, got {l0!r}, {l_star!r}")
    return {f: l_star + (1.0 - f) * (l0 - l_star) for f in fractions}


def _run_steps(runs: Mapping, target: Optional[float]) -> dict:
    """{seed: steps to target}; failed runs (no summary) and an undefined target give None."""
    return {s: (steps_to_target(r["curve"], target)
                if target is not None and r.get("summary") is not None else None)
            for s, r in runs.items()}


def _reach(runs: Mapping, base_steps: Optional[Mapping], target: Optional[float]) -> dict:
    """Steps to `target` per seed, their summary, and the speedup against `base_steps`."""
    steps = _run_steps(runs, target)
    return {"steps_to_target": steps, "steps": summarise(list(steps.values())),
            "speedup": speedup_summary(base_steps, steps)
            if target is not None and base_steps is not None else None}


def baseline_target(base_runs: Mapping, baseline: str) -> tuple[Optional[float], str]:
    """(T, the rule in words) from the baseline's runs {seed: run}; T None when undefined."""
    ok = [r["curve"] for r in base_runs.values() if r.get("summary") is not None]
    try:
        target = target_from_baseline(ok)
    except ValueError:
        return None, f"undefined: no {baseline} run finished with a finite loss"
    even = " (upper middle value: even number of seeds)" if len(ok) % 2 == 0 else ""
    return target, (f"median over {len(ok)} {baseline} seeds of each seed's best validation "
                    f"loss{even}")


def _at(curve: Optional[Curve], step: Optional[int]) -> Optional[float]:
    vals = [v for s, v in curve or [] if s == step and _finite(v)]
    return float(vals[-1]) if vals else None


def forget_sets(run: Mapping) -> dict[str, dict]:
    """{set name: {"start", "end", "at_best"}} of one run (values None where missing).

    summary.json `forget` (named sets) when present; else the legacy single set, named
    `source`, from forget_loss_start/end. A missing at_best is read off the set's forget curve
    (metrics.jsonl) at best_step.
    """
    summary = run.get("summary") or {}
    best = summary.get("best_step")
    if isinstance(summary.get("forget"), Mapping):
        out = {}
        for name, v in summary["forget"].items():
            v = v if isinstance(v, Mapping) else {}
            at_best = v.get("at_best")
            if at_best is None:
                at_best = _at((run.get("forget_curves") or {}).get(name), best)
            out[name] = {"start": v.get("start"), "end": v.get("end"), "at_best": at_best}
        return out
    if summary.get("forget_loss_start") is None and summary.get("forget_loss_end") is None:
        return {}
    return {"source": {"start": summary.get("forget_loss_start"),
                       "end": summary.get("forget_loss_end"),
                       "at_best": _at(run.get("forget_curve"), best)}}


def _forgetting_by_set(runs: Mapping) -> dict:
    """Per forget set: end − start and at_best − start per seed, and their medians."""
    per_run = {s: forget_sets(r) for s, r in runs.items()}
    names = list(dict.fromkeys(n for sets in per_run.values() for n in sets))
    out = {}
    for name in names:
        end = {s: forgetting((sets.get(name) or {}).get("start"), (sets.get(name) or {}).get("end"))
               for s, sets in per_run.items()}
        best = {s: forgetting((sets.get(name) or {}).get("start"),
                              (sets.get(name) or {}).get("at_best"))
                for s, sets in per_run.items()}
        out[name] = {"end": end, "end_median": median_or_none(end.values()),
                     "at_best": best, "at_best_median": median_or_none(best.values())}
    return out


def analyse_pair(methods: Mapping[str, Mapping], baseline: str,
                 fractions: Sequence[float] = FRACTIONS) -> dict:
    """All derived numbers of one (checkpoint, task) pair, from its final-seed runs.

    `methods` maps a method name to {"chosen_lr": float|None, "runs": {seed: run}}, where a run
    is {"curve": [(step, val_loss)...], "summary": summary.json dict or None (failed),
    "metric": float or None, "forget_curve": [(step, loss)...] (optional)}. Returns {"target",
    "target_rule", "baseline_reached", "start_loss", "fraction_targets", "methods": {name:
    numbers}}; target is None when no baseline run has a finite loss (then there are no steps
    or speedups either), start_loss/fraction_targets None without a step-0 evaluation.
    """
    base_runs = methods[baseline]["runs"] if baseline in methods else {}
    target, rule = baseline_target(base_runs, baseline)
    base_steps = _run_steps(base_runs, target)
    l0 = median_or_none(start_loss(r["curve"]) for r in base_runs.values()
                        if r.get("summary") is not None)
    targets = fraction_targets(l0, target, fractions) if None not in (l0, target) else None
    base_frac = ({f: _run_steps(base_runs, t) for f, t in targets.items()} if targets else {})
    out: dict = {"target": target, "target_rule": rule,
                 "baseline_reached": sum(s is not None for s in base_steps.values()),
                 "start_loss": l0, "fraction_targets": targets, "methods": {}}
    for name, m in methods.items():
        runs = m["runs"]

        def per_seed(key: str, runs=runs) -> dict:
            return {s: (r.get("summary") or {}).get(key) for s, r in runs.items()}

        start, end = per_seed("forget_loss_start"), per_seed("forget_loss_end")
        forget = {s: forgetting(start[s], end[s]) for s in runs}
        finals, tests, bests = per_seed("final_eval_loss"), per_seed("test_loss"), per_seed("best_eval_loss")
        gap = {s: _difference(finals[s], bests[s]) for s in runs}  # > 0: the curve rose again
        metric = {s: r.get("metric") for s, r in runs.items()}
        reach = _reach(runs, base_steps, target)
        out["methods"][name] = {
            "chosen_lr": m.get("chosen_lr"),
            "failed": sorted(s for s, r in runs.items() if r.get("summary") is None),
            **reach,
            "fractions": ({f: {"target": t, **_reach(runs, base_frac[f], t)}
                           for f, t in targets.items()} if targets else None),
            "final_loss": finals,
            "final_loss_median": median_or_none(finals.values()),
            "best_loss": bests,
            "best_loss_median": median_or_none(bests.values()),
            "overtrain_gap": gap,
            "overtrain_gap_median": median_or_none(gap.values()),
            "test_loss": tests,
            "test_loss_median": median_or_none(tests.values()),
            "epochs": per_seed("epochs"),
            "epochs_median": median_or_none(per_seed("epochs").values()),
            "metric": metric,
            "metric_median": median_or_none(metric.values()),
            "forgetting": forget,
            "forgetting_median": median_or_none(forget.values()),
            "forget_sets": _forgetting_by_set(runs),
        }
    return out


def compare_at_rate(methods: Mapping[str, Mapping], baseline: str) -> dict:
    """Every method against the baseline *at one learning rate*, from runs {method: {seed: run}}
    (the tune seeds). The target is the baseline's best loss at this rate (same rule as T).

    Returns {"target", "methods": {name: {"best_loss" (mean over seeds; None if a seed has no
    finite loss), "diverged", "steps_to_target", "steps", "speedup"}}}.
    """
    base_runs = methods.get(baseline) or {}
    target, _ = baseline_target(base_runs, baseline)
    base_steps = _run_steps(base_runs, target)
    out: dict = {"target": target, "methods": {}}
    for name, runs in methods.items():
        # the summary's best loss, as the tuning score reads it, so the two tables agree
        bests = [(r.get("summary") or {}).get("best_eval_loss") for r in runs.values()]
        ok = bool(bests) and all(_finite(b) for b in bests)
        out["methods"][name] = {"best_loss": sum(bests) / len(bests) if ok else None,
                                "diverged": any(r.get("diverged") for r in runs.values()),
                                **_reach(runs, base_steps, target)}
    return out


# ---------------------------------------------------------------- the learning-rate grid

def grid_edges(scores: Mapping[float, Optional[float]], diverged: Mapping[float, bool],
               chosen: Optional[float]) -> dict[str, bool]:
    """{"up": .., "down": ..}: whether `chosen` sits on that edge of the rates with a result.

    A rate has a result when its score is finite or it diverged (no finite loss: it bounds the
    grid); failed or missing rates are ignored. No chosen rate: on no edge.
    """
    if chosen is None:
        return {"up": False, "down": False}
    known = [lr for lr, sc in scores.items() if _finite(sc) or diverged.get(lr)]
    return {"up": not any(lr > chosen for lr in known), "down": not any(lr < chosen for lr in known)}


def _round3(x: float) -> float:
    # 3 significant digits: stable folder names (lr{lr:g}) and exact float identity on re-reading
    return float(f"{x:.3g}")


def next_rate(grid: Sequence[float], side: str, step: Optional[float] = None) -> float:
    """The rate one step beyond the grid on `side` ("up"/"down"), 3 significant digits.

    step: the ratio to use; None: the ratio of the two rates at that edge (needs >= 2 rates).
    """
    g = sorted(grid)
    if step is None:
        if len(g) < 2:
            raise ValueError("a one-rate grid has no neighbouring ratio; set the bench's grid_step")
        step = g[-1] / g[-2] if side == "up" else g[1] / g[0]
    if not step > 1:
        raise ValueError(f"grid step must be > 1, got {step!r}")
    new = _round3(g[-1] * step if side == "up" else g[0] / step)
    if new in g:
        raise ValueError(f"the rate beyond {side} edge rounds to {new:g}, already in the grid")
    return new


def sides_to_extend(chosen: Mapping[str, Optional[float]], grid: Sequence[float],
                    extensions: Mapping[str, int], limit: int) -> list[str]:
    """Grid sides to extend: "up" when some method chose the grid's largest rate, "down" for the
    smallest, each while that side has had fewer than `limit` extensions."""
    sides = []
    for side, edge in (("down", min(grid)), ("up", max(grid))):
        if extensions.get(side, 0) < limit and any(lr == edge for lr in chosen.values()):
            sides.append(side)
    return sides
