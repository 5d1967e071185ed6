"""The scheduler: per-pair plans (tune -> extend -> final) and the priority queue over workers,
with a fake worker pool that finishes jobs in the order they were handed out."""

from types import SimpleNamespace

import pytest

from dirtune.bench.schedule import PairPlan, run_plans


class FakeRunner:
    """`workers` slots; wait() ends the oldest job in flight."""

    def __init__(self, workers: int):
        self.workers, self.flight, self.order = workers, [], []
        self.most, self.skipped, self.total_added = 0, 0, 0

    def free(self):
        return len(self.flight) < self.workers

    def busy(self):
        return bool(self.flight)

    def submit(self, job, tag):
        self.flight.append((job, tag))
        self.order.append(job["run_dir"])
        self.most = max(self.most, len(self.flight))

    def wait(self):
        job, tag = self.flight.pop(0)
        return [(job, tag, {"ok": True})]

    def skip(self, n=1):
        self.skipped += n


def _cfg(lrs=(1e-3, 3e-3), methods=("a", "b"), limit=0, step=None):
    return SimpleNamespace(lrs=list(lrs), methods=[SimpleNamespace(name=m) for m in methods],
                           tune_seeds=[0], seeds=[0, 1, 2], max_grid_extensions=limit,
                           grid_step=step)


def _plan(index, name, cfg, best, runner=None, has_runs=lambda lr: True, report_only=False):
    """A plan whose tuning scores each rate by best(method, lr) (lower is better)."""
    def job(method, lr, seed, final):
        return {"run_dir": f"{name}/{method.name}/{lr:g}/{seed}/{'final' if final else 'tune'}"}

    def tune(method, grid):
        rows = [{"lr": lr, "score": best(method.name, lr), "diverged": False} for lr in grid]
        ok = [r for r in rows if r["score"] is not None]
        return {"tuning": rows, "chosen_lr": min(ok, key=lambda r: (r["score"], r["lr"]))["lr"]
                if ok else None}

    progress = (lambda new, dropped: (setattr(runner, "total_added", runner.total_added + new),
                                      runner.skip(dropped))) if runner else (lambda n, d: None)
    return PairPlan(index, SimpleNamespace(name=name), cfg, job, tune, has_runs, report_only, progress)


def test_earlier_pairs_follow_ups_go_first_and_no_more_in_flight_than_workers():
    cfg = _cfg()
    runner = FakeRunner(2)
    plans = [_plan(i, f"p{i}", cfg, lambda m, lr: lr) for i in range(2)]
    run_plans(plans, runner, lambda job: True)
    assert runner.most == 2
    order = [r.split("/")[0] + ("F" if r.endswith("final") else "T") for r in runner.order]
    # p0's 4 tune runs take both workers; when the 3rd ends, p1's first tune run fills the free
    # slot (no idling at p0's barrier); once p0 is tuned, its 6 final runs go before p1's tuning
    assert order == ["p0T"] * 4 + ["p1T"] + ["p0F"] * 6 + ["p1T"] * 3 + ["p1F"] * 6
    assert all(p.stage == "done" for p in plans)


def test_finished_jobs_complete_without_a_worker_and_failed_tuning_drops_finals():
    cfg = _cfg()
    runner = FakeRunner(1)
    plan = _plan(0, "p", cfg, lambda m, lr: None if m == "b" else lr, runner)
    done = {"p/a/0.001/0/tune", "p/a/0.003/0/tune"}
    run_plans([plan], runner, lambda job: job["run_dir"] not in done)
    # a's tuning was on disk; b's 2 tune runs ran, b has no rate (tuning failed): a's 3 finals
    assert runner.order == ["p/b/0.001/0/tune", "p/b/0.003/0/tune",
                            "p/a/0.001/0/final", "p/a/0.001/1/final", "p/a/0.001/2/final"]
    assert runner.skipped == 2 + 3  # 2 finished tune runs, b's 3 finals that will never run
    assert plan.tuning["b"]["chosen_lr"] is None and not plan.edge("b")["edge"]


def test_grid_grows_for_every_method_until_the_limit_then_the_edge_is_failed():
    # method a wants ever larger rates; b's best is 1e-3, inside once the grid has grown down
    cfg = _cfg(limit=2, step=3.0)
    runner = FakeRunner(3)
    plan = _plan(0, "p", cfg, lambda m, lr: -lr if m == "a" else abs(lr - 1e-3), runner)
    run_plans([plan], runner, lambda job: True)
    assert plan.grid == [3.33e-4, 1e-3, 3e-3, 9e-3, 2.7e-2]
    assert plan.extensions == {"down": 1, "up": 2}
    assert [(s, lr) for s, lr in plan.added] == [("down", 3.33e-4), ("up", 9e-3), ("up", 2.7e-2)]
    # every added rate was tuned for both methods
    tuned = {r for r in runner.order if r.endswith("tune")}
    assert {f"p/{m}/{lr:g}/0/tune" for m in "ab" for lr in plan.grid} == tuned
    assert runner.total_added == 2 * 3
    assert plan.tuning["a"]["chosen_lr"] == 2.7e-2 and plan.tuning["b"]["chosen_lr"] == 1e-3
    e = plan.edge("a")
    assert e["edge"] and e["sides"] == ["up"]
    assert e["reason"] == "still the largest rate after 2 extension(s) (max_grid_extensions: 2)"
    assert not plan.edge("b")["edge"]
    assert plan.info()["added"] == [{"side": "down", "lr": 3.33e-4}, {"side": "up", "lr": 9e-3},
                                    {"side": "up", "lr": 2.7e-2}]


@pytest.mark.parametrize("limit, reason", [
    (0, "smallest rate of the grid; grid extension is off (max_grid_extensions: 0)"),
    (1, "smallest rate of the grid; grid not extended: no runs at 0.000333 in this folder"),
])
def test_report_only_grows_only_over_rates_that_were_run(limit, reason):
    cfg = _cfg(limit=limit)
    runner = FakeRunner(1)
    plan = _plan(0, "p", cfg, lambda m, lr: lr, runner, has_runs=lambda lr: False, report_only=True)
    run_plans([plan], runner, lambda job: False)
    assert runner.order == [] and plan.grid == [1e-3, 3e-3]
    e = plan.edge("a")
    assert e["edge"] and e["sides"] == ["down"] and e["reason"].startswith(reason)


def test_a_failed_neighbour_leaves_the_choice_unbounded():
    cfg = _cfg(lrs=(1e-4, 1e-3, 3e-3))
    plan = _plan(0, "p", cfg, lambda m, lr: None if lr == 3e-3 else -lr)
    run_plans([plan], FakeRunner(2), lambda job: True)
    e = plan.edge("a")  # chose 1e-3; 3e-3 failed without diverging: no result above it
    assert plan.tuning["a"]["chosen_lr"] == 1e-3 and e["edge"] and e["sides"] == ["up"]
    assert "the next rate up (0.003) has no result" in e["reason"]
