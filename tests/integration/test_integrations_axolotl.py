"""The axolotl plugin (dirtune.integrations.axolotl) in a real axolotl run: a few LoRA steps of a
tiny random LLaMA on the CPU.

axolotl 0.21 needs Python >= 3.12, so this is skipped where axolotl is not installed (CI runs
3.11); docs/integrations.md says how it was run and holds its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).with_name("_axolotl_run.py")
LAM, STEPS = 300.0, 3


def _config(tmp_path: Path, ckpt: Path) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "".join(chr(97 + (i * 7 + j) % 26) for j in range(40))}) + "\n"
                            for i in range(16)))
    cfg = {
        "base_model": str(ckpt),
        "datasets": [{"path": str(data), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(tmp_path / "prepared"), "dataset_num_proc": 1,
        "sequence_len": 64, "val_set_size": 0,
        "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True,
        # axolotl's Triton LoRA kernels are GPU-only
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
        "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": STEPS, "num_epochs": 1,
        "learning_rate": 0.01, "optimizer": "adamw_torch", "lr_scheduler": "constant", "weight_decay": 0.1,
        "bf16": False, "fp16": False, "tf32": False,
        "output_dir": str(tmp_path / "out"), "logging_steps": 1, "save_strategy": "no",
        "plugins": ["dirtune.integrations.axolotl.DirtunePlugin"],
        "dirtune": {"penalty": "coupled", "direction_weight": LAM},
    }
    path = tmp_path / "axolotl.yml"
    path.write_text(json.dumps(cfg, indent=1))   # JSON is YAML
    return path


def test_axolotl_plugin_trains_with_the_method(tiny_checkpoint, tmp_path):
    pytest.importorskip("axolotl", reason="axolotl is not installed (0.21 needs Python >= 3.12)")
    out = tmp_path / "result.json"
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(RUN), str(_config(tmp_path, tiny_checkpoint)), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in r.items() if k != "logs"}), *r["logs"], sep="\n")   # shown with -s

    assert r["trainer"][:3] == ["AxolotlTrainerWithDirtune", "MethodTrainerMixin", "AxolotlTrainer"]
    assert r["optimizer"] == "BalancedAdamW"
    assert [(g["name"], g["anchor"], g["weight_decay"], g["lr"]) for g in r["groups"]] == [
        ("lora_A", "zero", 0.1, 0.01), ("lora_B", "zero", 0.1, 0.01)]
    assert [x["step"] for x in r["logs"]] == list(range(1, STEPS + 1))
    assert r["logs"][0]["direction_penalty"] == 0.0 and all(x["direction_penalty"] > 0 for x in r["logs"][1:])
    # the axolotl trainer's loss is the model's loss + λ·R, R computed independently
    assert r["penalty"] > 1e-3
    assert r["total"] == pytest.approx(r["task"] + r["penalty"], rel=1e-5, abs=1e-5)
    assert r["lora_B_abs"] > 0
