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
  loss rose.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Mapping, Optional, Sequence

Curve = Sequence[tuple[int, float]]


def _finite(x: Optional[float]) -> bool:
    return x is not None and not math.isnan(x) and not math.isinf(x)


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
    if start is None or end is None:
        return None
    return float(end) - float(start)


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



def _run_steps(runs: Mapping, target: Optional[float]) -> dict:
    """{seed: steps to target}; failed runs (no summary) and an undefined target give None."""
    return {s: (steps_to_target(r["curve"], target)
                if target is not None and r.get("summary") is not None else None)
            for s, r in runs.items()}


def analyse_pair(methods: Mapping[str, Mapping], baseline: str) -> dict:
    """All derived numbers of one (checkpoint, task) pair, from its phase-2 runs.

    `methods` maps a method name to {"chosen_lr": float|None, "runs": {seed: run}}, where a run
    is {"curve": [(step, val_loss)...], "summary": summary.json dict or None (failed),
    "metric": float or None}. Returns {"target", "target_rule", "baseline_reached",
    "methods": {name: numbers}}; target is None when no baseline run has a finite loss (then
    there are no steps or speedups either).
    """
    base_runs = methods[baseline]["runs"] if baseline in methods else {}
    ok_curves = [r["curve"] for r in base_runs.values() if r.get("summary") is not None]
    try:
        target: Optional[float] = target_from_baseline(ok_curves)
        even = " (upper middle value: even number of seeds)" if len(ok_curves) % 2 == 0 else ""
        rule = (f"median over {len(ok_curves)} {baseline} seeds of each seed's best "
                f"validation loss{even}")
    except ValueError:
        target, rule = None, f"undefined: no {baseline} run finished with a finite loss"
    base_steps = _run_steps(base_runs, target)
    out: dict = {"target": target, "target_rule": rule,
                 "baseline_reached": sum(s is not None for s in base_steps.values()),
                 "methods": {}}
    for name, m in methods.items():
        runs = m["runs"]

        def per_seed(key: str, runs=runs) -> dict:
            return {s: (r.get("summary") or {}).get(key) for s, r in runs.items()}

        steps = _run_steps(runs, target)
        start, end = per_seed("forget_loss_start"), per_seed("forget_loss_end")
        forget = {s: forgetting(start[s], end[s]) for s in runs}
        finals, tests = per_seed("final_eval_loss"), per_seed("test_loss")
        metric = {s: r.get("metric") for s, r in runs.items()}
        out["methods"][name] = {
            "chosen_lr": m.get("chosen_lr"),
            "failed": sorted(s for s, r in runs.items() if r.get("summary") is None),
            "steps_to_target": steps,
            "steps": summarise(list(steps.values())),
            "speedup": speedup_summary(base_steps, steps) if target is not None else None,
            "final_loss": finals,
            "final_loss_median": median_or_none(finals.values()),
            "best_loss": per_seed("best_eval_loss"),
            "test_loss": tests,
            "test_loss_median": median_or_none(tests.values()),
            "metric": metric,
            "metric_median": median_or_none(metric.values()),
            "forgetting": forget,
            "forgetting_median": median_or_none(forget.values()),
        }
    return out
