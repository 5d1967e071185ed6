"""End-to-end fine-tuning on a tiny random LLaMA (CPU): LoRA and full, target stop, resume,
merge and generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dirtune.train.config import load_config
from dirtune.train.run_folder import read_metrics
from dirtune.train.runner import run_training


@pytest.fixture
def train_cfg(run_overrides, task_files):
    """`train_cfg(out, *extra)`: 30 steps with a forget set, evaluated every 10, drift every 5."""
    return lambda out, *extra: load_config(None, run_overrides(
        out, f"data.forget_file={task_files['source_valid']}", "data.max_length=128", "data.max_eval_samples=16",
        "train.batch_size=4", "train.eval_batch_size=16", "train.max_steps=30", "train.eval_every=10",
        "train.drift_every=5", "optimizer.lr=3e-3", *extra))


def _train_losses(out):
    return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "train"]


METHOD = ["optimizer.name=balanced_adamw", "optimizer.weight_decay=0.1", "method.penalty=coupled",
          "method.direction_weight=10"]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_method_reduces_training_loss(task_files, tmp_path, kind, train_cfg):
    extra = [f"finetune.type={kind}", "finetune.lora_r=4", *METHOD, "optimizer.lr=3e-2"]
    if kind == "full":
        extra += ["method.penalty=decoupled", "method.direction_weight=0.1", "optimizer.lr=3e-3"]
    summary = run_training(train_cfg(tmp_path / kind, *extra))
    losses = _train_losses(tmp_path / kind)
    assert len(losses) == 30
    # a random 2-layer model on character data: LoRA alone moves slowly, full fine-tuning fast
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - (0.05 if kind == "lora" else 0.1)
    assert summary["best_eval_loss"] < summary["forget_loss_start"] + 100  # finite, recorded
    assert "forget" not in summary  # only data.forget_file: readers take forget_loss_start/end
    evals = [r for r in read_metrics(tmp_path / kind / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all("forget_loss" in r for r in evals)
    train = [r for r in read_metrics(tmp_path / kind / "metrics.jsonl") if r["kind"] == "train"]
    assert any("angle/q_proj" in r for r in train) and any(r["penalty"] > 0 for r in train) == (kind == "lora")
    for name in ("config.yaml", "manifest.json", "summary.json", "loss.png"):
        assert (tmp_path / kind / name).is_file()
    manifest = json.loads((tmp_path / kind / "manifest.json").read_text())
    assert manifest["seed"] == 42 and str(task_files["task_train"]) in manifest["data_files"]


def test_target_loss_stops_at_first_reaching_evaluation(tmp_path, train_cfg):
    first = run_training(train_cfg(tmp_path / "a", "finetune.type=full"))
    evals = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "eval"]
    target = evals[2]["eval_loss"]  # reached at step 20 (or earlier if the curve is not monotone)
    expected = next(r["step"] for r in evals if r["eval_loss"] <= target)
    second = run_training(train_cfg(tmp_path / "b", "finetune.type=full",
                                    f"train.target_loss={target!r}"))
    assert second["target_step"] == expected and second["final_step"] == expected
    assert second["stopped_early"] and first["target_step"] is None


def test_resume_matches_uninterrupted_run(tmp_path, train_cfg):
    extra = ["finetune.type=full", *METHOD, "method.penalty=decoupled", "train.save_every=10",
             "train.save_total_limit=5"]
    run_training(train_cfg(tmp_path / "full", *extra))
    # "interrupt" by resuming a second folder from the first run's step-10 checkpoint
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-10", tmp_path / "resumed" / "checkpoint-10")
    half = train_cfg(tmp_path / "resumed", *extra, "train.resume=auto")
    run_training(half)
    a = _train_losses(tmp_path / "full")[10:]
    b = _train_losses(tmp_path / "resumed")
    assert len(b) == 20 and a == pytest.approx(b, rel=0, abs=1e-6)


def test_weights_only_checkpoints_keep_the_best_model_and_refuse_resume(tmp_path, train_cfg):
    from dirtune.train.config import ConfigError
    from dirtune.train.checkpoints import checkpoint_problem

    extra = ["finetune.type=full", "train.save_total_limit=1"]
    full = run_training(train_cfg(tmp_path / "full", *extra))
    lean = run_training(train_cfg(tmp_path / "lean", *extra, "train.save_only_model=true"))
    # the same training, and the same best weights reloaded for test and final/
    assert lean["best_step"] == full["best_step"] and lean["best_eval_loss"] == pytest.approx(full["best_eval_loss"])
    ckpt = Path(lean["best_checkpoint"])
    assert not (ckpt / "optimizer.pt").exists() and (Path(full["best_checkpoint"]) / "optimizer.pt").is_file()
    assert "weights only" in checkpoint_problem(ckpt)
    (tmp_path / "lean" / "summary.json").unlink()  # as if killed before its end: a finished run is refused first
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        run_training(train_cfg(tmp_path / "lean", *extra, "train.resume=auto"))
    with pytest.raises(ConfigError, match=r"cannot be resumed: no optimizer or scheduler state: it holds "
                                          r"weights only \(train.save_only_model\)"):
        run_training(train_cfg(tmp_path / "lean", *extra, f"train.resume={ckpt}"))


@pytest.mark.parametrize("kind, schedule", [("full", "decay"), ("lora", "warmup")])
def test_strength_schedule_is_applied_and_logged(tmp_path, kind, schedule, train_cfg):
    extra = [f"finetune.type={kind}", "finetune.lora_r=4", *METHOD, f"method.schedule={schedule}",
             "train.log_every=1", "train.max_steps=10"]
    if kind == "full":
        extra += ["method.penalty=decoupled", "method.direction_weight=0.1"]
    run_training(train_cfg(tmp_path / kind, *extra))
    train = [r for r in read_metrics(tmp_path / kind / "metrics.jsonl") if r["kind"] == "train"]
    strengths = [r["strength"] for r in train]
    # logged after step t+1 with the factor of the update at step t (t = 0..9 of 10)
    expected = [1 - t / 10 if schedule == "decay" else t / 10 for t in range(10)]
    assert strengths == pytest.approx(expected)
    if kind == "lora":  # the coupled penalty's logged value carries the factor: 0 at the first step
        assert train[0]["penalty"] == 0.0 and train[-1]["penalty"] > 0


def test_warmup_schedule_first_update_is_the_unanchored_one(tmp_path, train_cfg):
    from safetensors.torch import load_file

    one = ["finetune.type=full", "train.max_steps=1", "optimizer.name=balanced_adamw", "optimizer.anchor_dtype=fp32"]
    run_training(train_cfg(tmp_path / "warm", *one, "optimizer.weight_decay=10",
                           "method.penalty=decoupled", "method.direction_weight=10", "method.schedule=warmup"))
    run_training(train_cfg(tmp_path / "none", *one, "optimizer.weight_decay=0"))
    run_training(train_cfg(tmp_path / "held", *one, "optimizer.weight_decay=10",
                           "method.penalty=decoupled", "method.direction_weight=10"))
    warm, none, held = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("warm", "none", "held"))
    assert all(torch.equal(warm[k], none[k]) for k in none)        # factor 0: no decay, no turn
    assert any(not torch.equal(held[k], none[k]) for k in none)    # the constant schedule does act


def test_gradient_accumulation_keeps_the_penalty_weight(tmp_path, train_cfg):
    """grad_accum=2 x batch 2 must follow batch 4: the coupled penalty counts once per optimizer
    step whatever the accumulation (Trainer normalises the task loss over the accumulated tokens)."""
    common = ["finetune.type=full", "optimizer.name=balanced_adamw", "method.penalty=coupled",
              "method.direction_weight=1000", "method.reference_dtype=fp32", "optimizer.lr=3e-3",
              "train.max_steps=6", "train.log_every=1"]
    run_training(train_cfg(tmp_path / "b4", *common, "train.batch_size=4"))
    run_training(train_cfg(tmp_path / "ga", *common, "train.batch_size=2",
                           "train.grad_accum=2"))

    def rows(out):
        return [(r["loss"], r["penalty"]) for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]

    a, b = rows(tmp_path / "b4"), rows(tmp_path / "ga")
    assert len(a) == len(b) == 6
    assert any(p > 0 for _, p in a)
    for (la, pa), (lb, pb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-4) and pb == pytest.approx(pa, rel=1e-3, abs=1e-9)
