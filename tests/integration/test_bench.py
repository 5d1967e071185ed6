"""The bench end to end with the real training entry on a tiny LoRA model, in-process (jobs=0)."""

import json

import pytest
import yaml

from dirtune.bench.config import load_bench_config
from dirtune.bench.grid import run_bench


@pytest.mark.slow
def test_bench_runs_real_training_and_writes_the_report(tmp_path, tiny_checkpoint, task_files):
    spec = {
        "name": "tiny",
        "overrides": ["finetune.type=lora", "finetune.lora_r=2", "data.max_length=96",
                      "train.batch_size=4", "train.eval_batch_size=16", "train.report_to=none",
                      "train.drift_every=2", "train.lr_scheduler=constant"],
        "pairs": [{"name": "task", "metric": "gsm8k", "metric_samples": 3,
                   "metric_max_new_tokens": 4, "metric_batch_size": 3,
                   "overrides": [f"model.path={tiny_checkpoint}",
                                 f"data.train_file={task_files['task_train']}",
                                 f"data.valid_file={task_files['task_valid']}",
                                 f"data.test_file={task_files['task_test']}",
                                 f"data.forget_file={task_files['source_valid']}",
                                 "data.max_eval_samples=16"]}],
        "methods": [{"name": "adamw", "overrides": ["optimizer.name=adamw"]},
                    {"name": "anchored", "overrides": ["optimizer.name=balanced_adamw",
                                                       "optimizer.weight_decay=0.1"]}],
        # one rate and no grid extension keep it quick; the report must then call the choice FAILED
        "lrs": [3e-3], "max_grid_extensions": 0, "seeds": [0, 1, 2], "max_steps": 4, "eval_every": 2,
        "jobs": 0, "devices": ["cpu"],
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    res = run_bench(load_bench_config(tmp_path / "bench.yaml"), out)

    errors = sorted(p.read_text()[-400:] for p in out.glob("runs/**/error.txt"))
    assert errors == []
    s = json.loads((out / "summary.json").read_text())["pairs"]["task"]
    assert s["target"] is not None and s["baseline_reached"] >= 2
    for m in ("adamw", "anchored"):
        r = s["methods"][m]
        assert r["chosen_lr"] == 3e-3 and r["failed"] == []
        assert all(v is not None for v in r["final_loss"].values())
        assert all(v is not None for v in r["forgetting"].values())
        assert all(v is not None for v in r["metric"].values())  # exact match on 3 samples
    assert res["pairs"]["task"]["methods"]["adamw"]["runs"][1]["angle"]  # drift was logged
    metric = json.loads((out / "runs/task/adamw/lr0.003_s0/metric.json").read_text())
    assert metric["n"] == 3 and metric["samples"][0]["prompt"].startswith("[INST]")
    assert s["start_loss"] is not None and s["fraction_targets"]["0.5"] > s["target"]
    assert s["methods"]["adamw"]["fractions"]["1"]["steps"]["reached"] >= 2
    assert s["methods"]["anchored"]["edge"] is True
    assert s["methods"]["anchored"]["forget_sets"]["source"]["end_median"] is not None
    assert s["at_rates"]["0.003"]["methods"]["anchored"]["best_loss"] is not None
    md = (out / "report.md").read_text()
    assert "gsm8k (exact match)" in md and "Target T = **" in md
    assert "**FAILED: adamw, anchored** (chosen lr 0.003)" in md and "grid extension is off" in md
    for name in ("val_loss_task.png", "angle_task.png", "tradeoff_task.png", "rates_task.png"):
        assert (out / name).is_file()
