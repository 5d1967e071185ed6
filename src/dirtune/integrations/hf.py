"""The method in a transformers `Trainer` or any subclass of it (TRL's `SFTTrainer`, axolotl's and
LLaMA-Factory's trainers), through the trainer's own extension points:

- the optimizer: `create_optimizer` (what `Trainer` documents for a custom optimizer) builds
  BalancedAdamW with dirtune's parameter groups (`train.compose.build_method`: LoRA A/B
  anchored at zero, full fine-tuning anchored at the pretrained weights, the decoupled turn on
  the covered projections only); the trainer's own learning-rate schedule drives it;
- the coupled penalty: `compute_loss` (TRL asks users to subclass it rather than pass a loss
  function) returns the trainer's loss + `λ_dir·R`, scaled for gradient accumulation the way
  `Trainer` scales that loss, so each optimizer step sees exactly `λ_dir·∇R`;
- `log` adds `direction_penalty` (the mean `λ_dir·R` since the last log); `loss` stays what the
  trainer minimises (task loss + penalty).

`attach(trainer, ...)` puts these three on an existing trainer by giving it a subclass of its own
class, so whatever the trainer does in its own `compute_loss` (TRL's token accuracy, aux losses)
still runs. The options are dirtune's config keys (method.* and optimizer.*, without the section),
validated by the same code as a YAML config; lr, betas, eps and weight_decay default to the
trainer's `TrainingArguments`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dirtune.models.direction import DirectionPenalty
from dirtune.train.config import Config, ConfigError, MethodConfig, OptimizerConfig, from_dict
from dirtune.train.compose import OptimizerPlan, build_method
from dirtune.train.schedule import StrengthSchedule
from dirtune.train.trainer import build_optimizer

METHOD_KEYS = tuple(f.name for f in dataclasses.fields(MethodConfig))
OPTIMIZER_KEYS = tuple(f.name for f in dataclasses.fields(OptimizerConfig) if f.name != "name")
OPTIMIZERS = ("balanced_adamw", "adamw", None)


def finetune_type(model: torch.nn.Module) -> str:
    """'lora' when the trainable matrices are PEFT LoRA adapters, 'full' otherwise."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("dirtune.integrations: the model has no trainable parameters")
    lora = {n for n, _ in trainable if ".lora_A." in n or ".lora_B." in n}
    if not lora:
        return "full"
    others = [n for n, p in trainable if p.ndim >= 2 and n not in lora]
    if others:
        # dirtune's LoRA groups anchor every matrix at zero (B·A = 0 is the pretrained model);
        # a fully trained lm_head or embedding would be pulled toward zero too
        raise ConfigError(
            f"dirtune.integrations: the model trains LoRA adapters and also {len(others)} full "
            f"matrices (e.g. {others[0]}: PEFT modules_to_save or trainable tokens), which the "
            "LoRA optimizer groups would decay toward zero; freeze them, or fine-tune fully")
    return "lora"


def method_config(model: torch.nn.Module, args: Any = None, *, optimizer: str | None = "balanced_adamw",
                  **options: Any) -> Config:
    """dirtune's Config for this model: `options` are method.* and optimizer.* keys (e.g.
    penalty="coupled", direction_weight=1e3, anchor="init"); lr, betas, eps and weight_decay not
    given are read from `args` (a TrainingArguments) when there is one."""
    unknown = sorted(set(options) - set(METHOD_KEYS) - set(OPTIMIZER_KEYS))
    if unknown:
        raise ConfigError(f"dirtune.integrations: unknown option(s) {unknown}; accepted: optimizer, "
                          f"{', '.join(METHOD_KEYS + OPTIMIZER_KEYS)}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"dirtune.integrations: optimizer={optimizer!r} is not valid; expected "
                          "'balanced_adamw', 'adamw' (torch AdamW) or None (keep the trainer's own)")
    opt = {k: v for k, v in options.items() if k in OPTIMIZER_KEYS}
    if args is not None:
        opt.setdefault("lr", args.learning_rate)
        opt.setdefault("betas", [args.adam_beta1, args.adam_beta2])
        opt.setdefault("eps", args.adam_epsilon)
        opt.setdefault("weight_decay", args.weight_decay)
    data = {
        "finetune": {"type": finetune_type(model)},
        "method": {k: v for k, v in options.items() if k in METHOD_KEYS},
        # None keeps the trainer's optimizer; "adamw" lets validation refuse the decoupled turn
        "optimizer": {"name": optimizer or "adamw", **opt},
        "train": {"drift_every": 0},   # no weight-0 penalty just to measure drift
    }
    return from_dict(data, source="dirtune.integrations")


def make_optimizer(model: torch.nn.Module, args: Any = None, *, optimizer: str = "balanced_adamw",
                   **options: Any) -> torch.optim.Optimizer:
    """BalancedAdamW (or torch AdamW) over dirtune's parameter groups of `model`, for
    `Trainer(optimizers=(make_optimizer(model, args, ...), None))`. The decoupled turn and the
    anchored decay live in the optimizer; the coupled penalty needs `attach`."""
    if optimizer is None:
        raise ConfigError("dirtune.integrations.make_optimizer: optimizer=None builds nothing; "
                          "expected 'balanced_adamw' or 'adamw'")
    cfg = method_config(model, args, optimizer=optimizer, **options)
    if cfg.method.penalty == "coupled":
        raise ConfigError("dirtune.integrations.make_optimizer: penalty='coupled' goes into the loss, "
                          "which an optimizer cannot do; use attach(trainer, penalty='coupled', ...)")
    return build_optimizer(model, cfg)


@dataclasses.dataclass
class _Attached:
    cfg: Config
    penalty: DirectionPenalty | None
    optimizer: OptimizerPlan | None    # None: the trainer builds its own
    pen_sum: Any = 0.0          # λ·R summed over the optimizer steps since the last log
    pen_steps: int = 0
    pen_step_seen: int = -1
    logs: dict = dataclasses.field(default_factory=dict)   # StrengthSchedule writes "strength"


def _loss_is_scaled_for_ga(trainer, num_items_in_batch) -> bool:
    """Does `training_step` leave this loss undivided by the accumulation steps? (The rule of
    transformers 5: the loss is then already a share of the accumulated batch.)"""
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:
        return bool(explicit)
    return bool((trainer.model_accepts_loss_kwargs and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


class MethodTrainerMixin:
    """What `attach` adds to a Trainer subclass; reads its settings from `self._dirtune`."""

    _dirtune: _Attached

    def create_optimizer(self, model=None):
        d = self._dirtune
        if self.optimizer is None and d.optimizer is not None:
            self.optimizer = d.optimizer.build(self.model if model is None else model)
        # the base class returns ours as it is, after any wrapping of its own (SageMaker MP)
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        d = self._dirtune
        if d.penalty is None or not model.training:
            return out
        loss, outputs = out if return_outputs else (out, None)
        pen = d.penalty()
        # A loss already normalised over the accumulated batch is a share of it: give the penalty
        # the same share, so the micro-batches of one step add up to λ·∇R once.
        share = (pen / self.current_gradient_accumulation_steps
                 if _loss_is_scaled_for_ga(self, num_items_in_batch) else pen)
        loss = loss + share.to(loss.dtype)
        if d.pen_step_seen != self.state.global_step:   # R is the same for every micro-batch
            d.pen_step_seen = self.state.global_step
            d.pen_sum = d.pen_sum + pen.detach()        # on the device: no sync before backward
            d.pen_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        d = self._dirtune
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            if d.pen_steps:
                logs["direction_penalty"] = float(d.pen_sum) / d.pen_steps
                d.pen_sum, d.pen_steps = 0.0, 0
            logs.update(d.logs)
            d.logs.clear()
        return super().log(logs, *args, **kwargs)


_CLASSES: dict[type, type] = {}


def _with_method(cls: type) -> type:
    if issubclass(cls, MethodTrainerMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"{cls.__name__}WithDirtune", (MethodTrainerMixin, cls),
                             {"__module__": __name__, "__doc__": cls.__doc__})
    return _CLASSES[cls]


def attach(trainer, *, optimizer: str | None = "balanced_adamw", **options: Any) -> DirectionPenalty | None:
    """Put the method on `trainer` (a transformers Trainer or subclass, before `train()`).

    optimizer: "balanced_adamw" (default), "adamw" (torch AdamW, dirtune's groups), or None to
        keep the optimizer the trainer would make (then only the coupled penalty is added).
    options: method.* and optimizer.* keys of dirtune's config, e.g. penalty="coupled" or
        "decoupled", direction_weight=λ_dir, anchor="init", balance="scale", schedule="decay".
    Returns the coupled penalty (its `angles()` gives angle and drift per module type), or None.
    """
    if isinstance(trainer, MethodTrainerMixin):
        raise ConfigError("dirtune.integrations.attach: this trainer already has the method attached")
    cfg = method_config(trainer.model, trainer.args, optimizer=optimizer, **options)
    if optimizer is not None and (trainer.optimizer is not None
                                  or getattr(trainer, "optimizer_cls_and_kwargs", None) is not None):
        raise ConfigError("dirtune.integrations.attach: the trainer was given its own optimizer "
                          "(optimizers= or optimizer_cls_and_kwargs=); drop it, or pass optimizer=None "
                          "to keep it and add only the coupled penalty")
    # The trainer has placed the model on its device by now: references are copied beside it.
    method = build_method(trainer.model, cfg)
    penalty = method.penalty
    state = _Attached(cfg, penalty, method.optimizer if optimizer is not None else None)
    trainer._dirtune = state
    trainer.__class__ = _with_method(type(trainer))
    if cfg.method.schedule != "constant":
        trainer.add_callback(StrengthSchedule(cfg.method.schedule, penalty, sink=state.logs,
                                              decay=optimizer == "balanced_adamw"))
    return penalty
