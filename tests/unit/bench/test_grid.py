"""The grid: tuning, grid extension, final seeds, resume, failures, scheduling, pool workers,
with a fake trainer.

The fake training entry writes a run folder (metrics.jsonl, summary.json) whose validation
curve depends only on (method, lr); the method is the run folder's parent name:
adamw reaches its best loss 1.0 at step 100 at lr 1e-3 (1.5 elsewhere); `fast` reaches 0.9,
passing 1.0 at step 50, at lr 3e-3 (1.2 elsewhere): speedup 2.0; `hot` gets better the larger
the rate (it always wants the grid's top); `capped` is `hot` but diverges above 5e-3;
`broken` always raises. Each run logs the legacy forget_loss and two named forget sets.
"""

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from dirtune.bench.config import load_bench_config
from dirtune.bench.grid import read_run, run_bench, run_path

FAKE = textwrap.dedent('''
    import json
    import math
    from pathlib import Path

    class NonFiniteError(RuntimeError):
        pass

    def loss(method, lr, step):
        if method == "adamw":
            return 3 - 0.02 * step if lr == 1e-3 else max(3 - 0.01 * step, 1.5)
        if method in ("hot", "capped"):
            return max(3 - 0.02 * step, 2.0 - 0.3 * math.log10(lr / 1e-4))
        return max(3 - 0.04 * step, 0.9) if lr == 3e-3 else max(3 - 0.01 * step, 1.2)

    def run_training(cfg):
        out = Path(cfg.train.output_dir)
        root = out.parents[3]
        calls = root / "calls.txt"
        stop = root / "stop_after"
        if stop.is_file() and calls.is_file() and \\
                len(calls.read_text().splitlines()) >= int(stop.read_text()):
            raise KeyboardInterrupt  # a time limit cutting the bench short
        with open(calls, "a") as f:
            f.write(f"{out.relative_to(root)} {cfg.train.device} {cfg.train.resume}\\n")
        method = out.parent.name
        if method == "broken":
            raise RuntimeError("loss exploded on purpose")
        out.mkdir(parents=True, exist_ok=True)
        if method == "capped" and cfg.optimizer.lr > 5e-3:
            (out / "metrics.jsonl").write_text(json.dumps(
                {"kind": "event", "step": 3, "event": "non-finite loss: stopped"}) + "\\n")
            raise NonFiniteError("step 3: the loss is NaN or Inf")
        steps = list(range(0, cfg.train.max_steps + 1, cfg.train.eval_every))
        lines, evals = [], []
        for s in steps:
            if s:
                lines.append({"kind": "train", "step": s, "loss": 1.0, "angle/mean": 0.1 * s})
            l = loss(method, cfg.optimizer.lr, s)
            evals.append((s, l))
            lines.append({"kind": "eval", "step": s, "eval_loss": l, "forget_loss": 2.0 + s / 1000,
                          "forget_wiki_loss": 3.0 + s / 500, "forget_code_loss": 1.0 + s / 100})
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in lines))
        best = min(evals, key=lambda p: (p[1], p[0]))
        end = steps[-1]
        summary = {"target_loss": None, "target_step": None, "best_eval_loss": best[1],
                   "best_step": best[0], "final_eval_loss": evals[-1][1], "final_step": end,
                   "stopped_early": False, "test_loss": best[1] + 0.1,
                   "forget_loss_start": 2.0, "forget_loss_end": 2.0 + end / 1000,
                   "forget": {"wiki": {"start": 3.0, "end": 3.0 + end / 500,
                                       "at_best": 3.0 + best[0] / 500},
                              "code": {"start": 1.0, "end": 1.0 + end / 100}},
                   "epochs": 2.5, "best_checkpoint": None, "wall_time_s": 0.0}
        (out / "summary.json").write_text(json.dumps(summary))
        return summary
''')
ENTRY = "fake_dirtune_train:run_training"


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """load(*overrides, methods=..., pairs=...) -> BenchConfig of a bench over the fake."""
    (tmp_path / "fake_dirtune_train.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"path": "m"},
                                                        "data": {"train_file": "t.jsonl"}}))

    def load(*overrides, methods=("adamw", "fast", "broken"), pairs=("p1",)):
        spec = {"name": "fake", "base": "base.yaml", "lrs": [1e-3, 3e-3], "seeds": [0, 1, 2],
                "tune_seeds": [0], "max_steps": 100, "eval_every": 10, "jobs": 0, "devices": ["cpu"],
                "pairs": [{"name": p, "overrides": ["data.forget_file=f.txt"]} for p in pairs],
                "methods": [{"name": m, "overrides": []} for m in methods]}
        (tmp_path / "bench.yaml").write_text(yaml.safe_dump(spec))
        return load_bench_config(tmp_path / "bench.yaml", list(overrides))
    return load


def _calls(out: Path) -> list[str]:
    p = out / "calls.txt"
    return p.read_text().splitlines() if p.is_file() else []


def test_tune_extend_choose_reuse_tune_run_and_measure_speedup(bench, tmp_path):
    out = tmp_path / "res" / "b"
    res = run_bench(bench(), out, entry=ENTRY)
    calls = _calls(out)
    # tune: 3 methods x 2 lrs; adamw chose the smallest rate and fast the largest, so the grid
    # grows one rate each way for all 3 methods (the neighbouring ratio, 3); then adamw and fast
    # at seeds 1, 2 (seed 0 reused)
    assert len(calls) == 6 + 6 + 4 and all(c.endswith(" cpu auto") for c in calls)
    assert len(set(calls)) == len(calls)
    p = res["pairs"]["p1"]
    assert p["grid"]["lrs"] == [3.33e-4, 1e-3, 3e-3, 9e-3]
    assert p["grid"]["extensions"] == {"down": 1, "up": 1} and p["grid"]["missing_runs"] == 0
    assert {c.split()[0] for c in calls[6:12]} == {
        f"runs/p1/{m}/lr{lr}_s0" for m in ("adamw", "fast", "broken") for lr in ("0.000333", "0.009")}
    m = p["methods"]
    assert m["adamw"]["chosen_lr"] == 1e-3 and m["fast"]["chosen_lr"] == 3e-3
    assert not m["adamw"]["edge"]["edge"] and not m["fast"]["edge"]["edge"]
    assert m["broken"]["chosen_lr"] is None and m["broken"]["runs"] == {}
    a = p["analysis"]
    assert a["target"] == pytest.approx(1.0) and a["start_loss"] == pytest.approx(3.0)
    assert a["methods"]["adamw"]["steps_to_target"] == {0: 100, 1: 100, 2: 100}
    assert a["methods"]["fast"]["steps"]["median"] == 50
    assert a["methods"]["fast"]["speedup"]["median"] == pytest.approx(2.0)
    # 50% of adamw's improvement (3 -> 1) is 2.0: adamw at step 50, fast at step 25 -> 30
    half = a["methods"]["fast"]["fractions"][0.5]
    assert half["target"] == pytest.approx(2.0) and half["steps"]["median"] == 30
    assert a["methods"]["fast"]["forgetting_median"] == pytest.approx(0.1)
    sets = a["methods"]["fast"]["forget_sets"]
    assert sets["wiki"]["end_median"] == pytest.approx(0.2)
    # fast's best (0.9) is first reached at step 60: wiki from summary.json's at_best, code
    # (no at_best there) read off its forget curve at best_step
    assert sets["wiki"]["at_best_median"] == pytest.approx(0.12)
    assert sets["code"]["at_best_median"] == pytest.approx(0.6)
    assert a["methods"]["fast"]["epochs_median"] == 2.5
    # at 3e-3 adamw's best is 2.0 (at step 100): fast, against adamw at the same rate, gets
    # there at step 30, 3.33x sooner
    at = p["at_rates"][3e-3]
    assert at["target"] == pytest.approx(2.0)
    assert at["methods"]["fast"]["steps"]["median"] == 30
    assert at["methods"]["fast"]["speedup"]["median"] == pytest.approx(100 / 30)
    assert at["methods"]["broken"]["best_loss"] is None and at["methods"]["broken"]["steps"]["reached"] == 0
    err = run_path(out, "p1", "broken", 1e-3, 0) / "error.txt"
    assert "loss exploded on purpose" in err.read_text()
    for name in ("bench.yaml", "commit.txt", "report.md", "summary.json", "val_loss_p1.png",
                 "rates_p1.png", "tradeoff_p1.png"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "bench.yaml").read_text())["output_dir"] == str(out.resolve())
    assert (out / "commit.txt").read_text().startswith("commit: ")
    s = json.loads((out / "summary.json").read_text())
    assert s["pairs"]["p1"]["methods"]["adamw"]["edge"] is False
    assert s["pairs"]["p1"]["methods"]["fast"]["runs"]["1"] == "runs/p1/fast/lr0.003_s1"


def test_resume_redoes_only_failed_runs_and_fresh_redoes_each_once(bench, tmp_path):
    out = tmp_path / "b"
    run_bench(bench(), out, entry=ENTRY)
    n = len(_calls(out))
    run_bench(bench(), out, entry=ENTRY)
    again = _calls(out)[n:]
    assert len(again) == 4 and all("broken" in c for c in again)  # only the failed tune runs
    (out / "calls.txt").unlink()
    run_bench(bench(), out, resume=False, entry=ENTRY)
    fresh = _calls(out)
    assert len(fresh) == 16 and len(set(fresh)) == 16
    assert all(c.endswith(" None") for c in fresh)  # --fresh: no resuming from checkpoints


def test_weights_only_runs_restart_instead_of_resuming(bench, tmp_path):
    out = tmp_path / "b"
    run_bench(bench("overrides=[train.save_only_model=true]"), out, entry=ENTRY)
    calls = _calls(out)
    assert len(calls) == 16 and all(c.endswith(" None") for c in calls)


def test_choice_still_on_the_edge_after_the_limit_is_failed(bench, tmp_path):
    out = tmp_path / "b"
    res = run_bench(bench("max_grid_extensions=2", methods=("adamw", "hot")), out, entry=ENTRY)
    p = res["pairs"]["p1"]
    # hot wants ever larger rates: up twice (3e-3 * 3, then * 3); adamw's 1e-3 made the grid
    # grow down once, after which 1e-3 is inside
    assert p["grid"]["lrs"] == [3.33e-4, 1e-3, 3e-3, 9e-3, 2.7e-2]
    assert p["grid"]["extensions"] == {"down": 1, "up": 2}
    assert p["methods"]["hot"]["chosen_lr"] == 2.7e-2
    edge = p["methods"]["hot"]["edge"]
    assert edge["edge"] and edge["sides"] == ["up"] and "max_grid_extensions: 2" in edge["reason"]
    assert not p["methods"]["adamw"]["edge"]["edge"]
    s = json.loads((out / "summary.json").read_text())["pairs"]["p1"]["methods"]
    assert s["hot"]["edge"] is True and s["adamw"]["edge"] is False
    md = (out / "report.md").read_text()
    assert "**FAILED: hot** (chosen lr 0.027)" in md
    assert "| hot | 0.027 | **FAILED** |" in md


def test_a_diverged_rate_bounds_the_grid(bench, tmp_path):
    out = tmp_path / "b"
    res = run_bench(bench(methods=("adamw", "capped")), out, entry=ENTRY)
    p = res["pairs"]["p1"]
    assert p["grid"]["lrs"] == [3.33e-4, 1e-3, 3e-3, 9e-3]
    rows = {row["lr"]: row for row in p["methods"]["capped"]["tuning"]}
    assert rows[9e-3]["diverged"] and rows[9e-3]["score"] is None
    assert "NonFiniteError" in rows[9e-3]["errors"][0]
    assert p["methods"]["capped"]["chosen_lr"] == 3e-3
    assert not p["methods"]["capped"]["edge"]["edge"]  # next to a diverged rate: bounded
    assert p["at_rates"][9e-3]["methods"]["capped"]["diverged"]
    md = (out / "report.md").read_text()
    assert "**FAILED:" not in md and "Grid check: ok" in md
    assert "| capped | 1.8433 | 1.7000 | **1.5569** | diverged |" in md
    assert "capped tuning run lr 0.009 seed 0 diverged (no finite loss): " in md


def test_report_only_does_not_extend_and_says_failed(bench, tmp_path):
    out = tmp_path / "b"
    run_bench(bench("max_grid_extensions=0"), out, entry=ENTRY)  # a bench from before extensions
    n = len(_calls(out))
    res = run_bench(bench(), out, entry=ENTRY, report_only=True)
    assert len(_calls(out)) == n  # nothing ran
    p = res["pairs"]["p1"]
    assert p["grid"]["lrs"] == [1e-3, 3e-3]
    assert "no runs at 0.000333 in this folder" in p["grid"]["blocked"]["down"]
    edge = p["methods"]["adamw"]["edge"]
    assert edge["edge"] and "grid not extended" in edge["reason"]
    md = (out / "report.md").read_text()
    assert "**FAILED: adamw** (chosen lr 0.001)" in md and "**FAILED: fast** (chosen lr 0.003)" in md
    assert "this report written from the runs in this folder (--report-only)" in md


def test_earlier_pairs_finish_first_and_a_cut_short_bench_leaves_whole_pairs(bench, tmp_path):
    out = tmp_path / "b"
    run_bench(bench(methods=("adamw", "fast"), pairs=("p1", "p2")), out, entry=ENTRY)
    calls = [c.split("/")[1] for c in _calls(out)]
    # each pair: 4 tune + 4 extension + 4 final runs; p1's follow-ups go before p2's tuning
    assert calls == ["p1"] * 12 + ["p2"] * 12
    # a time limit stops the 15th run: p1 is whole, p2 has 2 tune runs, the 3rd was cut
    # (error.txt) and the 4th never started
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "stop_after").write_text("14")
    with pytest.raises(KeyboardInterrupt):
        run_bench(bench(methods=("adamw", "fast"), pairs=("p1", "p2")), cut, entry=ENTRY)
    res = run_bench(bench(methods=("adamw", "fast"), pairs=("p1", "p2")), cut, entry=ENTRY,
                    report_only=True)
    p1, p2 = res["pairs"]["p1"], res["pairs"]["p2"]
    assert p1["grid"]["missing_runs"] == 0 and p1["analysis"]["methods"]["fast"]["failed"] == []
    assert p1["analysis"]["methods"]["fast"]["speedup"]["median"] == pytest.approx(2.0)
    assert p2["grid"]["lrs"] == [1e-3, 3e-3]  # its extension runs never started
    assert "KeyboardInterrupt" in p2["methods"]["fast"]["tuning"][0]["errors"][0]
    # missing: fast's tune run at 3e-3, adamw's final seeds 1 and 2 (fast has no rate to run)
    assert p2["grid"]["missing_runs"] == 3 and p2["methods"]["fast"]["chosen_lr"] is None
    md = (cut / "report.md").read_text()
    assert "is not complete" not in md.split("## p2")[0]
    assert "**This pair is not complete**: 3 of its runs are missing" in md.split("## p2")[1]
    # resuming finishes p2 without redoing p1
    (cut / "stop_after").unlink()
    n = len(_calls(cut))
    run_bench(bench(methods=("adamw", "fast"), pairs=("p1", "p2")), cut, entry=ENTRY)
    assert {c.split("/")[1] for c in _calls(cut)[n:]} == {"p2"}


def test_read_run_skips_torn_lines_and_keeps_last_of_a_repeated_step(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"kind": "eval", "step": 0, "eval_loss": 3.0}\n'
        '{"kind": "eval", "step": 10, "eval_loss": 2.5}\n'
        '{"kind": "eval", "step": 10, "eval_loss": 2.4}\n'
        '{"kind": "train", "step": 10, "loss": 2.0, "angle/mean": 1.5}\n'
        '{"kind": "eval", "step": 20, "eval_lo')
    r = read_run(run)
    assert r["curve"] == [(0, 3.0), (10, 2.4)] and r["angle"] == [(10, 1.5)]
    assert r["summary"] is None and r["metric"] is None and r["error"] is None


def test_read_run_named_forget_curves_and_divergence(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"kind": "eval", "step": 0, "eval_loss": 3.0, "forget_loss": 2.0, "forget_wiki_loss": 4.0}\n'
        '{"kind": "eval", "step": 10, "eval_loss": 2.5, "forget_wiki_loss": 4.5, "forget_code_loss": 1.5}\n'
        '{"kind": "event", "step": 12, "event": "non-finite loss: stopped"}\n')
    r = read_run(run)
    assert r["forget_curve"] == [(0, 2.0)]
    assert r["forget_curves"] == {"wiki": [(0, 4.0), (10, 4.5)], "code": [(10, 1.5)]}
    assert r["diverged"] and r["summary"] is None
    (run / "summary.json").write_text('{"best_eval_loss": "nan"}')
    assert read_run(run)["diverged"]  # a summary without a finite loss
    (run / "summary.json").write_text('{"best_eval_loss": 2.5}')
    assert not read_run(run)["diverged"]


@pytest.mark.slow
def test_pool_of_spawned_workers_gives_the_same_result(bench, tmp_path):
    out = tmp_path / "pool"
    res = run_bench(bench("jobs=2"), out, entry=ENTRY)
    assert len(_calls(out)) == 16
    s = json.loads((out / "summary.json").read_text())
    assert s["pairs"]["p1"]["methods"]["fast"]["speedup"]["median"] == pytest.approx(2.0)
    assert res["pairs"]["p1"]["methods"]["broken"]["chosen_lr"] is None


@pytest.mark.parametrize("visible, device, seen", [("2,3", "cuda:1", "3"), (None, "cuda:1", "1")])
def test_worker_takes_one_device_and_sees_only_its_gpu(monkeypatch, visible, device, seen):
    import os
    import queue

    from dirtune.bench import grid

    for var in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "HF_HUB_DISABLE_PROGRESS_BARS"):  # touched first so that monkeypatch restores them
        monkeypatch.delenv(var, raising=False)
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(grid, "_WORKER_DEVICE", None)
    monkeypatch.setattr(grid, "_WORKER_DEVICE_NAME", None)
    q = queue.Queue()
    q.put(device)
    grid._init_worker(q, 3)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == seen
    assert grid._WORKER_DEVICE == "cuda" and grid._WORKER_DEVICE_NAME == device
    assert os.environ["OMP_NUM_THREADS"] == "3"
