"""The CLI end to end on a tiny LLaMA: train (LoRA) -> eval -> generate -> merge -> generate,
and --dry-run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dirtune.cli import main
from dirtune.models.lora import load_for_inference


@pytest.fixture
def train_args(run_overrides):
    """`train_args(out, *extra)`: `dirtune train -`, 6 LoRA steps evaluated at steps 3 and 6."""
    return lambda out, *extra: ["train", "-", *run_overrides(
        out, "data.max_length=96", "data.max_eval_samples=8", "train.batch_size=4", "train.max_steps=6",
        "train.eval_every=3", "finetune.lora_r=4", "optimizer.lr=3e-2", *extra)]


def test_train_eval_generate_merge(task_files, tmp_path, capsys, train_args):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    args = train_args(tmp_path / "run", "optimizer.name=balanced_adamw",
                      "method.penalty=coupled", "method.direction_weight=100")
    args[1] = str(cfg)
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    adapter = tmp_path / "run" / "final"
    assert (adapter / "adapter_config.json").is_file()

    capsys.readouterr()
    assert main(["eval", str(adapter), str(task_files["task_valid"]), "--max-length", "96"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the same records and loss definition as training's validation (which kept 8 records)
    assert result["tokens"] > 0 and abs(result["loss"] - summary["best_eval_loss"]) < 0.5

    assert main(["generate", str(adapter), "Who is", "--max-new-tokens", "8"]) == 0
    from_adapter = capsys.readouterr().out

    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()  # plain transformers, no PEFT
    lora, _ = load_for_inference(str(adapter))
    ids = torch.randint(4, 90, (2, 12))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, lora.eval()(ids).logits, atol=1e-5)
    capsys.readouterr()
    assert main(["generate", str(merged), "Who is", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == from_adapter  # greedy: the same continuation


def test_dry_run_trains_nothing(tmp_path, capsys, train_args):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    args = train_args(tmp_path / "dry", "--dry-run")
    args[1] = str(cfg)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "lora_r: 4" in out and "trainable" in out and "nothing trained" in out
    assert not (tmp_path / "dry" / "metrics.jsonl").exists()
