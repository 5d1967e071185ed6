"""Checkpoint folders on disk: their names, whether one is complete, which one to resume from,
and the tidying a killed run needs (damaged folders set aside, half-written ones removed).

`checkpoint_problem` tells a complete checkpoint from a truncated or damaged one without
loading tensors; `latest_good_checkpoint` is what `train.resume=auto` resumes from. How a
checkpoint gets written so that it is complete or absent is atomic_save.py.

Heavy libraries (torch, safetensors) are imported where used, so that the run folder code can
import this module cheaply.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

from dirtune.models.errors import ModelError
from dirtune.train import checksums

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_PREFIX = ".partial-"     # a checkpoint being written; never read
REPLACED_PREFIX = ".replaced-"   # an older checkpoint of the same step, removed once its successor is in place
CORRUPT_PREFIX = "corrupt-"      # kept for inspection; outside transformers' `checkpoint-*` glob
PREVIOUS_RUN = ".previous-run"   # a run being replaced (--overwrite), kept until the new one's first checkpoint
SET_ASIDE = ".complete"          # in PREVIOUS_RUN once the whole old run is in it

# What a resumable checkpoint needs besides trainer_state.json: one weights file (full model,
# sharded index or PEFT adapter) and the optimizer and scheduler, without which transformers
# would silently restart them and the run would no longer match an uninterrupted one.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "adapter_model.bin")
TORCH_FILES = ("optimizer.pt", "scheduler.pt")
OPTIONAL_TORCH_FILES = ("scaler.pt",)
# The random state (dropout, data order): one file, or one per process (rng_state_<rank>.pth).
# Without it transformers resumes anyway, with other dropout masks: no longer the same run.
RNG_FILES = ("rng_state.pth", "rng_state_0.pth")


class CheckpointError(ModelError):
    """A checkpoint that cannot be written or read back; the message names the folder and why."""


def _zip_problem(path: Path) -> str | None:
    # torch.save writes a zip archive whose directory sits at the end of the file: reading the
    # directory catches truncation without loading (possibly tens of GB of) tensors.
    if path.stat().st_size == 0:
        return f"{path.name} is empty"
    try:
        with zipfile.ZipFile(path) as z:
            if not z.namelist():
                return f"{path.name} holds no tensors"
    except (zipfile.BadZipFile, OSError) as e:
        return f"{path.name} is truncated or not a torch file ({e})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    # safe_open parses the header and checks that the tensors it lists exactly cover the file.
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError has no stable import path across versions
        return f"{path.name} is truncated or corrupt ({e})"
    return None


def _weights_problem(folder: Path) -> str | None:
    present = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
    if not present:
        return f"no model weights ({', '.join(WEIGHT_FILES)})"
    for path in present:
        if path.name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                return f"{path.name} is not a valid shard index ({e})"
            for shard in shards:
                if not (folder / shard).is_file():
                    return f"shard {shard} named by {path.name} is missing"
                if problem := _safetensors_problem(folder / shard):
                    return problem
        elif path.suffix == ".safetensors":
            if problem := _safetensors_problem(path):
                return problem
        elif problem := _zip_problem(path):
            return problem
    return None


# FSDP checkpoints (accelerate): the optimizer as optimizer.bin (FULL_STATE_DICT, a torch archive)
# or optimizer_0/ (SHARDED_STATE_DICT, a torch.distributed.checkpoint folder); sharded weights as
# pytorch_model_fsdp_0/ instead of model files.
FSDP_ALTERNATIVES = {"optimizer.pt": ("optimizer.bin", "optimizer_0")}
FSDP_SHARDED_WEIGHTS = "pytorch_model_fsdp_0"


def _dcp_folder(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def checkpoint_problem(folder: str | Path) -> str | None:
    """None if `folder` is a complete checkpoint; else what is wrong with it, in a few words.

    Checks, without loading tensors: trainer_state.json parses and names the folder's step;
    every weights file's header parses and covers the file; optimizer.pt, scheduler.pt and the
    RNG state are non-empty, complete torch archives; and, last, every file matches its
    checksum in checksums.json (bytes changed in place, which the other checks cannot see).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save did not finish)"
    try:
        step = json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"trainer_state.json is unreadable ({type(e).__name__}: {e})"
    m = CHECKPOINT_RE.match(folder.name)
    if m and step != int(m.group(1)):
        return f"trainer_state.json says step {step!r}, the folder name says {m.group(1)}"
    if not _dcp_folder(folder / FSDP_SHARDED_WEIGHTS) and (problem := _weights_problem(folder)):
        return problem
    for name in TORCH_FILES:
        found = [folder / n for n in (name, *FSDP_ALTERNATIVES.get(name, ()))
                 if (folder / n).is_file() or _dcp_folder(folder / n)]
        if not found:
            if name == TORCH_FILES[0] and not any((folder / n).exists() for n in TORCH_FILES[1:]):
                return ("no optimizer or scheduler state: it holds weights only (train.save_only_model), "
                        "which cannot be resumed")
            return f"no {name}"
        if found[0].is_file() and (problem := _zip_problem(found[0])):
            return problem
    rng = [folder / n for n in RNG_FILES if (folder / n).is_file()]
    if not rng:
        return ("no rng_state.pth (the random state of dropout and data order): resumed without it, "
                "the run would no longer match an uninterrupted one")
    for path in [*rng, *(folder / n for n in OPTIONAL_TORCH_FILES if (folder / n).is_file())]:
        if problem := _zip_problem(path):
            return problem
    return checksums.problem(folder)


def checkpoint_folders(out: str | Path) -> list[Path]:
    """Every `checkpoint-N` folder in `out`, complete or not, oldest step first."""
    found = []
    for p in Path(out).glob("checkpoint-*"):
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_good_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint in `out` (None if there is none).

    Newer ones that fail `checkpoint_problem` are skipped with a warning on stderr naming the
    folder and the problem.
    """
    for folder in reversed(checkpoint_folders(out)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        print(f"dirtune: warning: checkpoint {folder} is incomplete or corrupt: {problem}; "
              "skipping it and using the one before", file=sys.stderr)
    return None


def step_of(folder: str | Path) -> int:
    """The step a checkpoint folder holds, from its trainer_state.json."""
    return int(json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


def set_aside_corrupt(out: str | Path, after_step: int) -> list[Path]:
    """Rename damaged `checkpoint-N` folders with N > after_step to `corrupt-checkpoint-N`.

    Resuming from an older checkpoint will write step N again; the damaged folder is kept (not
    deleted: it may be all that is left of those steps) but moved out of transformers' sight,
    where it would count as the newest checkpoint when old ones are rotated.
    """
    moved = []
    for folder in checkpoint_folders(out):
        if int(CHECKPOINT_RE.match(folder.name).group(1)) > after_step and checkpoint_problem(folder):
            target = folder.with_name(CORRUPT_PREFIX + folder.name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(folder, target)
            moved.append(target)
    return moved


def remove_leftovers(out: str | Path) -> None:
    """Remove what a killed save left behind: half-written folders and files (they never hold
    finished work), and a replaced run kept aside once its successor has a checkpoint."""
    for prefix in (PARTIAL_PREFIX, REPLACED_PREFIX):
        for p in Path(out).glob(prefix + "*"):
            remove_path(p)
    if checkpoint_folders(out) and (Path(out) / PREVIOUS_RUN / SET_ASIDE).exists():
        remove_path(Path(out) / PREVIOUS_RUN)


def remove_path(path: Path) -> None:
    """Delete a file or a folder (a symlink is unlinked, not followed); nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def training_finished(ckpt: str | Path, max_steps: int, target_loss: float | None) -> bool:
    """Had training ended when `ckpt` was saved? (its step is max_steps, or an evaluation up to
    it reached target_loss). Such a checkpoint is the last of its run: resuming it must hand
    over the model, not train a step past the end. max_steps <= 0: the one the run computed."""
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8"))
    step = state["global_step"]
    total = max_steps if max_steps > 0 else int(state.get("max_steps") or 0)
    if total > 0 and step >= total:
        return True
    if target_loss is None:
        return False
    return any(isinstance(e.get("eval_valid_loss"), (int, float)) and e["eval_valid_loss"] <= target_loss
               for e in state.get("log_history", []) if e.get("step", step + 1) <= step)


def rebased_best(ckpt: str | Path, run_dir: str | Path) -> str | None:
    """The best checkpoint `ckpt`'s trainer state names, as a path in `run_dir` as spelled now.

    The state holds the path as it was spelled when saved ("runs/a/checkpoint-8"); resumed as
    "/home/x/runs/a", or after the folder moved, that string no longer matches the folders
    transformers lists, and rotation would delete the best checkpoint as an ordinary one.
    """
    best = json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8")).get("best_model_checkpoint")
    if not best:
        return None
    here = Path(run_dir) / Path(best).name
    return str(here) if CHECKPOINT_RE.match(here.name) and here.is_dir() else None
