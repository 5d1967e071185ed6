"""Steps to target, speedup, summaries and learning-rate choice on hand-made curves."""

import math

import pytest

from dirtune.bench.metrics import (
    analyse_pair, best_loss, choose_lr, compare_at_rate, forget_sets, forgetting, fraction_targets,
    grid_edges, next_rate, sides_to_extend, speedup, speedup_summary, start_loss, steps_to_target,
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


# ---------------------------------------------------------------- speed along the curve

def test_fraction_targets_split_the_improvement_and_hit_t_exactly():
    t = fraction_targets(3.0, 1.0)
    assert t[0.5] == pytest.approx(2.0) and t[0.75] == pytest.approx(1.5)
    assert t[0.9] == pytest.approx(1.2) and t[0.95] == pytest.approx(1.1)
    # T_1 is L* bit for bit, even where L0 - (L0 - L*) would round differently
    l0, ls = 4.13519435613909, 1.6026007099872788
    assert l0 - 1.0 * (l0 - ls) != ls  # the naive form misses by one ulp here
    assert fraction_targets(l0, ls)[1.0] == ls
    assert fraction_targets(2.0, 2.0) == {f: 2.0 for f in (0.5, 0.75, 0.9, 0.95, 1.0)}
    with pytest.raises(ValueError, match="finite"):
        fraction_targets(NAN, 1.0)


def test_start_loss_is_step_zero_only():
    assert start_loss([(10, 2.0), (0, 3.0)]) == 3.0
    assert start_loss([(10, 2.0)]) is None
    assert start_loss([(0, NAN), (10, 2.0)]) is None


def _seeds(*curves):
    return {s: _run(c) for s, c in enumerate(curves)}


def test_steps_at_each_fraction_median_ties_unreached_and_non_monotone():
    # baseline: 3.0 -> 1.0 (L0 = 3, L* = 1): T_50 = 2.0, T_75 = 1.5, T_90 = 1.2, T_95 = 1.1
    base = [(0, 3.0), (10, 2.0), (20, 1.5), (30, 1.2), (40, 1.1), (50, 1.0)]
    # fast early: ties T_50 at step 5, then bounces up above it (first crossing counts),
    # stalls at 1.3 and never reaches 90%
    early = [(0, 3.0), (5, 2.0), (10, 2.4), (15, 1.5), (20, 1.3), (50, 1.3)]
    methods = {"adamw": {"chosen_lr": 1e-3, "runs": _seeds(base, base, base)},
               "early": {"chosen_lr": 1e-3, "runs": _seeds(early, early, [(0, 3.0), (50, 2.5)])}}
    a = analyse_pair(methods, "adamw")
    assert a["start_loss"] == 3.0 and a["target"] == 1.0
    f = a["methods"]["early"]["fractions"]
    assert f[0.5]["steps_to_target"] == {0: 5, 1: 5, 2: None}
    assert f[0.5]["steps"]["median"] == 5 and f[0.5]["speedup"]["median"] == 2.0
    assert f[0.75]["steps"]["median"] == 15 and f[0.75]["speedup"]["median"] == pytest.approx(20 / 15)
    assert f[0.9]["steps"] == {"median": None, "min": None, "max": None, "reached": 0, "n": 3}
    assert f[0.9]["speedup"]["median"] is None
    assert f[1.0]["steps_to_target"] == a["methods"]["early"]["steps_to_target"]
    b = a["methods"]["adamw"]["fractions"]
    assert [b[x]["steps"]["median"] for x in (0.5, 0.75, 0.9, 0.95, 1.0)] == [10, 20, 30, 40, 50]


def test_fractions_when_the_baseline_never_improves():
    flat = [(0, 2.0), (10, 2.0), (20, 2.1)]
    methods = {"adamw": {"chosen_lr": 1e-3, "runs": _seeds(flat, flat, flat)},
               "x": {"chosen_lr": 1e-3, "runs": _seeds([(0, 2.0), (10, 1.0)])}}
    a = analyse_pair(methods, "adamw")
    assert a["start_loss"] == a["target"] == 2.0
    for f in (0.5, 1.0):  # every target is L0, reached at step 0 by both: 0 / 0 = 1x
        assert a["methods"]["x"]["fractions"][f]["steps"]["median"] == 0
        assert a["methods"]["x"]["fractions"][f]["speedup"]["median"] == 1.0


def test_fractions_undefined_without_step_zero_or_target():
    late = [(10, 2.0), (20, 1.5)]
    a = analyse_pair({"adamw": {"chosen_lr": 1e-3, "runs": _seeds(late, late, late)}}, "adamw")
    assert a["start_loss"] is None and a["fraction_targets"] is None
    assert a["methods"]["adamw"]["fractions"] is None and a["target"] == 1.5


# ---------------------------------------------------------------- overtraining, forget sets

def test_overtraining_gap_test_loss_and_epochs():
    run = _run([(0, 3.0), (10, 1.5), (20, 1.8)])
    run["summary"].update(test_loss=1.6, epochs=2.5)
    a = analyse_pair({"adamw": {"chosen_lr": 1e-3, "runs": {0: run}}}, "adamw")["methods"]["adamw"]
    assert a["best_loss_median"] == 1.5 and a["final_loss_median"] == 1.8
    assert a["overtrain_gap_median"] == pytest.approx(0.3)
    assert a["test_loss_median"] == 1.6 and a["epochs_median"] == 2.5
    old = analyse_pair({"adamw": {"chosen_lr": 1e-3, "runs": {0: _run([(0, 3.0)])}}}, "adamw")
    assert old["methods"]["adamw"]["epochs_median"] is None  # runs before the `epochs` key


def test_forget_sets_named_and_legacy():
    new = {"summary": {"best_step": 20, "forget_loss_start": 2.0, "forget_loss_end": 2.5,
                       "forget": {"wiki": {"start": 3.0, "end": 3.4, "at_best": 3.1},
                                  "code": {"start": 1.0, "end": 1.5}}},
           "forget_curves": {"code": [(0, 1.0), (20, 1.2), (40, 1.5)]}}
    assert forget_sets(new) == {"wiki": {"start": 3.0, "end": 3.4, "at_best": 3.1},
                                "code": {"start": 1.0, "end": 1.5, "at_best": 1.2}}
    old = {"summary": {"best_step": 10, "forget_loss_start": 2.0, "forget_loss_end": 2.5},
           "forget_curve": [(0, 2.0), (10, 2.2), (20, 2.5)]}
    assert forget_sets(old) == {"source": {"start": 2.0, "end": 2.5, "at_best": 2.2}}
    assert forget_sets({"summary": {"best_step": 0}}) == {}
    assert forget_sets({"summary": None}) == {}


def test_forgetting_per_set_in_the_analysis():
    runs = {s: _run([(0, 3.0), (10, 2.0)], forget=(2.0, 2.0 + 0.1 * (s + 1))) for s in range(3)}
    for s, r in runs.items():
        r["forget_curve"] = [(0, 2.0), (10, 2.0 + 0.05 * (s + 1))]
        r["summary"]["best_step"] = 10
    m = analyse_pair({"adamw": {"chosen_lr": 1e-3, "runs": runs}}, "adamw")["methods"]["adamw"]
    src = m["forget_sets"]["source"]
    assert src["end_median"] == pytest.approx(0.2) and src["at_best_median"] == pytest.approx(0.1)
    assert m["forgetting_median"] == pytest.approx(0.2)  # the legacy number, unchanged


# ---------------------------------------------------------------- comparison at one rate

def test_compare_at_rate_uses_the_baseline_at_that_rate():
    base = [(0, 3.0), (10, 2.5), (20, 2.2)]
    methods = {"adamw": {0: _run(base)},
               "hot": {0: _run([(0, 3.0), (10, 2.1), (20, 1.9)])},
               "gone": {0: {"curve": [], "summary": None, "metric": None, "diverged": True}}}
    c = compare_at_rate(methods, "adamw")
    assert c["target"] == 2.2
    assert c["methods"]["hot"]["best_loss"] == 1.9 and c["methods"]["hot"]["steps"]["median"] == 10
    assert c["methods"]["hot"]["speedup"]["median"] == 2.0
    assert c["methods"]["gone"]["diverged"] and c["methods"]["gone"]["best_loss"] is None
    assert c["methods"]["gone"]["speedup"]["median"] is None
    dead = compare_at_rate({"adamw": {0: methods["gone"][0]}, "hot": methods["hot"]}, "adamw")
    assert dead["target"] is None and dead["methods"]["hot"]["speedup"] is None


# ---------------------------------------------------------------- the grid

def test_grid_edges_diverged_bounds_failed_does_not():
    scores = {1e-4: 2.0, 1e-3: 1.5, 1e-2: None}
    assert grid_edges(scores, {}, 1e-3) == {"up": True, "down": False}  # 1e-2 failed: no result
    assert grid_edges(scores, {1e-2: True}, 1e-3) == {"up": False, "down": False}  # diverged
    assert grid_edges({1e-3: 1.0}, {}, 1e-3) == {"up": True, "down": True}  # a one-rate grid
    assert grid_edges(scores, {}, None) == {"up": False, "down": False}


def test_next_rate_neighbour_ratio_or_step_three_significant_digits():
    assert next_rate([1e-4, 3e-4, 1e-3], "up") == 3.33e-3
    assert next_rate([1e-4, 3e-4, 1e-3], "down") == 3.33e-5
    assert next_rate([1e-3, 3e-3], "up", 2.0) == 6e-3
    assert next_rate([1e-3], "down", 10.0) == 1e-4
    with pytest.raises(ValueError, match="grid_step"):
        next_rate([1e-3], "up")
    with pytest.raises(ValueError, match="> 1"):
        next_rate([1e-3, 3e-3], "up", 0.5)


def test_sides_to_extend_needs_a_choice_on_the_edge_and_room_under_the_limit():
    grid = [1e-4, 3e-4, 1e-3]
    assert sides_to_extend({"a": 3e-4, "b": 3e-4}, grid, {}, 2) == []
    assert sides_to_extend({"a": 1e-3, "b": 1e-4, "c": None}, grid, {}, 2) == ["down", "up"]
    assert sides_to_extend({"a": 1e-3}, grid, {"up": 2}, 2) == []
    assert sides_to_extend({"a": 1e-3}, grid, {"up": 1}, 2) == ["up"]
