"""Event-driven scheduling of a bench's runs over one worker pool.

Each (checkpoint, task) pair advances on its own (`PairPlan`):

    tune    every method x the pair's grid x tune_seeds
    extend  while some method's chosen rate is the grid's smallest (largest) rate and that side
            has had fewer than max_grid_extensions extensions: add the rate one step beyond it,
            tune *every* method there (one grid per pair keeps the comparison fair), re-choose
    final   every method at its chosen rate x seeds (a tune run with the same rate and seed is
            reused)

Jobs that are ready wait in one queue ordered by pair (earlier pairs first, then first come);
one is handed out only when a worker is free. So the pool never idles at a phase barrier, and a
bench cut short by a time limit leaves its first pairs whole rather than every pair half-done.
"""

from __future__ import annotations

import heapq
import itertools
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterable, Optional

from dirtune.bench import metrics
from dirtune.bench.config import BenchConfig


class PairPlan:
    """One pair's way through tune -> extend -> final. `done(job)` returns the jobs that follow.

    job_fn(method, lr, seed, final) -> job dict; tune_fn(method, grid) -> {"chosen_lr", ...};
    has_runs(lr) -> whether any run of this pair at lr is on disk (report-only extends only
    over rates that were run). `progress(n_new, n_dropped)` keeps the bar's total honest.
    """

    def __init__(self, index: int, pair, cfg: BenchConfig, job_fn: Callable, tune_fn: Callable,
                 has_runs: Callable[[float], bool], report_only: bool,
                 progress: Callable[[int, int], None] = lambda new, dropped: None):
        self.index, self.pair, self.cfg = index, pair, cfg
        self.job_fn, self.tune_fn, self.has_runs = job_fn, tune_fn, has_runs
        self.report_only, self.progress = report_only, progress
        self.grid = sorted(cfg.lrs)
        self.extensions = {"down": 0, "up": 0}
        self.added: list[tuple[str, float]] = []  # (side, rate) in the order they were added
        self.blocked: dict[str, str] = {}  # side -> why the grid did not grow there
        self.tuning: dict[str, dict] = {}
        self.stage = "tune"
        self._pending: set[str] = set()

    def start(self) -> list[dict]:
        return self._expect(self._tune_jobs(self.grid))

    def done(self, job: dict) -> list[dict]:
        """Mark a job finished (or failed, or skipped); the next stage's jobs once all are."""
        self._pending.discard(job["run_dir"])
        return [] if self._pending else self._advance()

    def _tune_jobs(self, lrs: Iterable[float]) -> list[dict]:
        return [self.job_fn(m, lr, s, False) for m in self.cfg.methods for lr in lrs
                for s in self.cfg.tune_seeds]

    def _expect(self, jobs: list[dict]) -> list[dict]:
        self._pending = {j["run_dir"] for j in jobs}
        if not jobs:  # nothing to wait for: go straight on
            return self._advance()
        return jobs

    def _advance(self) -> list[dict]:
        if self.stage == "final":
            self.stage = "done"
            return []
        if self.stage != "tune":
            return []
        self.tuning = {m.name: self.tune_fn(m, self.grid) for m in self.cfg.methods}
        new = self._extend()
        if new:
            self.progress(len(self.cfg.methods) * len(self.cfg.tune_seeds) * len(new), 0)
            return self._expect(self._tune_jobs(new))
        self.stage = "final"
        jobs = [self.job_fn(m, self.tuning[m.name]["chosen_lr"], s, True) for m in self.cfg.methods
                if self.tuning[m.name]["chosen_lr"] is not None for s in self.cfg.seeds]
        self.progress(0, len(self.cfg.methods) * len(self.cfg.seeds) - len(jobs))  # tuning failed
        return self._expect(jobs)

    def _extend(self) -> list[float]:
        """Add one rate on each side where a choice sits on the grid's edge; the rates added."""
        chosen = {m: t["chosen_lr"] for m, t in self.tuning.items()}
        sides = metrics.sides_to_extend(chosen, self.grid, self.extensions,
                                        self.cfg.max_grid_extensions)
        new = []
        for side in sides:
            try:
                lr = metrics.next_rate(self.grid, side, self.cfg.grid_step)
            except ValueError as e:
                self.blocked[side] = f"grid not extended: {e}"
                continue
            if self.report_only and not self.has_runs(lr):
                self.blocked[side] = (f"grid not extended: no runs at {lr:g} in this folder "
                                      "(a report-only pass runs nothing)")
                continue
            new.append(lr)
            self.extensions[side] += 1
            self.added.append((side, lr))
        self.grid = sorted(self.grid + new)
        return new

    def edge(self, method: str) -> dict:
        """{"edge": bool, "sides": [...], "reason": str|None} for a method's settled choice."""
        t = self.tuning.get(method) or {"tuning": [], "chosen_lr": None}
        chosen = t["chosen_lr"]
        scores = {row["lr"]: row["score"] for row in t["tuning"]}
        diverged = {row["lr"]: row.get("diverged", False) for row in t["tuning"]}
        edges = metrics.grid_edges(scores, diverged, chosen)
        sides = [s for s in ("down", "up") if edges[s]]
        reasons = []
        for side in sides:
            extreme = min(self.grid) if side == "down" else max(self.grid)
            word = "smallest" if side == "down" else "largest"
            if chosen != extreme:
                beyond = [lr for lr in self.grid if (lr < chosen if side == "down" else lr > chosen)]
                nxt = max(beyond) if side == "down" else min(beyond)
                reasons.append(f"the next rate {side} ({nxt:g}) has no result for this method "
                               "(failed without diverging, or not run)")
            elif side in self.blocked:
                reasons.append(f"{word} rate of the grid; {self.blocked[side]}")
            elif self.cfg.max_grid_extensions == 0:
                reasons.append(f"{word} rate of the grid; grid extension is off "
                               "(max_grid_extensions: 0)")
            else:
                reasons.append(f"still the {word} rate after {self.extensions[side]} extension(s) "
                               f"(max_grid_extensions: {self.cfg.max_grid_extensions})")
        return {"edge": bool(sides), "sides": sides, "reason": "; ".join(reasons) or None}

    def info(self) -> dict:
        return {"lrs": list(self.grid), "base_lrs": sorted(self.cfg.lrs),
                "extensions": dict(self.extensions),
                "added": [{"side": s, "lr": lr} for s, lr in self.added],
                "blocked": dict(self.blocked)}


# ---------------------------------------------------------------- workers

class Runner:
    """Hands jobs to a spawn pool (jobs > 0) or runs them here (jobs = 0), one tqdm bar.

    `worker_init(devices, threads)` starts each pool worker (grid._init_worker: its GPU and CPU
    threads). `free()` says whether a job may be handed out now; `wait()` returns the (job, tag, result)
    of runs that ended, blocking until one does (none in flight: []).
    """

    def __init__(self, cfg: BenchConfig, total: int, execute: Callable,
                 worker_init: Optional[Callable] = None):
        from tqdm.auto import tqdm

        self.cfg, self.execute, self.worker_init = cfg, execute, worker_init
        self.bar = tqdm(total=total, desc=f"bench {cfg.name}", unit="run", dynamic_ncols=True)
        self.failed: list[dict] = []
        self.pool: Optional[ProcessPoolExecutor] = None
        self._flight: dict = {}
        self._here: list = []  # jobs=0: the result of the one job run here, until wait() takes it
        if cfg.jobs > 0:
            self._start_pool()

    def _start_pool(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        queue = ctx.Queue()
        for i in range(self.cfg.jobs):
            queue.put(self.cfg.devices[i % len(self.cfg.devices)])
        threads = max(1, (os.cpu_count() or 1) // self.cfg.jobs)
        self.pool = ProcessPoolExecutor(self.cfg.jobs, mp_context=ctx, initializer=self.worker_init,
                                        initargs=(queue, threads))

    def free(self) -> bool:
        if self.pool is None:
            return not self._here
        return len(self._flight) < self.cfg.jobs

    def busy(self) -> bool:
        return bool(self._flight or self._here)

    def submit(self, job: dict, tag) -> None:
        if self.pool is None:
            self._here.append((job, tag, self.execute(job, self.cfg.devices[0])))
            return
        try:
            fut = self.pool.submit(self.execute, job)
        except BrokenProcessPool:  # a worker died earlier: the old pool takes no more work
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._start_pool()
            fut = self.pool.submit(self.execute, job)
        self._flight[fut] = (job, tag)

    def wait(self) -> list[tuple[dict, object, dict]]:
        if self.pool is None:
            out, self._here = self._here, []
        else:
            if not self._flight:
                return []
            ended, _ = wait(list(self._flight), return_when=FIRST_COMPLETED)
            out = []
            for fut in ended:
                job, tag = self._flight.pop(fut)
                try:
                    res = fut.result()
                except Exception as e:  # the worker process died (out of memory, segfault)
                    run = Path(job["run_dir"])
                    run.mkdir(parents=True, exist_ok=True)
                    (run / "error.txt").write_text(f"worker process failed: {type(e).__name__}: {e}\n")
                    res = {"run_dir": str(run), "ok": False, "error": f"{type(e).__name__}: {e}"}
                out.append((job, tag, res))
        for _, _, res in out:
            if not res["ok"]:
                self.failed.append(res)
                self.bar.write(f"run failed: {res['run_dir']}: {res['error']}")
            self.bar.update(1)
        return out

    def skip(self, n: int = 1) -> None:
        self.bar.update(n)

    def grow(self, n: int) -> None:
        self.bar.total += n
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        if self.failed:
            print(f"{len(self.failed)} run(s) failed; each left error.txt in its folder")
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def run_plans(plans: list[PairPlan], runner: Runner, should_run: Callable[[dict], bool],
              on_submit: Callable[[dict], None] = lambda job: None) -> None:
    """Drive every plan to its end: ready jobs by (pair index, arrival), at most one per free
    worker; jobs that need no run (finished, or a report-only pass) complete at once."""
    ready: list = []
    order = itertools.count()

    def push(plan: PairPlan, jobs: list[dict]) -> None:
        for job in jobs:
            if should_run(job):
                heapq.heappush(ready, (plan.index, next(order), plan, job))
            else:
                runner.skip()
                push(plan, plan.done(job))

    for plan in plans:
        push(plan, plan.start())
    while ready or runner.busy():
        while ready and runner.free():
            _, _, plan, job = heapq.heappop(ready)
            on_submit(job)
            runner.submit(job, plan)
        for job, plan, _ in runner.wait():
            push(plan, plan.done(job))
