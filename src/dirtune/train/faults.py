"""Faults that must not cost finished work: atomic checkpoints, checkpoint validation, and the
errors a run stops with.

A checkpoint is written into `.partial-checkpoint-N/` beside the others, flushed to disk, and
only then renamed to `checkpoint-N/`: a run killed while saving (kill -9, a full disk, a lost
node) leaves the previous checkpoints as they were and, at worst, a `.partial-*` folder that
the next run removes. `checkpoint_problem` tells a complete checkpoint from a truncated or
damaged one; `latest_good_checkpoint` is what `train.resume=auto` resumes from.

Heavy libraries (torch, safetensors, transformers) are imported where used, so that the run
folder code can import this module cheaply.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Iterable

from dirtune.models.errors import ModelError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_PREFIX = ".partial-"     # a checkpoint being written; never read
REPLACED_PREFIX = ".replaced-"   # an older checkpoint of the same step, removed once its successor is in place
CORRUPT_PREFIX = "corrupt-"      # kept for inspection; outside transformers' `checkpoint-*` glob

# What a resumable checkpoint needs besides trainer_state.json: one weights file (full model,
# sharded index or PEFT adapter) and the optimizer and scheduler, without which transformers
# would silently restart them and the run would no longer match an uninterrupted one.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "adapter_model.bin")
TORCH_FILES = ("optimizer.pt", "scheduler.pt")
OPTIONAL_TORCH_FILES = ("rng_state.pth", "scaler.pt")


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss, gradient or weight: the run stops before anything non-finite is saved."""


class CheckpointError(ModelError):
    """A checkpoint that cannot be written or read back; the message names the folder and why."""


# ---------------------------------------------------------------- validation

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
    every weights file's header parses and covers the file; optimizer.pt and scheduler.pt (and
    rng_state.pth if present) are non-empty, complete torch archives.
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
    for name in OPTIONAL_TORCH_FILES:
        if (folder / name).is_file() and (problem := _zip_problem(folder / name)):
            return problem
    return None


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
    """Remove half-written folders a killed save left behind (they never hold finished work)."""
    for prefix in (PARTIAL_PREFIX, REPLACED_PREFIX):
        for p in Path(out).glob(prefix + "*"):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- atomic writing

def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk, so that the rename publishes complete files even
    if the machine (not just the process) goes down."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Move the finished folder `staged` to `final` with one rename (replacing an older `final`)."""
    _fsync_tree(staged)
    if final.exists():
        # rename() cannot replace a non-empty folder: move the old one aside first. A kill in
        # between loses only this step's checkpoint; the older ones stay complete.
        old = final.with_name(REPLACED_PREFIX + final.name)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(final.parent)


def check_finite_weights(params: Iterable, step: int) -> None:
    """NonFiniteError unless every tensor in `params` is finite."""
    import torch

    from dirtune.method.sharded import local
    from dirtune.train.distributed import any_process

    # FSDP2 weights are DTensors: check this process's shards, and decide on every process
    tensors = [local(p.detach()) for p in params]
    if not tensors:
        return
    # max |w| per tensor in one fused pass: NaN and Inf propagate, and unlike the 2-norm it
    # cannot overflow in fp16 for finite weights.
    norms = torch.stack([n.float().cpu() for n in torch._foreach_norm(tensors, float("inf"))])
    (bad,) = any_process([not bool(torch.isfinite(norms).all())], tensors[0].device)
    if bad:
        raise NonFiniteError(f"step {step}: the weights hold NaN or Inf; they were not saved and the "
                             "checkpoints already written are untouched. Lower optimizer.lr, check the "
                             "data, or resume from the last checkpoint")


# How a failed write shows up: OSError from Python and safetensors, but RuntimeError from torch.save
# ("PytorchStreamWriter failed writing file …: file write failed").
_WRITE_FAILURES = ("write failed", "no space left", "os error 28", "disk quota", "os error 122")


def _is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or any(w in str(e).lower() for w in _WRITE_FAILURES)


def _disk_error(step: int, where: Path, e: BaseException) -> CheckpointError:
    reason = (e.strerror if isinstance(e, OSError) else None) or str(e).strip().splitlines()[-1]
    reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", reason)  # torch's C++ location prefix
    try:
        free = f"; {shutil.disk_usage(where).free / 2**30:.1f} GiB free there"
    except OSError:
        free = ""
    return CheckpointError(f"step {step}: could not write the checkpoint into {where} ({reason}{free}); "
                           "the checkpoints already there are untouched. Free disk space (or fix the "
                           "permissions) and resume with train.resume=auto")


class AtomicCheckpoints:
    """Trainer mixin: `checkpoint-N/` appears complete or not at all, never with NaN weights.

    transformers.Trainer writes a checkpoint into `_get_output_dir()/checkpoint-N`; while
    saving, that directory is pointed at a staging folder, and the result is published by one
    rename. Old checkpoints are rotated afterwards in the real folder, as Trainer would.
    """

    _staging: Path | None = None

    def _get_output_dir(self, trial):
        if self._staging is not None:
            return str(self._staging)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import rotate_checkpoints

        step = self.state.global_step
        check_finite_weights((p for p in self.model.parameters() if p.requires_grad), step)
        run_dir = Path(self._get_output_dir(trial))
        name = f"checkpoint-{step}"
        staging = run_dir / f"{PARTIAL_PREFIX}{name}"
        distributed = self.args.world_size > 1
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        if distributed:
            self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if _is_write_failure(e):
                raise _disk_error(step, run_dir, e) from None
            raise
        finally:
            self._staging = None
        if distributed:  # sharded optimizer states are written by every rank
            self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            if distributed:  # the main process's last barrier, after publishing
                self.accelerator.wait_for_everyone()
            return
        written, final = staging / name, run_dir / name
        best = self.state.best_model_checkpoint
        if best is not None and Path(best) == written:
            # Trainer saw this checkpoint as the best under its staging path: record the real one.
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(written / "trainer_state.json"))
        try:
            publish(written, final)
        except OSError as e:
            raise _disk_error(step, run_dir, e) from None
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        if distributed:
            self.accelerator.wait_for_everyone()


def save_model_atomically(trainer, dest: str | Path) -> Path:
    """`trainer.save_model` into `dest` (weights or adapter, config, tokenizer) by staging + rename."""
    dest = Path(dest)
    check_finite_weights((p for p in trainer.model.parameters() if p.requires_grad), trainer.state.global_step)
    staging = dest.with_name(PARTIAL_PREFIX + dest.name)
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    if trainer.args.world_size > 1:
        trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
        if trainer.args.should_save:
            publish(staging, dest)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        if _is_write_failure(e):
            raise _disk_error(trainer.state.global_step, dest.parent, e) from None
        raise
    return dest
