"""faults.py without training: checkpoint validation, the newest good checkpoint, the rename that
publishes a checkpoint, the finite-weights guard, and how run_folder chooses what to resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dirtune.train import faults, run_folder
from dirtune.train.config import ConfigError, load_config


def make_checkpoint(folder: Path, step: int, weights: str = "model.safetensors") -> Path:
    """A folder with every file a resumable transformers checkpoint holds (tiny tensors)."""
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(3, 2)}, str(folder / weights))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def test_complete_checkpoints_pass(tmp_path):
    assert faults.checkpoint_problem(make_checkpoint(tmp_path / "checkpoint-4", 4)) is None
    adapter = make_checkpoint(tmp_path / "checkpoint-8", 8, weights="adapter_model.safetensors")
    assert faults.checkpoint_problem(adapter) is None


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
    problem = faults.checkpoint_problem(ckpt)
    assert problem is not None and message in problem


def test_sharded_weights_are_checked_shard_by_shard(tmp_path):
    ckpt = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    save_file({"v": torch.zeros(2)}, str(ckpt / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors",
                                            "v": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert faults.checkpoint_problem(ckpt) is None
    truncate(ckpt / "model-00002-of-00002.safetensors")
    assert "model-00002-of-00002.safetensors is truncated" in faults.checkpoint_problem(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    assert "shard model-00002-of-00002.safetensors" in faults.checkpoint_problem(ckpt)


def test_latest_good_checkpoint_skips_damaged_ones_with_a_warning(tmp_path, capsys):
    for step in (2, 4, 6, 10):
        make_checkpoint(tmp_path / f"checkpoint-{step}", step)
    truncate(tmp_path / "checkpoint-10" / "model.safetensors")
    (tmp_path / "checkpoint-6" / "trainer_state.json").unlink()  # a save that never finished
    assert faults.latest_good_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    err = capsys.readouterr().err
    assert f"{tmp_path / 'checkpoint-10'} is incomplete or corrupt: model.safetensors" in err
    assert f"{tmp_path / 'checkpoint-6'} is incomplete or corrupt: no trainer_state.json" in err
    assert "checkpoint-4" not in err and "checkpoint-2" not in err


def test_latest_good_checkpoint_orders_by_step_not_name(tmp_path):
    for step in (9, 10):  # "checkpoint-10" < "checkpoint-9" as strings
        make_checkpoint(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / ".partial-checkpoint-11").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert faults.latest_good_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert faults.latest_good_checkpoint(tmp_path / "absent") is None


def test_none_good(tmp_path, capsys):
    make_checkpoint(tmp_path / "checkpoint-3", 3)
    (tmp_path / "checkpoint-3" / "optimizer.pt").unlink()
    assert faults.latest_good_checkpoint(tmp_path) is None
    assert "no optimizer.pt" in capsys.readouterr().err


def test_set_aside_corrupt_keeps_the_damaged_folder_out_of_sight(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path / f"checkpoint-{step}", step)
    truncate(tmp_path / "checkpoint-6" / "optimizer.pt")
    truncate(tmp_path / "checkpoint-2" / "optimizer.pt")  # older than the resumed step: left alone
    moved = faults.set_aside_corrupt(tmp_path, after_step=4)
    assert moved == [tmp_path / "corrupt-checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "corrupt-checkpoint-6"]
    assert (tmp_path / "corrupt-checkpoint-6" / "model.safetensors").is_file()  # kept, not deleted
    assert faults.checkpoint_folders(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]


def test_publish_is_one_rename_and_replaces_an_older_folder(tmp_path):
    final = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (final / "stale.txt").write_text("from the old save")
    staged = make_checkpoint(tmp_path / ".partial-checkpoint-4" / "checkpoint-4", 4)
    (staged / "new.txt").write_text("new")
    faults.publish(staged, final)
    assert (final / "new.txt").read_text() == "new" and not (final / "stale.txt").exists()
    assert not staged.exists() and not (tmp_path / ".replaced-checkpoint-4").exists()
    fresh = make_checkpoint(tmp_path / "stage" / "checkpoint-8", 8)
    faults.publish(fresh, tmp_path / "checkpoint-8")
    assert faults.checkpoint_problem(tmp_path / "checkpoint-8") is None


def test_remove_leftovers_only_touches_half_written_folders(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-4", 4)
    (tmp_path / ".partial-checkpoint-8" / "checkpoint-8").mkdir(parents=True)
    (tmp_path / ".replaced-checkpoint-4").mkdir()
    (tmp_path / ".partial-summary.json").write_text('{"final_st')  # a file: the atomic summary write
    (tmp_path / ".previous-run" / "checkpoint-2").mkdir(parents=True)  # its successor has a checkpoint
    (tmp_path / ".previous-run" / ".complete").write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    faults.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "notes.txt"]


def test_rotation_keeps_the_newest_and_the_best_and_never_shows_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path / f"checkpoint-{step}", step)
    faults.rotate(tmp_path, 2, str(tmp_path / "checkpoint-2"))
    assert [p.name for p in faults.checkpoint_folders(tmp_path)] == ["checkpoint-2", "checkpoint-8"]
    make_checkpoint(tmp_path / "checkpoint-10", 10)

    def killed(path, *args, **kwargs):
        if Path(path).is_dir():
            (Path(path) / "optimizer.pt").unlink()  # one file gone, then kill -9
            raise KeyboardInterrupt

    monkeypatch.setattr(faults.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        faults.rotate(tmp_path, 2, str(tmp_path / "checkpoint-2"))
    # the half-deleted folder is out of sight, and removed at the next start
    assert [p.name for p in faults.checkpoint_folders(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    monkeypatch.undo()
    faults.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2"]


def test_a_per_process_rng_state_counts(tmp_path):
    ckpt = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (ckpt / "rng_state.pth").rename(ckpt / "rng_state_0.pth")  # as a run of several processes saves it
    assert faults.checkpoint_problem(ckpt) is None


def test_training_finished_at_max_steps_or_at_the_target(tmp_path):
    ckpt = make_checkpoint(tmp_path / "checkpoint-8", 8)
    state = {"global_step": 8, "max_steps": 8,
             "log_history": [{"eval_valid_loss": 2.0, "step": 4}, {"eval_valid_loss": 1.5, "step": 8}]}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert faults.training_finished(ckpt, 8, None)
    assert faults.training_finished(ckpt, -1, None)  # epochs: the max_steps the run computed
    assert not faults.training_finished(ckpt, 12, None)
    assert faults.training_finished(ckpt, 12, 1.5) and faults.training_finished(ckpt, 12, 2.0)
    assert not faults.training_finished(ckpt, 12, 1.0)


def test_rebased_best_follows_the_folder_as_spelled_now(tmp_path):
    ckpt = make_checkpoint(tmp_path / "moved" / "checkpoint-8", 8)
    make_checkpoint(tmp_path / "moved" / "checkpoint-4", 4)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "best_model_checkpoint": "runs/a/checkpoint-4"}))
    assert faults.rebased_best(ckpt, tmp_path / "moved") == str(tmp_path / "moved" / "checkpoint-4")
    assert faults.rebased_best(ckpt, "elsewhere") is None  # no such folder there: no best to keep
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert faults.rebased_best(ckpt, tmp_path / "moved") is None


TORCH_DISK_FULL = [  # how torch.save says it, by where in its C++ writer the disk filled (seen on a tmpfs)
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8448 vs 8342"),
    RuntimeError("basic_ios::clear: iostream error"),
    RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    OSError(28, "No space left on device"),
]


@pytest.mark.parametrize("error", TORCH_DISK_FULL, ids=["unexpected pos", "iostream", "write failed", "ENOSPC"])
def test_full_disk_errors_are_write_failures(tmp_path, error):
    assert faults._is_write_failure(error, tmp_path)
    message = str(faults._disk_error(8, tmp_path, error))
    assert message.startswith(f"step 8: could not write the checkpoint into {tmp_path} (")
    assert "enforce fail" not in message and "GiB free there" in message


def test_a_chained_write_failure_is_found_and_a_nearly_full_disk_named(tmp_path, monkeypatch):
    try:
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . some other words")
    except RuntimeError as e:
        chained = e
    assert faults._is_write_failure(chained, tmp_path)
    assert not faults._is_write_failure(RuntimeError("shape mismatch"), tmp_path)  # a bug stays a bug
    monkeypatch.setattr(faults, "_free", lambda where: 4096)
    assert faults._is_write_failure(RuntimeError("some words from C++"), tmp_path)
    assert "(No space left on device; 0.0 GiB free there)" in str(faults._disk_error(8, tmp_path, chained))


def test_check_finite_weights_names_the_step():
    good = [torch.ones(3), torch.full((2, 2), 6e4, dtype=torch.float16)]  # large but finite in fp16
    faults.check_finite_weights(good, 7)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(faults.NonFiniteError, match=r"^step 7: the weights hold NaN or Inf"):
            faults.check_finite_weights([torch.ones(3), torch.tensor([1.0, bad])], 7)
    faults.check_finite_weights([], 0)


@pytest.fixture(autouse=True)
def released():
    """Each test's run-folder locks are given back, as run_training does at its end."""
    yield
    run_folder.release()


def _cfg(out: Path, *extra: str):
    return load_config(None, [f"train.output_dir={out}", *extra])


def test_resolve_auto_falls_back_and_claim_sets_the_damaged_one_aside(tmp_path, capsys):
    out = tmp_path / "run"
    for step in (5, 10):
        make_checkpoint(out / f"checkpoint-{step}", step)
    (out / "metrics.jsonl").write_text("")
    truncate(out / "checkpoint-10" / "model.safetensors")
    resolved, ckpt = run_folder.resolve(_cfg(out, "train.resume=auto"))
    assert (resolved, ckpt) == (out, out / "checkpoint-5")
    assert "checkpoint-10 is incomplete or corrupt" in capsys.readouterr().err
    assert (out / "checkpoint-10").is_dir()  # resolve() writes nothing
    run_folder.claim(out, ckpt)
    assert (out / "corrupt-checkpoint-10").is_dir() and not (out / "checkpoint-10").exists()


def test_resolve_refuses_a_damaged_named_checkpoint_and_points_at_a_good_one(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-5", 5)
    make_checkpoint(tmp_path / "checkpoint-10", 10)
    (tmp_path / "checkpoint-10" / "scheduler.pt").unlink()
    with pytest.raises(ConfigError, match=r"train.resume: .*checkpoint-10 cannot be resumed: no scheduler.pt; "
                                          r"the newest complete checkpoint beside it is .*checkpoint-5"):
        run_folder.resolve(_cfg(tmp_path / "out", f"train.resume={tmp_path / 'checkpoint-10'}"))


def test_resolve_auto_with_only_damaged_checkpoints_refuses(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-5", 5)
    truncate(tmp_path / "checkpoint-5" / "optimizer.pt")
    with pytest.raises(ConfigError, match="no complete checkpoint to resume from"):
        run_folder.resolve(_cfg(tmp_path, "train.resume=auto"))


def test_resolve_refuses_a_used_folder_and_writes_nothing(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_folder.resolve(_cfg(tmp_path))
    resolved, ckpt = run_folder.resolve(_cfg(tmp_path, "train.overwrite=true"))
    assert ckpt is None and (tmp_path / "summary.json").read_text() == "{}"  # cleared only by claim()
    make_checkpoint(tmp_path / "checkpoint-5", 5)
    (tmp_path / "final").mkdir()
    run_folder.claim(resolved, None)
    # the old run is set aside whole (not deleted) until the new one writes its first checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dirtune.lock", ".previous-run"]
    assert sorted(p.name for p in (tmp_path / ".previous-run").iterdir()) == [".complete", "checkpoint-5", "final",
                                                                            "summary.json"]


def test_a_signal_saves_and_stops_and_a_second_one_stops_at_once(tmp_path, capsys):
    import signal

    from transformers import TrainerControl, TrainerState

    from dirtune.train.callbacks import FaultGuard
    from dirtune.train.run_folder import MetricsLog, read_metrics

    guard = FaultGuard("stop", MetricsLog(tmp_path / "metrics.jsonl"), lambda: None)
    before = signal.getsignal(signal.SIGINT)
    guard.on_train_begin(None, None, None)
    try:
        signal.raise_signal(signal.SIGINT)
        assert guard.interrupted == "SIGINT"
        control = TrainerControl()
        guard.on_step_end(None, TrainerState(global_step=5), control)
        assert control.should_save and control.should_training_stop
        assert read_metrics(tmp_path / "metrics.jsonl") == [
            {"kind": "event", "step": 5, "event": "SIGINT: checkpoint saved, stopping"}]
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C is Python's own again
            signal.raise_signal(signal.SIGINT)
    finally:
        guard.release_signals()
    assert signal.getsignal(signal.SIGINT) is before
    err = capsys.readouterr().err
    assert "SIGINT: saving a checkpoint after this step" in err and "second SIGINT: stopping without saving" in err


def test_a_resumed_run_counts_what_happened_before_its_checkpoint(tmp_path):
    """skipped_steps and target_step came from memory only: a resumed run reported 0 and None."""
    from dirtune.train.callbacks import EvalRecorder, FaultGuard
    from dirtune.train.run_folder import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "event", "step": 3, "event": "non-finite loss: step skipped"},
        {"kind": "eval", "step": 4, "eval_loss": 2.0},
        {"kind": "event", "step": 5, "event": "non-finite gradient: step skipped"},
        {"kind": "eval", "step": 6, "eval_loss": 1.2},
        {"kind": "eval", "step": 8, "eval_loss": 1.1}]))
    log = MetricsLog(path, resume_step=8)
    assert FaultGuard("skip", log, lambda: None).skipped == 2
    assert EvalRecorder(log, 1.5).target_step == 6 and EvalRecorder(log, 1.0).target_step is None
