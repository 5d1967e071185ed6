"""checkpoints.py without training: what makes a checkpoint complete, the newest good one, the
damaged ones set aside, the leftovers of a killed save removed, and what a checkpoint's state says."""

from __future__ import annotations

import json

import pytest
import torch
from fake_checkpoint import make_checkpoint, truncate
from safetensors.torch import save_file

from dirtune.train import checkpoints


def test_complete_checkpoints_pass(tmp_path):
    assert checkpoints.checkpoint_problem(make_checkpoint(tmp_path / "checkpoint-4", 4)) is None
    adapter = make_checkpoint(tmp_path / "checkpoint-8", 8, weights="adapter_model.safetensors")
    assert checkpoints.checkpoint_problem(adapter) is None


DAMAGE = [
    ("no trainer state", lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
    ("state not JSON", lambda c: (c / "trainer_state.json").write_text('{"global_step": 4'), "trainer_state.json"),
    ("state of another step", lambda c: (c / "trainer_state.json").write_text('{"global_step": 3}'), "step 3"),
    ("weights truncated", lambda c: truncate(c / "model.safetensors"), "model.safetensors is truncated"),
    ("weights header cut", lambda c: truncate(c / "model.safetensors", 0.01), "model.safetensors"),
    ("no weights", lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    ("optimizer empty", lambda c: truncate(c / "optimizer.pt", 0), "optimizer.pt is empty"),
    ("optimizer truncated", lambda c: truncate(c / "optimizer.pt", 0.9), "optimizer.pt is truncated"),
    ("no scheduler", lambda c: (c / "scheduler.pt").unlink(), "no scheduler.pt"),
    ("rng state truncated", lambda c: truncate(c / "rng_state.pth"), "rng_state.pth"),
    # issue 13.3: transformers resumes without it, silently with other dropout masks
    ("no rng state", lambda c: (c / "rng_state.pth").unlink(), "no rng_state.pth (the random state"),
]


@pytest.mark.parametrize("what, damage, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_is_named(tmp_path, what, damage, message):
    ckpt = make_checkpoint(tmp_path / "checkpoint-4", 4)
    damage(ckpt)
    problem = checkpoints.checkpoint_problem(ckpt)
    assert problem is not None and message in problem


def test_sharded_weights_are_checked_shard_by_shard(tmp_path):
    ckpt = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    save_file({"v": torch.zeros(2)}, str(ckpt / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors",
                                            "v": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoints.checkpoint_problem(ckpt) is None
    truncate(ckpt / "model-00002-of-00002.safetensors")
    assert "model-00002-of-00002.safetensors is truncated" in checkpoints.checkpoint_problem(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    assert "shard model-00002-of-00002.safetensors" in checkpoints.checkpoint_problem(ckpt)


def test_latest_good_checkpoint_skips_damaged_ones_with_a_warning(tmp_path, capsys):
    for step in (2, 4, 6, 10):
        make_checkpoint(tmp_path / f"checkpoint-{step}", step)
    truncate(tmp_path / "checkpoint-10" / "model.safetensors")
    (tmp_path / "checkpoint-6" / "trainer_state.json").unlink()  # a save that never finished
    assert checkpoints.latest_good_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    err = capsys.readouterr().err
    assert f"{tmp_path / 'checkpoint-10'} is incomplete or corrupt: model.safetensors" in err
    assert f"{tmp_path / 'checkpoint-6'} is incomplete or corrupt: no trainer_state.json" in err
    assert "checkpoint-4" not in err and "checkpoint-2" not in err


def test_latest_good_checkpoint_orders_by_step_not_name(tmp_path):
    for step in (9, 10):  # "checkpoint-10" < "checkpoint-9" as strings
        make_checkpoint(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / ".partial-checkpoint-11").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert checkpoints.latest_good_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert checkpoints.latest_good_checkpoint(tmp_path / "absent") is None


def test_none_good(tmp_path, capsys):
    make_checkpoint(tmp_path / "checkpoint-3", 3)
    (tmp_path / "checkpoint-3" / "optimizer.pt").unlink()
    assert checkpoints.latest_good_checkpoint(tmp_path) is None
    assert "no optimizer.pt" in capsys.readouterr().err


def test_set_aside_corrupt_keeps_the_damaged_folder_out_of_sight(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path / f"checkpoint-{step}", step)
    truncate(tmp_path / "checkpoint-6" / "optimizer.pt")
    truncate(tmp_path / "checkpoint-2" / "optimizer.pt")  # older than the resumed step: left alone
    moved = checkpoints.set_aside_corrupt(tmp_path, after_step=4)
    assert moved == [tmp_path / "corrupt-checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "corrupt-checkpoint-6"]
    assert (tmp_path / "corrupt-checkpoint-6" / "model.safetensors").is_file()  # kept, not deleted
    assert checkpoints.checkpoint_folders(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]


def test_remove_leftovers_only_touches_half_written_folders(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-4", 4)
    (tmp_path / ".partial-checkpoint-8" / "checkpoint-8").mkdir(parents=True)
    (tmp_path / ".replaced-checkpoint-4").mkdir()
    (tmp_path / ".partial-summary.json").write_text('{"final_st')  # a file: the atomic summary write
    (tmp_path / ".previous-run" / "checkpoint-2").mkdir(parents=True)  # its successor has a checkpoint
    (tmp_path / ".previous-run" / ".complete").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    checkpoints.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "notes.txt"]


def test_a_per_process_rng_state_counts(tmp_path):
    ckpt = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (ckpt / "rng_state.pth").rename(ckpt / "rng_state_0.pth")  # as a run of several processes saves it
    assert checkpoints.checkpoint_problem(ckpt) is None


def test_training_finished_at_max_steps_or_at_the_target(tmp_path):
    ckpt = make_checkpoint(tmp_path / "checkpoint-8", 8)
    state = {"global_step": 8, "max_steps": 8,
             "log_history": [{"eval_valid_loss": 2.0, "step": 4}, {"eval_valid_loss": 1.5, "step": 8}]}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert checkpoints.training_finished(ckpt, 8, None)
    assert checkpoints.training_finished(ckpt, -1, None)  # epochs: the max_steps the run computed
    assert not checkpoints.training_finished(ckpt, 12, None)
    assert checkpoints.training_finished(ckpt, 12, 1.5) and checkpoints.training_finished(ckpt, 12, 2.0)
    assert not checkpoints.training_finished(ckpt, 12, 1.0)


def test_rebased_best_follows_the_folder_as_spelled_now(tmp_path):
    ckpt = make_checkpoint(tmp_path / "moved" / "checkpoint-8", 8)
    make_checkpoint(tmp_path / "moved" / "checkpoint-4", 4)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "best_model_checkpoint": "runs/a/checkpoint-4"}))
    assert checkpoints.rebased_best(ckpt, tmp_path / "moved") == str(tmp_path / "moved" / "checkpoint-4")
    assert checkpoints.rebased_best(ckpt, "elsewhere") is None  # no such folder there: no best to keep
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert checkpoints.rebased_best(ckpt, tmp_path / "moved") is None
