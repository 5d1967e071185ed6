"""checksums.py: what a checkpoint's checksums.json catches that the structural checks cannot
(bytes changed in place), and that it costs one read of each file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dirtune.train import checkpoints, checksums


def checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": 4}, folder / "scheduler.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (folder / "sub").mkdir()
    (folder / "sub" / "empty.bin").write_bytes(b"")
    checksums.write(folder)
    return folder


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_fresh_checkpoint_matches_its_checksums(tmp_path):
    ckpt = checkpoint(tmp_path / "checkpoint-4")
    record = json.loads((ckpt / checksums.NAME).read_text())
    assert set(record["files"]) == {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                                    "trainer_state.json", "sub/empty.bin"}
    assert checksums.problem(ckpt) is None and checkpoints.checkpoint_problem(ckpt) is None


def test_bytes_changed_inside_the_tensor_data_are_caught(tmp_path):
    """issue 13.4: 64 bytes of 0xff inside the safetensors data pass every structural check."""
    ckpt = checkpoint(tmp_path / "checkpoint-4")
    weights = ckpt / "adapter_model.safetensors"
    overwrite(weights, weights.stat().st_size // 2, b"\xff" * 64)
    problem = checkpoints.checkpoint_problem(ckpt)
    assert problem == ("adapter_model.safetensors does not match its checksum "
                       "(its bytes changed after it was written)")


def test_a_missing_or_resized_file_and_a_damaged_list_are_named(tmp_path):
    ckpt = checkpoint(tmp_path / "checkpoint-4")
    (ckpt / "sub" / "empty.bin").write_bytes(b"x")
    assert checksums.problem(ckpt) == "sub/empty.bin has 1 bytes, checksums.json says 0"
    (ckpt / "sub" / "empty.bin").unlink()
    assert checksums.problem(ckpt) == "sub/empty.bin is missing (listed in checksums.json)"
    (ckpt / checksums.NAME).write_text('{"files": ')
    assert checksums.problem(ckpt).startswith("checksums.json is unreadable")


def test_a_file_larger_than_one_block_is_hashed_block_by_block(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "BLOCK", 1000)
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * 20)  # 5120 bytes: 6 blocks
    [(size, digest)] = checksums.file_digests([path]).values()
    assert size == 5120
    overwrite(path, 4500, b"\x00")  # the fifth block only
    assert checksums.file_digests([path])[path][1] != digest


def test_checkpoints_written_before_checksums_existed_still_resume(tmp_path):
    ckpt = checkpoint(tmp_path / "checkpoint-4")
    (ckpt / checksums.NAME).unlink()
    assert checkpoints.checkpoint_problem(ckpt) is None
