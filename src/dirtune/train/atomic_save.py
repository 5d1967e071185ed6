"""Checkpoints and final/ written so that a kill never costs finished work.

A checkpoint is written into `.partial-checkpoint-N/` beside the others, flushed to disk, and
only then renamed to `checkpoint-N/`: a run killed while saving (kill -9, a full disk, a lost
node) leaves the previous checkpoints as they were and, at worst, a `.partial-*` folder that
the next run removes (checkpoints.remove_leftovers). Each published folder carries
`checksums.json` (checksums.py), written before the rename. A checkpoint of a run whose
training had ended (killed while final/ or summary.json was written) is not trained on: the
trainer only hands over its model (`AtomicCheckpoints.train`). A failed write because the disk
is full is reported as a CheckpointError that says so.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from dirtune.train import checksums
from dirtune.train.checkpoints import (PARTIAL_PREFIX, PREVIOUS_RUN, REPLACED_PREFIX, CheckpointError,
                                       checkpoint_folders, rebased_best, remove_path, training_finished)
from dirtune.train.nonfinite import check_finite_weights


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
        remove_path(run_dir / PREVIOUS_RUN)
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
