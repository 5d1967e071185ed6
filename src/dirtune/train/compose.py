"""`build_method(model, cfg)`: the one place where the config's method is decided.

From `method.*`, `optimizer.*` and `finetune.*` it returns, once:

    penalty    the coupled penalty λ_dir·R to add to the loss (method.penalty: coupled), else None
    meter      what measures angle and drift every train.drift_every steps (the penalty itself,
               or a weight-0 DirectionPenalty that only holds the references), else None
    optimizer  an OptimizerPlan: torch AdamW or BalancedAdamW, its options, and the rule that
               splits the model's trainable tensors into groups (models/param_groups.py)

Training code composes these; the method's math lives in dirtune.method (pure torch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dirtune.method.balanced_adamw import BalancedAdamW
from dirtune.models.checks import DTYPES
from dirtune.models.direction import DirectionPenalty
from dirtune.models.param_groups import full_param_groups, lora_param_groups
from dirtune.train.config import Config, ConfigError


@dataclass(frozen=True)
class OptimizerPlan:
    """What the optimizer will be, before the model is final (Trainer builds the optimizer after
    wrapping the model): `build(model)` splits its trainable tensors by `groups` and makes it."""

    name: str                                  # "adamw" (torch) or "balanced_adamw"
    groups: Callable[[torch.nn.Module], list]  # model -> parameter groups
    options: dict                              # the optimizer's keyword arguments

    def build(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = self.groups(model)
        if not groups:
            raise ConfigError("no trainable parameters: check finetune.type and finetune.lora_targets")
        if self.name == "adamw":
            for g in groups:
                g.pop("direction_weight", None)   # torch AdamW refuses unknown group keys
            return torch.optim.AdamW(groups, **self.options)
        return BalancedAdamW(groups, **self.options)


@dataclass
class MethodParts:
    penalty: DirectionPenalty | None
    meter: DirectionPenalty | None
    optimizer: OptimizerPlan


def optimizer_plan(cfg: Config) -> OptimizerPlan:
    """The optimizer of `cfg`: its groups and options."""
    opt, method = cfg.optimizer, cfg.method
    if cfg.finetune.type == "lora":
        groups = functools.partial(lora_param_groups, lr=opt.lr, weight_decay=opt.weight_decay,
                                   loraplus_ratio=cfg.finetune.loraplus_ratio)
    else:
        turn = method.direction_weight if method.penalty == "decoupled" else 0.0
        groups = functools.partial(full_param_groups, weight_decay=opt.weight_decay,
                                   direction_weight=turn, targets=tuple(method.targets))
    options: dict[str, Any] = dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                   weight_decay=opt.weight_decay, foreach=opt.foreach)
    if opt.name == "adamw":
        if opt.fused is not None:   # null: torch's own default
            options["fused"] = opt.fused
        return OptimizerPlan("adamw", groups, options)
    # LoRA's A/B anchor at zero: B·A = 0 is the pretrained model (method.md §2).
    anchor = "zero" if cfg.finetune.type == "lora" and opt.anchor == "init" else opt.anchor
    options.update(anchor=anchor, balance=opt.balance, anchor_dtype=DTYPES[opt.anchor_dtype],
                   granularity=method.granularity, fused=opt.fused,
                   anchor_device="cpu" if method.reference_device == "cpu" else None)
    return OptimizerPlan("balanced_adamw", groups, options)


def _direction_penalty(model: torch.nn.Module, cfg: Config, weight: float) -> DirectionPenalty:
    method = cfg.method
    ref_dtype = None if method.reference_dtype == "same" else DTYPES[method.reference_dtype]
    return DirectionPenalty(model, weight, granularity=method.granularity, targets=tuple(method.targets),
                            reference_dtype=ref_dtype,
                            reference_device="cpu" if method.reference_device == "cpu" else None)


def build_method(model: torch.nn.Module, cfg: Config) -> MethodParts:
    """The penalty (or None), the drift meter (or None) and the optimizer plan of `cfg` for `model`."""
    coupled = cfg.method.penalty == "coupled"
    measured = cfg.train.drift_every > 0
    pen = None
    # DoRA rescales each column by a learned magnitude: W is no longer W0 + s·B·A, so neither
    # the factored penalty nor the drift metric applies (config.validate refuses coupled + DoRA).
    if coupled or (measured and not cfg.finetune.use_dora):
        pen = _direction_penalty(model, cfg, cfg.method.direction_weight if coupled else 0.0)
    return MethodParts(penalty=pen if coupled else None, meter=pen if measured else None,
                       optimizer=optimizer_plan(cfg))
