"""transformers.Trainer with the method composed in: the coupled penalty in the loss, and the
optimizer (AdamW baseline or BalancedAdamW, LoRA+ groups) built from the config.

Training code only composes the method's pieces; it never reaches into the optimizer's state.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from dirtune.method.balanced_adamw import BalancedAdamW
from dirtune.train.config import Config, ConfigError
from dirtune.train.faults import AtomicCheckpoints

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _covered(name: str, targets: list[str]) -> bool:
    """Is parameter `name` the weight of a module the method covers (q_proj, …)?"""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and (
        parts[-2] in targets or (parts[-2] == "base_layer" and len(parts) >= 3 and parts[-3] in targets))


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Split trainable parameters into optimizer groups.

    full fine-tuning: covered projection weights (decay + decoupled direction turn), other
    matrices such as embeddings (decay only), and 1-D tensors (norm gains, biases: no decay,
    as is usual). LoRA: A and B matrices (decay toward zero, i.e. B·A -> the pretrained model),
    with LoRA+ giving B a learning rate `loraplus_ratio` times larger.
    """
    opt, method = cfg.optimizer, cfg.method
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    turn = method.direction_weight if method.penalty == "decoupled" else 0.0
    groups: dict[str, dict] = {}

    def add(key: str, p: torch.nn.Parameter, **opts):
        groups.setdefault(key, {"params": [], "name": key, **opts})["params"].append(p)

    if cfg.finetune.type == "lora":
        ratio = cfg.finetune.loraplus_ratio or 1.0
        for n, p in trainable:
            if p.ndim < 2:
                add("lora_1d", p, weight_decay=0.0, direction_weight=0.0)
            elif "lora_B" in n:
                add("lora_B", p, lr=opt.lr * ratio, weight_decay=opt.weight_decay, direction_weight=0.0)
            else:
                add("lora_A", p, weight_decay=opt.weight_decay, direction_weight=0.0)
    else:
        for n, p in trainable:
            if p.ndim < 2:
                add("no_decay", p, weight_decay=0.0, direction_weight=0.0)
            elif _covered(n, method.targets):
                add("projections", p, weight_decay=opt.weight_decay, direction_weight=turn)
            else:
                add("other_matrices", p, weight_decay=opt.weight_decay, direction_weight=0.0)
    if not groups:
        raise ConfigError("no trainable parameters: check finetune.type and finetune.lora_targets")
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    groups = param_groups(model, cfg)
    betas = tuple(opt.betas)
    if opt.name == "adamw":
        for g in groups:
            g.pop("direction_weight", None)
        fused = {} if opt.fused is None else {"fused": opt.fused}   # null: torch's own default
        return torch.optim.AdamW(groups, lr=opt.lr, betas=betas, eps=opt.eps,
                                 weight_decay=opt.weight_decay, foreach=opt.foreach, **fused)
    # LoRA's A/B anchor at zero: B·A = 0 is the pretrained model (method.md §2).
    anchor = "zero" if cfg.finetune.type == "lora" and opt.anchor == "init" else opt.anchor
    device = "cpu" if cfg.method.reference_device == "cpu" else None
    return BalancedAdamW(groups, lr=opt.lr, betas=betas, eps=opt.eps, weight_decay=opt.weight_decay,
                         anchor=anchor, balance=opt.balance, anchor_dtype=DTYPES[opt.anchor_dtype],
                         granularity=cfg.method.granularity, anchor_device=device, foreach=opt.foreach,
                         fused=opt.fused)


class DirtuneTrainer(AtomicCheckpoints, Trainer):
    """Adds `penalty()` (a DirectionPenalty, already multiplied by lambda_dir) to the task loss and
    logs the task loss, the penalty and any drift metrics separately. Checkpoints are written
    atomically (faults.AtomicCheckpoints)."""

    def __init__(self, *args, dirtune_cfg: Config, penalty=None, metrics_log=None, extra_logs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dirtune_cfg = dirtune_cfg
        self.penalty = penalty
        self.metrics_log = metrics_log
        self.extra_logs = extra_logs if extra_logs is not None else {}
        self.last_loss: torch.Tensor | None = None
        self._pen_sum = 0.0
        self._pen_steps = 0
        self._pen_step_seen = -1

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(model if model is not None else self.model, self.dirtune_cfg)
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
