"""Lazy regularization (`method.every`): the coupled penalty every k steps with weight k·λ_dir.
k = 1 must be bitwise the unlazy method; k = 4 applies it at steps 0, 4, 8, ... only."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from dirtune.models.direction import DirectionPenalty
from dirtune.train.config import ConfigError, load_config
from dirtune.train.run_folder import read_metrics
from dirtune.train.runner import run_training
from dirtune.train.trainer import DirtuneTrainer

COMMON = ["finetune.type=full", "optimizer.name=adamw", "method.penalty=coupled",
          "method.direction_weight=100", "method.reference_dtype=fp32", "optimizer.lr=3e-3",
          "train.max_steps=9", "train.log_every=1", "train.drift_every=0"]


@pytest.fixture
def train_cfg(run_overrides):
    """`train_cfg(out, *extra)`: short sequences, batches of 4, no evaluation within the steps."""
    return lambda out, *extra: load_config(None, run_overrides(
        out, "data.max_length=64", "data.max_eval_samples=8", "train.batch_size=4", "train.eval_batch_size=8",
        "train.eval_every=100", *extra))


def _unlazy_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """DirtuneTrainer.compute_loss as it was before `method.every` (commit 3ca1023): the reference."""
    out = super(DirtuneTrainer, self).compute_loss(model, inputs, return_outputs=return_outputs,
                                                   num_items_in_batch=num_items_in_batch)
    loss, outputs = (out if return_outputs else (out, None))
    if model.training:
        self.last_loss = loss.detach()
        if self.penalty is not None:
            pen = self.penalty()
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                pen = pen / self.current_gradient_accumulation_steps
                scale = self.current_gradient_accumulation_steps
            else:
                scale = 1
            loss = loss + pen.to(loss.dtype)
            if self._pen_step_seen != self.state.global_step:
                self._pen_step_seen = self.state.global_step
                self._pen_sum = self._pen_sum + pen.detach().float() * scale
                self._pen_steps += 1
    return (loss, outputs) if return_outputs else loss


def _train_rows(out: Path):
    return [(r["step"], r["loss"], r["penalty"]) for r in read_metrics(out / "metrics.jsonl")
            if r["kind"] == "train"]


def test_every_1_is_bitwise_the_unlazy_method(tmp_path, monkeypatch, train_cfg):
    run_training(train_cfg(tmp_path / "k1", *COMMON, "method.every=1"))
    monkeypatch.setattr(DirtuneTrainer, "compute_loss", _unlazy_compute_loss)
    run_training(train_cfg(tmp_path / "ref", *COMMON))
    assert _train_rows(tmp_path / "k1") == _train_rows(tmp_path / "ref")
    assert any(p > 0 for *_, p in _train_rows(tmp_path / "ref"))
    got = load_file(tmp_path / "k1" / "final" / "model.safetensors")
    want = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].equal(want[k]), k


def test_every_4_applies_the_penalty_at_every_4th_step_with_4_times_the_weight(tmp_path, monkeypatch, train_cfg):
    calls = []
    forward = DirectionPenalty.forward

    def counted(self):
        value = forward(self)
        calls.append(float(value.detach()))
        return value

    monkeypatch.setattr(DirectionPenalty, "forward", counted)
    run_training(train_cfg(tmp_path / "k4", *COMMON, "method.every=4"))
    rows = _train_rows(tmp_path / "k4")
    assert len(calls) == 3                                  # steps 0, 4, 8 of 9
    applied = {step - 1 for step, _, p in rows if p != 0}   # a row's step counts updates done
    assert applied <= {0, 4, 8} and {4, 8} <= applied       # step 0: θ = θ0, the penalty is 0
    logged = {step - 1: p for step, _, p in rows}
    for step, value in zip((0, 4, 8), calls):
        assert logged[step] == pytest.approx(4 * value, rel=1e-6)


@pytest.mark.parametrize("extra, key", [
    (["method.every=0"], "method.every"),
    (["method.every=4", "method.penalty=decoupled", "method.direction_weight=1",
      "optimizer.name=balanced_adamw", "finetune.type=full"], "method.every"),
    (["optimizer.fused=true", "optimizer.foreach=true"], "optimizer.fused"),
])
def test_bad_lazy_or_fused_settings_name_their_key(extra, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["model.path=x", "data.train_file=y", *extra])
