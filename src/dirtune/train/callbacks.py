"""Trainer callbacks: evaluation records and the target stop, drift metrics, progress, faults."""

from __future__ import annotations

import math
import re
import signal
import sys
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from dirtune.method import sharded
from dirtune.train.distributed import any_process
from dirtune.train.nonfinite import NonFiniteError
from dirtune.train.run_folder import MetricsLog


_FORGET_METRIC = re.compile(r"eval_(forget(?:_\w+)?)_loss")


class EvalRecorder(TrainerCallback):
    """Writes an eval line per evaluation and stops at the first one whose loss <= target_loss.

    The line holds `eval_loss` (validation) and the loss of every forget set evaluated at that
    step: `forget_loss` (data.forget_file) and `forget_<name>_loss` (data.forget_files).
    `save_at_target`: also ask Trainer for a checkpoint at the target (the best weights, when
    they are kept as checkpoint folders)."""

    def __init__(self, log: MetricsLog, target_loss: float | None, save_at_target: bool = True):
        self.log = log
        self.target_loss = target_loss
        self.save_at_target = save_at_target
        self.target_step: int | None = None
        self._forget: dict[int, dict[str, float]] = {}
        if target_loss is not None:  # a resumed run: the target may have been reached before the checkpoint
            self.target_step = next((r["step"] for r in log.read() if r.get("kind") == "eval"
                                     and isinstance(r.get("eval_loss"), float) and r["eval_loss"] <= target_loss), None)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # Trainer evaluates a dict of datasets one at a time, in order: the runner puts the
        # forget sets before "valid" so that one line can carry them all.
        metrics = metrics or {}
        for key, value in metrics.items():
            m = _FORGET_METRIC.fullmatch(key)
            if m:
                self._forget.setdefault(state.global_step, {})[f"{m.group(1)}_loss"] = value
        loss = metrics.get("eval_valid_loss")
        if loss is None:
            return
        record = {"kind": "eval", "step": state.global_step, "eval_loss": loss}
        record.update(self._forget.pop(state.global_step, {}))
        self.log.write(record)
        if self.target_loss is not None and self.target_step is None and loss <= self.target_loss:
            self.target_step = state.global_step
            self.log.write({"kind": "event", "step": state.global_step,
                            "event": f"target_loss {self.target_loss} reached (eval loss {loss:.6g})"})
            control.should_training_stop = True
            control.should_save = self.save_at_target


class BestInMemory(TrainerCallback):
    """train.keep_best=memory: the trainable weights are copied, on their device, at every
    evaluation whose validation loss is strictly lower than all before (Trainer's rule for the
    best checkpoint), and `restore()` puts them back after training. This replaces a checkpoint
    folder per improvement (540 MB for a 135M model in fp32) and reading the best one back.
    Frozen weights (the LoRA base) never change, so they are not copied."""

    def __init__(self):
        self.best: float | None = None
        self.best_step: int | None = None
        self._params: list[torch.Tensor] = []
        self._copy: list[torch.Tensor] | None = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_valid_loss")
        if loss is None or not math.isfinite(loss) or (self.best is not None and loss >= self.best):
            return
        self.best, self.best_step = loss, state.global_step
        with torch.no_grad():
            if self._copy is None:
                self._params = [p for p in model.parameters() if p.requires_grad]
                self._copy = [p.detach().clone() for p in self._params]
            else:
                torch._foreach_copy_(self._copy, [p.detach() for p in self._params])

    def restore(self, global_step: int) -> bool:
        """Put the best weights back (True) unless none were kept or they are the current ones;
        the copy is freed either way."""
        copy, self._copy = self._copy, None
        if copy is None or self.best_step == global_step:
            return False
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self._params], copy)
        return True


class DriftMeter(TrainerCallback):
    """Every k steps: per module type, the angle to the pretrained weights and ||W-W0||/||W0||.

    `measure` is DirectionPenalty.angles (it already holds the references); the values are
    handed to the trainer, which merges them into the next training log line.
    """

    def __init__(self, measure: Callable[[], dict[str, dict[str, float]]], every: int, sink: dict):
        self.measure, self.every, self.sink = measure, every, sink

    def _collect(self) -> None:
        stats = self.measure()
        angles = {f"angle/{k}": v["angle_deg"] for k, v in stats.items()}
        drifts = {f"drift/{k}": v["drift"] for k, v in stats.items()}
        if angles:
            angles["angle/mean"] = sum(angles.values()) / len(angles)
            drifts["drift/mean"] = sum(drifts.values()) / len(drifts)
        self.sink.update(angles)
        self.sink.update(drifts)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._collect()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._collect()


class Progress(TrainerCallback):
    """One bar: step / max_steps, ETA, last training loss, last validation loss."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.post: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train",
                            dynamic_ncols=True, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.post["loss"] = f"{logs['loss']:.4f}"
        if "eval_valid_loss" in logs:
            self.post["val"] = f"{logs['eval_valid_loss']:.4f}"
        self.bar.set_postfix(self.post, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class FaultGuard(TrainerCallback):
    """NaN/Inf checks before each optimizer step and at each evaluation, and SIGINT/SIGTERM turned
    into save-and-stop.

    Checking before the step means a bad gradient never reaches the weights, so no NaN weights
    can be saved as a checkpoint or as the best model. `nan_policy=skip` skips such a step; it
    stops all the same when skipping cannot help: an evaluation loss is NaN/Inf (the weights
    themselves are broken), or MAX_SKIPS_IN_A_ROW steps in a row were skipped.
    """

    # Bad batches are rare and scattered in shuffled data; this many in a row means the weights,
    # not the data, give NaN (e.g. finite weights of 1e30 after a huge learning rate).
    MAX_SKIPS_IN_A_ROW = 10

    def __init__(self, policy: str, log: MetricsLog, last_loss: Callable[[], torch.Tensor | None]):
        self.policy, self.log, self.last_loss = policy, log, last_loss
        self.interrupted: str | None = None
        # a resumed run counts the steps skipped before its checkpoint too (the log holds them)
        self.skipped = sum(1 for r in log.read() if r.get("kind") == "event"
                           and str(r.get("event", "")).endswith("step skipped"))
        self._in_a_row = 0
        self._previous: dict[int, Any] = {}

    # -- signals
    def _handler(self, signum, frame):
        if self.interrupted:
            # A second signal: the user means it. Stop now; checkpoints are written atomically,
            # so the last complete one survives even a stop in the middle of a save.
            print(f"dirtune: second {signal.Signals(signum).name}: stopping without saving; "
                  "resume from the last checkpoint with train.resume=auto", file=sys.stderr)
            self.release_signals()
            signal.raise_signal(signum)
            return
        self.interrupted = signal.Signals(signum).name
        print(f"dirtune: {self.interrupted}: saving a checkpoint after this step, then stopping "
              "(send it again to stop at once)", file=sys.stderr)

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a test runner): leave signals alone
                pass

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
            self.log.write({"kind": "event", "step": state.global_step,
                            "event": f"{self.interrupted}: checkpoint saved, stopping"})

    def on_train_end(self, args, state, control, **kwargs):
        self.release_signals()

    def release_signals(self) -> None:
        """Put back the handlers that were there before training (idempotent)."""
        for sig, handler in self._previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(sig, handler)
        self._previous.clear()

    # -- numerics
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        loss = self.last_loss()
        # FSDP2 grads are DTensors: check this process's shards, then decide together, for a
        # NaN may sit in one process's shard or batch only, and a process that skipped or
        # stopped alone would leave the others waiting in the next collective.
        grads = [sharded.local(p.grad) for p in model.parameters() if p.grad is not None]
        device = grads[0].device if grads else (loss.device if loss is not None else "cpu")
        # both checks as device flags, read back together: one host sync per step, not two
        flags = torch.zeros(2, dtype=torch.bool, device=device)
        if loss is not None:
            flags[0] = ~torch.isfinite(loss.to(device)).all()
        if grads:
            flags[1] = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).to(device)).all()
        loss_bad, grad_bad = flags.tolist()
        loss_bad, grad_bad = any_process([loss_bad, grad_bad], device)
        bad = "loss" if loss_bad else ("gradient" if grad_bad else None)
        if bad is None:
            self._in_a_row = 0
            return
        step = state.global_step + 1
        if self.policy == "stop":
            self.log.write({"kind": "event", "step": step, "event": f"non-finite {bad}: stopped"})
            raise NonFiniteError(f"step {step}: the {bad} is NaN or Inf; stopped before the optimizer step "
                                 "(weights untouched). Lower optimizer.lr, check the data, or set "
                                 "train.nan_policy=skip to skip such steps")
        self._in_a_row += 1
        if self._in_a_row >= self.MAX_SKIPS_IN_A_ROW:
            self.log.write({"kind": "event", "step": step, "event": f"non-finite {bad}: stopped "
                            f"after {self._in_a_row} skipped steps in a row"})
            raise NonFiniteError(f"step {step}: the {bad} was NaN or Inf at {self._in_a_row} steps in a row; "
                                 "skipping steps cannot help when the weights themselves give NaN, so the run "
                                 "stopped (the weights of the skipped steps were not saved). Resume from an "
                                 "earlier checkpoint with a lower optimizer.lr, or check the data")
        # skip: a parameter whose grad is None is left alone by torch optimizers (state too).
        for p in model.parameters():
            p.grad = None
        self.skipped += 1
        self.log.write({"kind": "event", "step": step, "event": f"non-finite {bad}: step skipped"})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # whatever the policy: skipping steps cannot repair weights that give a NaN loss on held-out
        # data; continuing would hand over a model with a stale "best" and a false final loss
        bad = sorted(k for k, v in (metrics or {}).items()
                     if k.endswith("_loss") and isinstance(v, float) and not math.isfinite(v))
        if not bad:
            return
        what = ", ".join(k.removeprefix("eval_") for k in bad)
        self.log.write({"kind": "event", "step": state.global_step, "event": f"non-finite {what}: stopped"})
        raise NonFiniteError(f"step {state.global_step}: the evaluation gives NaN or Inf ({what}): the weights "
                             "no longer give finite outputs; stopped without saving them (the checkpoints "
                             "already written are untouched). Resume from an earlier checkpoint with a lower "
                             "optimizer.lr, or check the data")
