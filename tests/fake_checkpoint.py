"""A checkpoint folder as transformers writes one, with tiny tensors, and the damage a kill does
to a file: for the unit tests of checkpoint validation, atomic saving and the run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


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
