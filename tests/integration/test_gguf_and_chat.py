"""A .gguf file as the model end to end (train LoRA -> generate -> eval -> merge), and
`dirtune chat` over a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dirtune.cli import main
from dirtune.models.lora import load_for_inference

SRC = Path(__file__).resolve().parents[2] / "src"


def test_train_lora_on_a_gguf_then_generate_eval_merge(tiny_gguf, task_files, run_overrides, tmp_path, capsys):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    run = tmp_path / "run"
    args = ["train", str(cfg), *run_overrides(
        run, "data.max_length=128", "data.max_eval_samples=8", "train.batch_size=4", "train.max_steps=4",
        "train.eval_every=2", "finetune.lora_r=4", "optimizer.lr=3e-2", model=tiny_gguf)]
    assert main(args) == 0
    adapter = run / "final"
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(tiny_gguf.resolve())  # the file, reloadable
    assert [p.name for p in tiny_gguf.parent.iterdir()] == ["tiny.gguf"]  # read in memory: nothing written beside it

    capsys.readouterr()
    assert main(["generate", str(adapter), "Who is", "--max-new-tokens", "6"]) == 0
    from_adapter = capsys.readouterr().out
    assert main(["generate", str(adapter), "Who is", "--max-new-tokens", "6", "--base", str(tiny_gguf)]) == 0
    assert capsys.readouterr().out == from_adapter
    assert main(["eval", str(adapter), str(task_files["task_valid"]), "--max-length", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0

    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), str(merged)]) == 0
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert AutoTokenizer.from_pretrained(merged).chat_template  # the template came along
    lora, _ = load_for_inference(adapter)
    ids = torch.randint(3, 250, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, lora(ids).logits, rtol=1e-4, atol=1e-5)
    from dirtune.bench.tasks import load_checkpoint  # the bench's metric loader reads it too

    bench_model, bench_tok = load_checkpoint(adapter)
    with torch.no_grad():
        torch.testing.assert_close(bench_model(ids).logits, lora(ids).logits, rtol=0, atol=0)
    assert bench_tok.chat_template
    capsys.readouterr()
    assert main(["generate", str(merged), "Who is", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == from_adapter  # greedy: the same continuation


def test_chat_over_stdin_keeps_the_history(tiny_checkpoint):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "dirtune.cli", "chat", str(tiny_checkpoint), "--max-new-tokens", "5",
         "--show-prompt", "--system", "Be brief."],
        input="Who is Ann?\nWhere does she live?\n/reset\nHello\n/exit\nnever read\n",
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    prompts = [block.split("---\n", 1)[1].rsplit("\n---", 1)[0]
               for block in proc.stderr.split("--- prompt (")[1:]]
    assert len(prompts) == 3  # three turns answered; "/exit" ended before "never read"
    # the tiny model has no chat template: LLaMA-2 [INST], the system message in the first turn
    assert prompts[0] == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWho is Ann? [/INST]"
    first_reply = prompts[1][len(prompts[0]):].split("</s>")[0].strip()
    # the reply as training renders responses: " " + text (nothing when empty), then EOS
    replied = f" {first_reply}" if first_reply else ""
    assert prompts[1] == f"{prompts[0]}{replied}</s><s>[INST] Where does she live? [/INST]"
    assert prompts[2] == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello [/INST]"  # /reset cleared it
    assert proc.stdout.startswith(first_reply)
