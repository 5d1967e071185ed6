"""transformers.Trainer with the method composed in: the coupled penalty in the loss
(`compute_loss`: the training step's loss reads here), the optimizer from its plan
(`create_optimizer`), and the task loss and the penalty logged apart (`log`).

What the method is (penalty, optimizer, groups) is decided once, in compose.build_method; this
module only composes the pieces and never reaches into the optimizer's state.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from dirtune.train import compose
from dirtune.train.config import Config
from dirtune.train.atomic_save import AtomicCheckpoints


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The optimizer of `cfg` over `model`'s parameter groups (compose.optimizer_plan)."""
    return compose.optimizer_plan(cfg).build(model)


class DirtuneTrainer(AtomicCheckpoints, Trainer):
    """Adds `penalty()` (a DirectionPenalty, already multiplied by lambda_dir) to the task loss and
    logs the task loss, the penalty and any drift metrics separately. Checkpoints are written
    atomically (atomic_save.AtomicCheckpoints)."""

    def __init__(self, *args, dirtune_cfg: Config, penalty=None, optimizer_plan: compose.OptimizerPlan | None = None,
                 metrics_log=None, extra_logs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dirtune_cfg = dirtune_cfg
        self.optimizer_plan = optimizer_plan
        self.penalty = penalty
        self.metrics_log = metrics_log
        self.extra_logs = extra_logs if extra_logs is not None else {}
        self.last_loss: torch.Tensor | None = None
        self._pen_sum = 0.0
        self._pen_steps = 0
        self._pen_step_seen = -1

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            plan = self.optimizer_plan or compose.optimizer_plan(self.dirtune_cfg)
            self.optimizer = plan.build(model if model is not None else self.model)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        loss, outputs = (out if return_outputs else (out, None))
        if model.training:
            self.last_loss = loss.detach()
            if self.penalty is not None:
                # Lazy regularization (method.every = k, as StyleGAN2's): the penalty on steps
                # 0, k, 2k, ... with weight k·lambda_dir, the same pull per k steps on average.
                # k = 1 takes exactly the unlazy path (no multiplication), bitwise.
                every = self.dirtune_cfg.method.every
                apply = every == 1 or self.state.global_step % every == 0
                pen = self.penalty() if apply else None
                if pen is not None and every > 1:
                    pen = pen * every
                # The task loss here is either a micro-batch mean (Trainer divides by the
                # accumulation steps afterwards) or already a share of the accumulated batch
                # (normalised by num_items_in_batch): scale the penalty the same way so each
                # optimizer step sees exactly lambda_dir * grad R.
                if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                    scale = self.current_gradient_accumulation_steps
                    pen = None if pen is None else pen / scale
                else:
                    scale = 1
                if pen is not None:
                    loss = loss + pen.to(loss.dtype)
                if self._pen_step_seen != self.state.global_step:
                    self._pen_step_seen = self.state.global_step
                    # kept on the device: a float() here would stall the GPU before backward
                    # at every step; log() reads it once per logging interval. Steps a lazy
                    # penalty skips count with 0, so the logged mean is what the loss carried.
                    if pen is not None:
                        self._pen_sum = self._pen_sum + pen.detach().float() * scale
                    self._pen_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and "eval_loss" not in logs:
            pen = float(self._pen_sum) / self._pen_steps if self._pen_steps else 0.0
            self._pen_sum, self._pen_steps = 0.0, 0
            # Trainer's "loss" includes the penalty; log the task loss and the penalty apart.
            logs["loss"] = logs["loss"] - pen
            logs["penalty"] = pen
            logs.update(self.extra_logs)
            if self.metrics_log is not None:
                record = {"kind": "train", "step": self.state.global_step, "loss": logs["loss"],
                          "penalty": pen, "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm")}
                record.update(self.extra_logs)
                self.metrics_log.write(record)
            self.extra_logs.clear()
        super().log(logs, start_time)
