"""Named forget sets and train.keep_best=memory, end to end on the tiny random LLaMA (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dirtune.train.config import load_config
from dirtune.train.run_folder import read_metrics
from dirtune.train.runner import run_training, trained_model


@pytest.fixture(scope="module")
def train_cfg(run_overrides, task_files):
    """`train_cfg(out, *extra)`: 20 full fine-tuning steps evaluated every 5, with a test file, a
    forget file and two named forget sets."""
    files = task_files
    return lambda out, *extra: load_config(None, run_overrides(
        out, f"data.test_file={files['task_test']}", f"data.forget_file={files['source_valid']}",
        f"data.forget_files=[web={files['source_valid']}, instruct={files['task_test']}]",
        "data.max_length=128", "data.max_eval_samples=12", "data.max_samples=40", "train.batch_size=4",
        "train.eval_batch_size=16", "train.max_steps=20", "train.eval_every=5", "train.drift_every=0",
        "finetune.type=full", "optimizer.lr=3e-3", *extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_cfg):
    """The same run with the best weights on disk (checkpoint folders) and in memory."""
    tmp = tmp_path_factory.mktemp("keep-best")
    disk = run_training(train_cfg(tmp / "disk"))
    memory = run_training(train_cfg(tmp / "memory", "train.keep_best=memory"))
    return tmp, disk, memory


def test_every_eval_line_carries_every_forget_set(runs):
    tmp, disk, _ = runs
    evals = [r for r in read_metrics(tmp / "disk" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 5, 10, 15, 20]
    for r in evals:
        assert {"eval_loss", "forget_loss", "forget_web_loss", "forget_instruct_loss"} <= r.keys()
        # the legacy set and "web" are the same file, cut alike: the same loss
        assert r["forget_web_loss"] == pytest.approx(r["forget_loss"], rel=1e-6)
    best = next(r for r in evals if r["step"] == disk["best_step"])
    for name in ("web", "instruct"):
        key = f"forget_{name}_loss"
        assert disk["forget"][name] == {"start": evals[0][key], "end": evals[-1][key], "at_best": best[key]}
    assert disk["forget_loss_start"] == evals[0]["forget_loss"] and disk["forget_loss_end"] == evals[-1]["forget_loss"]
    rows = disk["data"]["splits"]["train"]["rows"]
    assert disk["epochs"] == pytest.approx(20 * 4 / rows)
    assert disk["data"]["splits"]["forget_instruct"]["format"] == "alpaca"


def test_best_in_memory_equals_best_on_disk(runs):
    tmp, disk, memory = runs
    assert memory["best_step"] == disk["best_step"] and memory["best_eval_loss"] == disk["best_eval_loss"]
    assert memory["test_loss"] == pytest.approx(disk["test_loss"], rel=1e-6)
    assert not list((tmp / "memory").glob("checkpoint-*")) and list((tmp / "disk").glob("checkpoint-*"))
    assert memory["best_checkpoint"] == str(tmp / "memory" / "final")
    from safetensors.torch import load_file

    a = load_file(tmp / "disk" / "final" / "model.safetensors")
    b = load_file(tmp / "memory" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_final_folder_and_the_model_stays_in_memory(tmp_path, runs, train_cfg):
    _, disk, _ = runs
    out = tmp_path / "lean"
    lean = run_training(train_cfg(out, "train.keep_best=memory", "train.save_final=false",
                                  "train.plot=false"))
    assert not (out / "final").exists() and not (out / "loss.png").exists() and (out / "summary.json").is_file()
    assert lean["final_model"] is None and lean["best_checkpoint"] is None
    assert lean["test_loss"] == pytest.approx(disk["test_loss"], rel=1e-6)
    model, tokenizer = trained_model(out)
    assert trained_model(tmp_path / "elsewhere") is None
    model.eval()
    ids = tokenizer("Alice lives in", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_best_at_the_start_puts_the_pretrained_weights_back(tiny_checkpoint, tmp_path, train_cfg):
    # a validation set that training can only make worse (responses of a character the task never
    # shows): its best loss is the one before training, at step 0. (Checkpoint folders cannot hold
    # step 0: Trainer does not save at its first evaluation.)
    import json

    from safetensors.torch import load_file

    valid = tmp_path / "tilde.jsonl"
    valid.write_text("".join(json.dumps({"instruction": "Who lives in town?", "output": "~" * 40}) + "\n"
                             for _ in range(8)))
    out = tmp_path / "memory"
    summary = run_training(train_cfg(out, "train.keep_best=memory",
                                     f"data.valid_file={valid}", "train.max_steps=10"))
    evals = [r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert summary["best_step"] == 0 and evals[0] < min(evals[1:])
    before = load_file(Path(tiny_checkpoint) / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in after)


def _scheduled_valid_losses(monkeypatch, losses: dict[int, float]) -> None:
    """The validation loss at step s is losses[s] (the last one given for later steps)."""
    from dirtune.train.trainer import DirtuneTrainer

    original = DirtuneTrainer.evaluation_loop

    def loop(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if kwargs.get("metric_key_prefix") == "eval_valid":
            step = self.state.global_step
            output.metrics["eval_valid_loss"] = losses[max(s for s in losses if s <= step)]
        return output

    monkeypatch.setattr(DirtuneTrainer, "evaluation_loop", loop)


def test_a_best_in_the_middle_comes_back_as_from_its_checkpoint(tmp_path, monkeypatch, train_cfg):
    from safetensors.torch import load_file

    _scheduled_valid_losses(monkeypatch, {0: 9.0, 5: 3.0, 10: 1.0, 15: 2.0})  # best at step 10 of 20
    disk = run_training(train_cfg(tmp_path / "disk"))
    memory = run_training(train_cfg(tmp_path / "memory", "train.keep_best=memory"))
    assert disk["best_step"] == memory["best_step"] == 10
    assert memory["test_loss"] == pytest.approx(disk["test_loss"], rel=1e-6)
    a = load_file(tmp_path / "disk" / "final" / "model.safetensors")
    b = load_file(tmp_path / "memory" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert memory["forget"]["web"]["at_best"] == next(
        r["forget_web_loss"] for r in read_metrics(tmp_path / "memory" / "metrics.jsonl")
        if r["kind"] == "eval" and r["step"] == 10)


def test_an_interrupted_memory_run_stops_cleanly_and_starts_again(tmp_path, monkeypatch, train_cfg):
    from dirtune.train.callbacks import FaultGuard

    original = FaultGuard.on_step_end

    def on_step_end(self, args, state, control, **kwargs):  # as SIGTERM at step 7 does
        if state.global_step == 7 and self.interrupted is None:
            self.interrupted = "SIGTERM"
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(FaultGuard, "on_step_end", on_step_end)
    out = tmp_path / "cut"
    extra = ("train.keep_best=memory", "train.save_only_model=true")
    cut = run_training(train_cfg(out, *extra))
    assert cut["interrupted"] == "SIGTERM" and cut["final_step"] == 7
    assert not (out / "summary.json").exists() and not (out / "final").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-7"]  # weights only: not resumable
    monkeypatch.setattr(FaultGuard, "on_step_end", original)
    again = run_training(train_cfg(out, *extra, "train.overwrite=true"))
    assert again["final_step"] == 20 and (out / "summary.json").is_file()
