"""atomic_save.py without training: the rename that publishes a checkpoint, rotation that never
shows a half-deleted one, and a full disk told apart from a bug."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_checkpoint import make_checkpoint

from dirtune.train import atomic_save, checkpoints


def test_publish_is_one_rename_and_replaces_an_older_folder(tmp_path):
    final = make_checkpoint(tmp_path / "checkpoint-4", 4)
    (final / "stale.txt").write_text("from the old save")
    staged = make_checkpoint(tmp_path / ".partial-checkpoint-4" / "checkpoint-4", 4)
    (staged / "new.txt").write_text("new")
    atomic_save.publish(staged, final)
    assert (final / "new.txt").read_text() == "new" and not (final / "stale.txt").exists()
    assert not staged.exists() and not (tmp_path / ".replaced-checkpoint-4").exists()
    fresh = make_checkpoint(tmp_path / "stage" / "checkpoint-8", 8)
    atomic_save.publish(fresh, tmp_path / "checkpoint-8")
    assert checkpoints.checkpoint_problem(tmp_path / "checkpoint-8") is None


def test_rotation_keeps_the_newest_and_the_best_and_never_shows_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path / f"checkpoint-{step}", step)
    atomic_save.rotate(tmp_path, 2, str(tmp_path / "checkpoint-2"))
    assert [p.name for p in checkpoints.checkpoint_folders(tmp_path)] == ["checkpoint-2", "checkpoint-8"]
    make_checkpoint(tmp_path / "checkpoint-10", 10)

    def killed(path, *args, **kwargs):
        if Path(path).is_dir():
            (Path(path) / "optimizer.pt").unlink()  # one file gone, then kill -9
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic_save.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_save.rotate(tmp_path, 2, str(tmp_path / "checkpoint-2"))
    # the half-deleted folder is out of sight, and removed at the next start
    assert [p.name for p in checkpoints.checkpoint_folders(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    monkeypatch.undo()
    checkpoints.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2"]


TORCH_DISK_FULL = [  # how torch.save says it, by where in its C++ writer the disk filled (seen on a tmpfs)
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8448 vs 8342"),
    RuntimeError("basic_ios::clear: iostream error"),
    RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    OSError(28, "No space left on device"),
]


@pytest.mark.parametrize("error", TORCH_DISK_FULL, ids=["unexpected pos", "iostream", "write failed", "ENOSPC"])
def test_full_disk_errors_are_write_failures(tmp_path, error):
    assert atomic_save._is_write_failure(error, tmp_path)
    message = str(atomic_save._disk_error(8, tmp_path, error))
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
    assert atomic_save._is_write_failure(chained, tmp_path)
    assert not atomic_save._is_write_failure(RuntimeError("shape mismatch"), tmp_path)  # a bug stays a bug
    monkeypatch.setattr(atomic_save, "_free", lambda where: 4096)
    assert atomic_save._is_write_failure(RuntimeError("some words from C++"), tmp_path)
    assert "(No space left on device; 0.0 GiB free there)" in str(atomic_save._disk_error(8, tmp_path, chained))
