"""run_bench: the runs behind a bench file, then the report.

    per pair (schedule.py; pairs overlap on one worker pool, earlier pairs first)
      tune    every method x the pair's lr grid x tune_seeds -> chosen lr per method
              (lowest mean best validation loss over the tune seeds; ties -> smaller lr)
      extend  a chosen lr on the grid's edge: one more rate beyond it, for every method,
              re-choose; at most max_grid_extensions per side
      final   every method at its chosen lr x seeds -> curves, losses, metric
              (a tune run with the same lr and seed is reused, not redone)
    report    target T per pair from the baseline's final curves, steps to T and to fractions
              of the baseline's improvement, speedups, the comparison at every rate

Runs go to <out>/runs/<pair>/<method>/lr<lr>_s<seed>/ and are made by the training entry
(`dirtune.train.runner:run_training`) in worker processes; the bench only reads their folders.
A run whose summary.json exists is not redone, and an unfinished one continues from its newest
checkpoint (resume; this assumes the bench file did not change: after changing it, use a new
output folder or --fresh). A failed run leaves error.txt and the bench goes on. Each worker
holds one device of `devices` (round-robin over workers) for life.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from dirtune.bench import metrics
from dirtune.bench.config import BenchConfig, run_config
from dirtune.bench.schedule import PairPlan, Runner, run_plans
from dirtune.train import run_folder
from dirtune.train.gpus import narrow_visible_gpus

DEFAULT_ENTRY = "dirtune.train.runner:run_training"


# ---------------------------------------------------------------- one run (worker side)

_WORKER_DEVICE: Optional[str] = None  # what the worker passes to training: cpu, cuda, auto
_WORKER_DEVICE_NAME: Optional[str] = None  # as the bench file names it, e.g. cuda:3


def _init_worker(devices: Any, threads: int) -> None:
    """Pool initializer (before torch is imported): take this worker's device from the shared
    queue, once, and share the CPU cores between the workers."""
    global _WORKER_DEVICE, _WORKER_DEVICE_NAME
    device = _WORKER_DEVICE = _WORKER_DEVICE_NAME = devices.get()
    if device.startswith("cuda:"):
        # this worker sees only its GPU, as "cuda", for training and for the metric alike
        narrow_visible_gpus(int(device.split(":", 1)[1]))
        _WORKER_DEVICE = "cuda"
    # torch starts one thread per core in every process: 2 workers on 2 cores ran 20x slower
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    # many workers drawing "Loading weights" bars would bury the bench's one bar
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _entry(entry: str) -> Callable:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def execute(job: dict, device: Optional[str] = None) -> dict:
    """Train one run (unless finished) and compute its metric (unless done); never raises.

    Returns {"run_dir", "ok", "error"}; on failure the traceback is also in run_dir/error.txt.
    """
    device = device or _WORKER_DEVICE or "auto"
    run = Path(job["run_dir"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "error.txt").unlink(missing_ok=True)
    (run / "bench_run.json").write_text(json.dumps(
        {k: job[k] for k in ("pair", "method", "lr", "seed")} | {"device": _WORKER_DEVICE_NAME or device}))
    try:
        cfg = job["config"]
        if hasattr(cfg.train, "device"):
            cfg.train.device = device
        if not (job["resume"] and (run / "summary.json").is_file()):
            (run / "metric.json").unlink(missing_ok=True)
            # an unfinished run continues from its newest checkpoint (or restarts if it has none);
            # weights-only checkpoints cannot be continued, so such a run starts again
            resumable = not getattr(cfg.train, "save_only_model", False)
            cfg.train.resume = "auto" if job["resume"] and resumable else None
            _entry(job["entry"])(cfg)
            if not (run / "summary.json").is_file():
                raise RuntimeError("the training entry returned but wrote no summary.json "
                                   "(interrupted, or stopped on a non-finite loss)")
        if job["metric"] and not (run / "metric.json").is_file():
            _write_metric(run, job["metric"], cfg, device)
        return {"run_dir": str(run), "ok": True, "error": None}
    except BaseException as e:  # noqa: BLE001 - one failed run must not stop the bench
        text = traceback.format_exc()
        (run / "error.txt").write_text(text, encoding="utf-8")
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"run_dir": str(run), "ok": False, "error": f"{type(e).__name__}: {e}"}


def _write_metric(run: Path, spec: dict, cfg: Any, device: str) -> None:
    """Greedy-generation metric on the run's best checkpoint -> run/metric.json."""
    import torch

    from dirtune.bench import tasks

    summary = json.loads((run / "summary.json").read_text())
    ckpt = summary.get("best_checkpoint")
    if not ckpt or not Path(ckpt).is_dir():
        raise FileNotFoundError(f"{run}: no best checkpoint to compute {spec['name']} on ({ckpt!r})")
    # a pool worker sees only its own GPU; in-process, run_training narrowed the visible ones
    dev = "cpu" if device == "cpu" or not torch.cuda.is_available() else "cuda"
    model, tokenizer = tasks.load_checkpoint(ckpt, dev)
    records = tasks.load_records(spec["file"], spec["samples"])
    try:
        prompt_fn = tasks.training_prompt(cfg.data.template, tokenizer)
    except ImportError:
        prompt_fn = tasks.prompt_text
    res = tasks.evaluate_generation(model, tokenizer, records, prompt_fn, spec["max_new_tokens"],
                                    spec["batch_size"], answer_fn=tasks.METRICS[spec["name"]])
    out = {"metric": spec["name"], "value": res["exact_match"], "n": res["n"],
           "checkpoint": ckpt, "file": spec["file"], "samples": res["samples"][:20]}
    (run / "metric.json").write_text(json.dumps(out, indent=2))


# ---------------------------------------------------------------- reading run folders

def run_path(out_dir: str | Path, pair: str, method: str, lr: float, seed: int) -> Path:
    return Path(out_dir) / "runs" / pair / method / f"lr{lr:g}_s{seed}"


_FORGET_KEY = re.compile(r"forget_(.+)_loss")


def read_run(run: str | Path) -> dict:
    """What the bench uses of a run folder: eval curve, forget curves (the legacy set and each
    named set), angle curve, summary, metric value, error text, and whether it diverged (no
    finite loss). A run without summary.json has summary None (failed)."""
    run = Path(run)
    evals: dict[int, dict] = {}
    angle: dict[int, float] = {}
    stopped = False  # the runner logs a non-finite loss or gradient that stopped the run
    for r in run_folder.read_metrics(run / "metrics.jsonl"):  # lines cut short by a crash left out
        if r.get("kind") == "eval" and "eval_loss" in r:
            evals[int(r["step"])] = r  # a resumed run may repeat a step: keep the last
        elif r.get("kind") == "train" and "angle/mean" in r:
            angle[int(r["step"])] = float(r["angle/mean"])
        elif r.get("kind") == "event" and "non-finite" in str(r.get("event", "")):
            stopped = stopped or "stopped" in str(r["event"])

    def load(name: str) -> Any:
        p = run / name
        return json.loads(p.read_text()) if p.is_file() else None

    metric, summary = load("metric.json"), load("summary.json")
    err = run / "error.txt"
    error = err.read_text(encoding="utf-8").strip().splitlines()[-1] if err.is_file() else None
    steps = sorted(evals)
    names = list(dict.fromkeys(m.group(1) for s in steps for k in evals[s]
                               if (m := _FORGET_KEY.fullmatch(k))))
    best = (summary or {}).get("best_eval_loss")
    if summary is not None:
        diverged = not (isinstance(best, (int, float)) and math.isfinite(best))
    else:
        diverged = stopped or "NonFiniteError" in (error or "")
    return {
        "dir": str(run),
        "curve": [(s, _num(evals[s]["eval_loss"])) for s in steps],
        "forget_curve": [(s, _num(evals[s]["forget_loss"])) for s in steps if "forget_loss" in evals[s]],
        "forget_curves": {n: [(s, _num(evals[s][f"forget_{n}_loss"])) for s in steps
                              if f"forget_{n}_loss" in evals[s]] for n in names},
        "angle": sorted(angle.items()),
        "summary": summary,
        "metric": metric["value"] if metric else None,
        "error": error,
        "diverged": diverged,
    }


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


# ---------------------------------------------------------------- the grid

def _finished(run: Path, metric: Optional[dict]) -> bool:
    return (run / "summary.json").is_file() and (not metric or (run / "metric.json").is_file())


def _has_runs(out: Path, pair: str, lr: float) -> bool:
    """Whether any run of `pair` at `lr` ended (finished or failed) in this folder."""
    return any((d / "summary.json").is_file() or (d / "error.txt").is_file()
               for d in (out / "runs" / pair).glob(f"*/lr{lr:g}_s*"))


def run_bench(cfg: BenchConfig, out_dir: str | Path | None = None, resume: bool = True, *,
              entry: str = DEFAULT_ENTRY, report_only: bool = False) -> dict:
    """Run the bench (schedule.py: per pair tune, extend the grid, final seeds), write
    out_dir/{bench.yaml, commit.txt, report.md, summary.json, *.png}, and return the results
    (the input of report.write_report).

    `entry` ("module:function") is the training entry the workers call; tests point it at a fake.
    `resume`: keep runs that already finished; False redoes every run once.
    `report_only`: run nothing; report on the runs already in out_dir (a bench cut short by a
    time limit), keeping its bench.yaml and commit.txt; missing runs count as not finished, and
    a grid grows only over rates whose runs are there.
    """
    from dirtune.bench.report import commit_line, write_report

    out = Path(out_dir or cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg.output_dir = str(out)
    if not report_only or not (out / "commit.txt").exists():
        cfg.dump(out / "bench.yaml")
        (out / "commit.txt").write_text(_commit())
    redone: set[str] = set()  # runs made during this call: later stages reuse them even if not resume

    def plan_for(index: int, pair) -> PairPlan:
        def job(method, lr, seed, final) -> dict:
            run = run_path(out, pair.name, method.name, lr, seed)
            return {"run_dir": str(run), "entry": entry, "pair": pair.name, "method": method.name,
                    "lr": lr, "seed": seed, "resume": resume or str(run) in redone,
                    "metric": _metric_spec(pair, cfg, method) if final else None,
                    "config": run_config(cfg, pair, method, lr, seed, run, "auto")}

        return PairPlan(index, pair, cfg, job,
                        lambda method, lrs: _tune(out, pair.name, method.name, lrs, cfg),
                        lambda lr: _has_runs(out, pair.name, lr), report_only,
                        lambda new, dropped: (runner.grow(new), runner.skip(dropped)))

    def should_run(job: dict) -> bool:
        return not report_only and not (job["resume"] and _finished(Path(job["run_dir"]), job["metric"]))

    per_pair = len(cfg.methods) * (len(cfg.lrs) * len(cfg.tune_seeds) + len(cfg.seeds))
    runner = Runner(cfg, len(cfg.pairs) * per_pair, execute, worker_init=_init_worker)
    plans = [plan_for(i, p) for i, p in enumerate(cfg.pairs)]
    try:
        run_plans(plans, runner, should_run, lambda job: redone.add(job["run_dir"]))
    finally:
        runner.close()

    results = {"bench": _bench_info(cfg), "pairs": {}}
    if report_only:
        results["bench"]["report_commit"] = commit_line(_commit())
    for plan in plans:
        results["pairs"][plan.pair.name] = _pair_results(out, plan, cfg)
    write_report(out, results)
    return results


def _pair_results(out: Path, plan: PairPlan, cfg: BenchConfig) -> dict:
    """One pair's entry of the results: runs read back, the grid, the comparison at every rate,
    the count of runs that never started, and the analysis."""
    name = plan.pair.name
    methods, at_rates = {}, {}
    for m in cfg.methods:
        t = plan.tuning.get(m.name) or {"tuning": [], "chosen_lr": None}
        lr = t["chosen_lr"]
        runs = {s: read_run(run_path(out, name, m.name, lr, s)) for s in cfg.seeds} if lr else {}
        methods[m.name] = {**t, "runs": runs, "edge": plan.edge(m.name)}
    for lr in plan.grid:
        at_rates[lr] = metrics.compare_at_rate(
            {m.name: {s: read_run(run_path(out, name, m.name, lr, s)) for s in cfg.tune_seeds}
             for m in cfg.methods}, cfg.baseline)
    expected = {run_path(out, name, m.name, lr, s) for m in cfg.methods for lr in plan.grid
                for s in cfg.tune_seeds}
    expected |= {run_path(out, name, m, methods[m]["chosen_lr"], s) for m in methods
                 if methods[m]["chosen_lr"] is not None for s in cfg.seeds}
    missing = sum(not ((d / "summary.json").is_file() or (d / "error.txt").is_file()) for d in expected)
    return {"metric": plan.pair.metric, "methods": methods, "at_rates": at_rates,
            "grid": {**plan.info(), "missing_runs": missing},
            "analysis": metrics.analyse_pair(methods, cfg.baseline)}


def _tune(out: Path, pair: str, method: str, lrs: list[float], cfg: BenchConfig) -> dict:
    """Tuning scores per lr (mean best validation loss over the tune seeds; None if any tune
    run failed or diverged) and the chosen lr (None if no lr has a score)."""
    rows = []
    for lr in sorted(lrs):
        bests, errors, diverged = {}, {}, False
        for s in cfg.tune_seeds:
            run = read_run(run_path(out, pair, method, lr, s))
            b = run["summary"].get("best_eval_loss") if run["summary"] else None
            bests[s] = b if isinstance(b, (int, float)) and math.isfinite(b) else None
            diverged = diverged or run["diverged"]
            if run["summary"] is None:
                errors[s] = run["error"] or "no summary.json"
        ok = all(b is not None for b in bests.values())
        rows.append({"lr": lr, "best_loss": bests, "errors": errors, "diverged": diverged,
                     "score": sum(bests.values()) / len(bests) if ok else None})
    try:
        chosen = metrics.choose_lr({r["lr"]: r["score"] for r in rows})
    except ValueError:
        chosen = None
    return {"tuning": rows, "chosen_lr": chosen}


def _metric_spec(pair, cfg: BenchConfig, method) -> Optional[dict]:
    if pair.metric == "none":
        return None
    file = pair.metric_file or run_config(cfg, pair, method, cfg.lrs[0], 0, "x", "auto").data.test_file
    return {"name": pair.metric, "file": str(file), "samples": pair.metric_samples,
            "max_new_tokens": pair.metric_max_new_tokens, "batch_size": pair.metric_batch_size}


def _bench_info(cfg: BenchConfig) -> dict:
    probe = run_config(cfg, cfg.pairs[0], cfg.methods[0], cfg.lrs[0], cfg.seeds[0], "x", "auto")
    return {"name": cfg.name, "baseline": cfg.baseline, "lrs": list(cfg.lrs),
            "max_grid_extensions": cfg.max_grid_extensions, "grid_step": cfg.grid_step,
            "tune_seeds": list(cfg.tune_seeds), "seeds": list(cfg.seeds),
            "max_steps": probe.train.max_steps, "eval_every": probe.train.eval_every,
            "methods": {m.name: list(m.overrides) for m in cfg.methods},
            "pairs": {p.name: list(p.overrides) for p in cfg.pairs}}


def _commit() -> str:
    """commit.txt: the git commit of the dirtune source tree and whether the package (src/dirtune)
    had uncommitted changes; results folders and bench files are not code (bench.yaml records the
    bench as run), and a report-only pass over several folders edits tracked results."""
    state = run_folder.git_state(package_only=True)
    if state is None:
        return "commit: unknown (not a git checkout)\n"
    return f"commit: {state[0]}\ndirty: {str(state[1]).lower()}\n"