"""Faults that must not cost finished work: atomic checkpoints, checkpoint validation, and the
errors a run stops with.

A checkpoint is written into `.partial-checkpoint-N/` beside the others, flushed to disk, and
only then renamed to `checkpoint-N/`: a run killed while saving (kill -9, a full disk, a lost
node) leaves the previous checkpoints as they were and, at worst, a `.partial-*` folder that
the next run removes. Each published folder carries `checksums.json` (checksums.py), written
before the rename. `checkpoint_problem` tells a complete checkpoint from a truncated or damaged
one; `latest_good_checkpoint` is what `train.resume=auto` resumes from. A checkpoint of a run
whose training had ended (killed while final/ or summary.json was written) is not trained on:
the trainer only hands over its model (`AtomicCheckpoints.train`).

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
            _remove(p)
    if checkpoint_folders(out) and (Path(out) / PREVIOUS_RUN / SET_ASIDE).exists():
        _remove(Path(out) / PREVIOUS_RUN)


def _remove(path: Path) -> None:
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


# How a failed write shows up: OSError from Python and safetensors, but RuntimeError from torch.save,
# worded by where in its C++ writer the disk filled: "PytorchStreamWriter failed writing file …:
# file write failed", "basic_ios::clear: iostream error", "[enforce fail at inline_container.cc:672]
# . unexpected pos 8448 vs 8342" (seen on a full tmpfs, the last one chained on the one before).
_WRITE_FAILURES = ("write failed", "no space left", "os error 28", "disk quota", "os error 122",
                   "iostream error", "unexpected pos")
_NEARLY_FULL = 16 << 20  # bytes free under which a failed write is taken as a full disk


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _free(where: Path) -> int | None:
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def _is_write_failure(e: BaseException, where: Path | None = None) -> bool:
    if any(isinstance(x, OSError) or any(w in str(x).lower() for w in _WRITE_FAILURES) for x in _chain(e)):
        return True
    free = _free(where) if where is not None else None
    return isinstance(e, RuntimeError) and free is not None and free < _NEARLY_FULL


def _disk_error(step: int, where: Path, e: BaseException) -> CheckpointError:
    os_error = next((x for x in _chain(e) if isinstance(x, OSError) and x.strerror), None)
    free_bytes = _free(where)
    if os_error is not None:
        reason = os_error.strerror
    elif free_bytes is not None and free_bytes < _NEARLY_FULL:
        reason = "No space left on device"  # torch's own words name its C++ source, not the cause
    else:
        reason = str(e).strip().splitlines()[-1]
        reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", reason)  # torch's C++ location prefix
    free = f"; {free_bytes / 2**30:.1f} GiB free there" if free_bytes is not None else ""
    return CheckpointError(f"step {step}: could not write the checkpoint into {where} ({reason}{free}); "
                           "the checkpoints already there are untouched. Free disk space (or fix the "
                           "permissions) and resume with train.resume=auto")


class AtomicCheckpoints:
    """Trainer mixin: `checkpoint-N/` appears complete or not at all, never with NaN weights.

    transformers.Trainer writes a checkpoint into `_get_output_dir()/checkpoint-N`; while
    saving, that directory is pointed at a staging folder, checksums are added, and the result
    is published by one rename. Old checkpoints are rotated afterwards in the real folder, as
    Trainer would. On resume, the best checkpoint's path is re-read in the folder as spelled
    now, and a checkpoint saved after training ended is only handed over (`train`).
    """

    _staging: Path | None = None
    _resumed_from: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_best_checkpoint_follower(self))
        # Rotation is ours (_save_checkpoint). Left to transformers, save_total_limit=1 also deletes
        # every checkpoint but the best when training ends, even when it ends on SIGTERM: the one
        # just saved to resume from would go.
        self._save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._resumed_from = str(resume_from_checkpoint) if resume_from_checkpoint else None
        cfg = getattr(self, "dirtune_cfg", None)
        target = cfg.train.target_loss if cfg is not None else None
        if self._resumed_from and training_finished(self._resumed_from, self.args.max_steps, target):
            return self._hand_over(self._resumed_from)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _hand_over(self, ckpt: str):
        """Training had ended at `ckpt`: load the model the uninterrupted run ended with (the
        best checkpoint's weights when it loads the best at the end, else the checkpoint's) and
        train nothing. transformers would run one more step, at learning rate 0."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        if self.args.world_size > 1:  # loading into a model not yet sharded is not supported by transformers
            raise CheckpointError(f"train.resume: {ckpt} was saved when training had ended (killed while final/ "
                                  "or summary.json was written); resume it with one process, which writes "
                                  "final/ and summary.json without training")
        self.state = TrainerState.load_from_json(str(Path(ckpt) / "trainer_state.json"))
        self.state.best_model_checkpoint = rebased_best(ckpt, self.args.output_dir)
        # a kill between publishing the last checkpoint and rotating the old ones left them all
        rotate(Path(self.args.output_dir), self._save_total_limit, self.state.best_model_checkpoint)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_model()
        else:
            self._load_from_checkpoint(ckpt)
        return TrainOutput(self.state.global_step, 0.0, {})

    def _get_output_dir(self, trial):
        if self._staging is not None:
            return str(self._staging)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
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
            # judged before the partial folder is removed: its space is what ran out
            error = _disk_error(step, run_dir, e) if _is_write_failure(e, run_dir) else None
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if error is not None:
                raise error from None
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
            checksums.write(written)
            publish(written, final)
        except OSError as e:
            error = _disk_error(step, run_dir, e)
            shutil.rmtree(staging, ignore_errors=True)
            raise error from None
        shutil.rmtree(staging, ignore_errors=True)
        # the first checkpoint of a run that replaced another (--overwrite): the old one can go
        _remove(run_dir / PREVIOUS_RUN)
        rotate(run_dir, self._save_total_limit, self.state.best_model_checkpoint)
        if distributed:
            self.accelerator.wait_for_everyone()


def rotate(run_dir: Path, keep: int | None, best: str | None) -> None:
    """Delete the oldest checkpoints beyond `keep`, never the newest nor the best (transformers'
    rule). Each is renamed out of sight first, so a kill mid-delete leaves no half checkpoint-N."""
    folders = checkpoint_folders(run_dir)
    if not keep or keep <= 0 or len(folders) <= keep:
        return
    protected = {folders[-1].name} | ({Path(best).name} if best else set())
    remaining = len(folders)
    for folder in folders:
        if remaining <= max(keep, len(protected)):
            break
        if folder.name in protected:
            continue
        doomed = folder.with_name(REPLACED_PREFIX + folder.name)
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        remaining -= 1


def _best_checkpoint_follower(trainer):
    """A callback that, when a run resumes, points the best checkpoint at its folder as spelled now
    (transformers drops a path that no longer exists, and keeps one spelled otherwise)."""
    from transformers import TrainerCallback

    class BestCheckpointFollower(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if trainer._resumed_from:
                state.best_model_checkpoint = rebased_best(trainer._resumed_from, args.output_dir)

    return BestCheckpointFollower()


def save_model_atomically(trainer, dest: str | Path) -> Path:
    """`trainer.save_model` into `dest` (weights or adapter, config, tokenizer, checksums) by
    staging + rename."""
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
            checksums.write(staging)
            publish(staging, dest)
    except Exception as e:
        error = _disk_error(trainer.state.global_step, dest.parent, e) if _is_write_failure(e, dest.parent) else None
        shutil.rmtree(staging, ignore_errors=True)
        if error is not None:
            raise error from None
        raise
    return dest
