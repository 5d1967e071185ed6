"""Steps to target, speedup, summaries and learning-rate choice on hand-made curves."""

import math

import pytest

from dirtune.bench.metrics import (
    analyse_pair, best_loss, choose_lr, forgetting, speedup, speedup_summary, steps_to_target,
    summarise, target_from_baseline,
)

NAN = float("nan")


# ---------------------------------------------------------------- steps_to_target

def test_first_step_at_or_below_target():
    curve = [(0, 3.0), (10, 2.5), (20, 2.0), (30, 1.9)]
    assert steps_to_target(curve, 2.2) == 20
    assert steps_to_target(curve, 2.0) == 20  # a tie reaches
    assert steps_to_target(curve, 3.0) == 0  # step 0 counts
    assert steps_to_target(curve, 1.8) is None


def test_noisy_curve_takes_first_crossing_not_last():
    # falls below, bounces back up, falls again: the first crossing is the answer
    curve = [(0, 3.0), (10, 1.95), (20, 2.3), (30, 1.9), (40, 2.1)]
    assert steps_to_target(curve, 2.0) == 10


def test_nan_never_reaches_and_order_does_not_matter():
    curve = [(30, 1.5), (0, 3.0), (10, NAN), (20, NAN)]
    assert steps_to_target(curve, 2.0) == 30
    assert steps_to_target([(0, NAN)], 1e9) is None
    assert steps_to_target([], 1.0) is None


def test_best_loss_ignores_nan():
    assert best_loss([(0, NAN), (1, 2.0), (2, 1.5)]) == 1.5
    assert best_loss([(0, NAN)]) == math.inf


# ---------------------------------------------------------------- target

def test_target_is_median_of_best_for_odd_seeds():
    curves = [[(0, 3.0), (10, 2.0)], [(0, 3.0), (10, 1.0)], [(0, 3.0), (10, 1.5), (20, 1.7)]]
    assert target_from_baseline(curves) == 1.5


def test_target_even_seeds_uses_upper_middle_so_baseline_median_is_finite():
    curves = {0: [(0, 3.0), (10, 1.0)], 1: [(0, 3.0), (10, 2.0)],
              2: [(0, 3.0), (10, 1.5)], 3: [(0, 3.0), (10, 2.5)]}
    t = target_from_baseline(curves)
    assert t == 2.0
    steps = [steps_to_target(c, t) for c in curves.values()]
    assert steps.count(None) == 1
    assert summarise(steps)["median"] == 10


def test_target_ignores_diverged_seed_and_fails_when_all_diverged():
    # a seed with only NaN counts as +inf best: median of (1.0, 2.0, inf) = 2.0
    curves = [[(0, NAN)], [(0, 3.0), (10, 2.0)], [(0, 3.0), (10, 1.0)]]
    assert target_from_baseline(curves) == 2.0
    with pytest.raises(ValueError, match="no baseline run"):
        target_from_baseline([[(0, NAN)]])
    with pytest.raises(ValueError):
        target_from_baseline([])


# ---------------------------------------------------------------- summaries, speedup

def test_summarise_counts_unreached_as_inf():
    assert summarise([10, 20, 30]) == {"median": 20, "min": 10, "max": 30, "reached": 3, "n": 3}
    s = summarise([10, None, 30])
    assert s["median"] == 30 and s["min"] == 10 and s["max"] is None and s["reached"] == 2
    assert summarise([10, None, None])["median"] is None
    assert summarise([None, None]) == {"median": None, "min": None, "max": None,
                                       "reached": 0, "n": 2}
    assert summarise([])["n"] == 0


def test_speedup_values():
    assert speedup(100, 50) == 2.0
    assert speedup(None, 50) is None
    assert speedup(100, None) is None
    assert speedup(0, 0) == 1.0
    assert speedup(20, 0) == math.inf


def test_speedup_summary_median_and_per_seed_range():
    base = {0: 100, 1: 80, 2: 120}
    meth = {0: 50, 1: 40, 2: None}
    s = speedup_summary(base, meth)
    # medians: baseline 100, method median of (40, 50, inf) = 50
    assert s["median"] == 2.0
    assert s["min"] == 2.0 and s["max"] == 2.0 and s["defined"] == 2
    never = speedup_summary(base, {0: None, 1: None, 2: 40})
    assert never["median"] is None and never["defined"] == 1 and never["max"] == 3.0


def test_forgetting_is_end_minus_start():
    assert forgetting(2.0, 2.5) == pytest.approx(0.5)
    assert forgetting(None, 2.5) is None


def test_choose_lr_lowest_loss_smaller_lr_on_ties_and_skips_failures():
    assert choose_lr({1e-3: 2.0, 1e-4: 1.5, 3e-4: 1.7}) == 1e-4
    assert choose_lr({3e-4: 1.5, 1e-4: 1.5, 1e-3: 1.5}) == 1e-4
    assert choose_lr({1e-3: NAN, 3e-4: None, 1e-4: 2.0, 1e-2: math.inf}) == 1e-4
    with pytest.raises(ValueError, match="no learning rate"):
        choose_lr({1e-3: NAN})


# ---------------------------------------------------------------- one pair end to end

def _run(curve, forget=(2.0, 2.2), metric=None):
    return {"curve": curve, "metric": metric,
            "summary": {"final_eval_loss": curve[-1][1], "best_eval_loss": best_loss(curve),
                        "test_loss": None, "forget_loss_start": forget[0],
                        "forget_loss_end": forget[1]}}


def test_analyse_pair_speedup_two():
    base = [(0, 3.0), (10, 2.5), (20, 2.0), (30, 1.8), (40, 1.9)]
    fast = [(0, 3.0), (10, 2.0), (20, 1.8), (30, 1.7), (40, 1.6)]
    methods = {
        "adamw": {"chosen_lr": 1e-3, "runs": {s: _run(base) for s in (0, 1, 2)}},
        "fast": {"chosen_lr": 3e-3, "runs": {0: _run(fast, (2.0, 2.1)), 1: _run(fast, (2.0, 2.1)),
                                             2: {"curve": [], "summary": None, "metric": None}}},
    }
    a = analyse_pair(methods, "adamw")
    assert a["target"] == 1.8 and a["baseline_reached"] == 3
    assert a["methods"]["adamw"]["steps"]["median"] == 30
    f = a["methods"]["fast"]
    assert f["steps_to_target"] == {0: 20, 1: 20, 2: None}
    assert f["failed"] == [2]
    # method median over (20, 20, inf) = 20; 30 / 20
    assert f["speedup"]["median"] == 1.5
    assert f["forgetting_median"] == pytest.approx(0.1)
    assert a["methods"]["adamw"]["forgetting_median"] == pytest.approx(0.2)
    assert f["final_loss_median"] == 1.6


def test_analyse_pair_without_baseline_result_has_no_target():
    methods = {"adamw": {"chosen_lr": None, "runs": {}},
               "x": {"chosen_lr": 1e-3, "runs": {0: _run([(0, 2.0)])}}}
    a = analyse_pair(methods, "adamw")
    assert a["target"] is None and "undefined" in a["target_rule"]
    assert a["methods"]["x"]["speedup"] is None
    assert a["methods"]["x"]["steps_to_target"] == {0: None}
