"""The grid: phase 1 / phase 2 expansion, resume, failures, pool workers, with a fake trainer.

The fake training entry writes a run folder (metrics.jsonl, summary.json) whose validation
curve depends only on (method, lr): adamw reaches its best loss 1.0 at step 100 at lr 1e-3;
`fast` reaches 1.0 at step 50 at lr 3e-3 (speedup 2.0); `broken` always raises.
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
    from pathlib import Path

    def loss(method, lr, step):
        if method == "adamw":
            return 3 - 0.02 * step if lr == 1e-3 else max(3 - 0.01 * step, 1.5)
        return max(3 - 0.04 * step, 0.9) if lr == 3e-3 else max(3 - 0.01 * step, 1.2)

    def run_training(cfg):
        out = Path(cfg.train.output_dir)
        root = out.parents[3]
        with open(root / "calls.txt", "a") as f:
            f.write(f"{out.relative_to(root)} {cfg.train.device} {cfg.train.resume}\\n")
        method = "adamw" if cfg.optimizer.name == "adamw" else (
            "broken" if cfg.method.penalty == "coupled" else "fast")
        if method == "broken":
            raise RuntimeError("loss exploded on purpose")
        out.mkdir(parents=True, exist_ok=True)
        steps = list(range(0, cfg.train.max_steps + 1, cfg.train.eval_every))
        lines, evals = [], []
        for s in steps:
            if s:
                lines.append({"kind": "train", "step": s, "loss": 1.0, "angle/mean": 0.1 * s})
            l = loss(method, cfg.optimizer.lr, s)
            evals.append((s, l))
            lines.append({"kind": "eval", "step": s, "eval_loss": l, "forget_loss": 2.0 + s / 1000})
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in lines))
        best = min(evals, key=lambda p: (p[1], p[0]))
        summary = {"target_loss": None, "target_step": None, "best_eval_loss": best[1],
                   "best_step": best[0], "final_eval_loss": evals[-1][1], "final_step": steps[-1],
                   "stopped_early": False, "test_loss": evals[-1][1] + 0.1,
                   "forget_loss_start": 2.0, "forget_loss_end": 2.0 + steps[-1] / 1000,
                   "best_checkpoint": None, "wall_time_s": 0.0}
        (out / "summary.json").write_text(json.dumps(summary))
        return summary
''')


@pytest.fixture
def bench(tmp_path, monkeypatch):
    (tmp_path / "fake_dirtune_train.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"path": "m"},
                                                        "data": {"train_file": "t.jsonl"}}))
    spec = {"name": "fake", "base": "base.yaml", "lrs": [1e-3, 3e-3], "seeds": [0, 1, 2],
            "tune_seeds": [0], "max_steps": 100, "eval_every": 10, "jobs": 0, "devices": ["cpu"],
            "pairs": [{"name": "p1", "overrides": ["data.forget_file=f.txt"]}],
            "methods": [{"name": "adamw", "overrides": ["optimizer.name=adamw"]},
                        {"name": "fast", "overrides": ["optimizer.name=balanced_adamw"]},
                        {"name": "broken", "overrides": ["optimizer.name=balanced_adamw",
                                                         "method.penalty=coupled",
                                                         "method.direction_weight=1"]}]}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(spec))

    def load(*overrides):
        return load_bench_config(tmp_path / "bench.yaml", list(overrides))
    return load


def _calls(out: Path) -> list[str]:
    p = out / "calls.txt"
    return p.read_text().splitlines() if p.is_file() else []


def test_phases_choose_lr_reuse_tune_run_and_measure_speedup(bench, tmp_path):
    out = tmp_path / "res" / "b"
    res = run_bench(bench(), out, entry="fake_dirtune_train:run_training")
    calls = _calls(out)
    # phase 1: 3 methods x 2 lrs x 1 seed = 6; phase 2: adamw and fast x seeds 1, 2 (seed 0 reused)
    assert len(calls) == 6 + 4 and all(c.endswith(" cpu auto") for c in calls)
    assert len(set(calls)) == len(calls)
    m = res["pairs"]["p1"]["methods"]
    assert m["adamw"]["chosen_lr"] == 1e-3 and m["fast"]["chosen_lr"] == 3e-3
    assert m["broken"]["chosen_lr"] is None and m["broken"]["runs"] == {}
    a = res["pairs"]["p1"]["analysis"]
    assert a["target"] == pytest.approx(1.0)
    assert a["methods"]["adamw"]["steps_to_target"] == {0: 100, 1: 100, 2: 100}
    assert a["methods"]["fast"]["steps"]["median"] == 50
    assert a["methods"]["fast"]["speedup"]["median"] == pytest.approx(2.0)
    assert a["methods"]["fast"]["forgetting_median"] == pytest.approx(0.1)
    err = run_path(out, "p1", "broken", 1e-3, 0) / "error.txt"
    assert "loss exploded on purpose" in err.read_text()
    for name in ("bench.yaml", "commit.txt", "report.md", "summary.json", "val_loss_p1.png"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "bench.yaml").read_text())["output_dir"] == str(out.resolve())
    assert (out / "commit.txt").read_text().startswith("commit: ")


def test_resume_redoes_only_failed_runs_and_fresh_redoes_each_once(bench, tmp_path):
    out = tmp_path / "b"
    run_bench(bench(), out, entry="fake_dirtune_train:run_training")
    n = len(_calls(out))
    run_bench(bench(), out, entry="fake_dirtune_train:run_training")
    again = _calls(out)[n:]
    assert len(again) == 2 and all("broken" in c for c in again)  # only the failed tune runs
    (out / "calls.txt").unlink()
    run_bench(bench(), out, resume=False, entry="fake_dirtune_train:run_training")
    fresh = _calls(out)
    assert len(fresh) == 10 and len(set(fresh)) == 10
    assert all(c.endswith(" None") for c in fresh)  # --fresh: no resuming from checkpoints


def test_weights_only_runs_restart_instead_of_resuming(bench, tmp_path):
    out = tmp_path / "b"
    run_bench(bench("overrides=[train.save_only_model=true]"), out, entry="fake_dirtune_train:run_training")
    calls = _calls(out)
    assert len(calls) == 10 and all(c.endswith(" None") for c in calls)


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


@pytest.mark.slow
def test_pool_of_spawned_workers_gives_the_same_result(bench, tmp_path):
    out = tmp_path / "pool"
    res = run_bench(bench("jobs=2"), out, entry="fake_dirtune_train:run_training")
    assert len(_calls(out)) == 10
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
