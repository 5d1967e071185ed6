"""Optimizer parameter groups: which trainable tensors decay, which get the decoupled turn, and
LoRA+'s larger learning rate for B. One function per fine-tuning type, named by parameter name
and shape alone (no peft import). Each group has a 'name' key (logged, and checked by tests).
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from dirtune.models.errors import ModelError


def lora_param_groups(model: nn.Module, lr: float, weight_decay: float,
                      loraplus_ratio: Optional[float] = None) -> list[dict]:
    """Optimizer parameter groups for a LoRA model; LoRA+ gives B the learning rate lr * ratio.

    Groups (empty ones left out), each with a 'name' key:
      lora_A    every A matrix                        lr,          weight_decay
      lora_B    every B matrix                        lr * ratio,  weight_decay   (ratio 1 if None)
      no_decay  DoRA magnitudes and other 1-D tensors lr,          0  (a decayed gain shrinks the weight)
      other     any other trainable tensor            lr,          weight_decay
    """
    ratio = 1.0 if loraplus_ratio is None else float(loraplus_ratio)
    if ratio <= 0:
        raise ModelError(f"finetune.loraplus_ratio: {loraplus_ratio!r} is not valid; expected a number > 0")
    buckets: dict[str, list] = {"lora_A": [], "lora_B": [], "no_decay": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A." in name or ".lora_embedding_A." in name:
            buckets["lora_A"].append(p)
        elif ".lora_B." in name or ".lora_embedding_B." in name:
            buckets["lora_B"].append(p)
        elif "lora_magnitude_vector" in name or p.ndim < 2:
            buckets["no_decay"].append(p)
        else:
            buckets["other"].append(p)
    settings = {"lora_A": (lr, weight_decay), "lora_B": (lr * ratio, weight_decay),
                "no_decay": (lr, 0.0), "other": (lr, weight_decay)}
    return [{"name": k, "params": ps, "lr": settings[k][0], "weight_decay": settings[k][1]}
            for k, ps in buckets.items() if ps]


def _covered(name: str, targets: Sequence[str]) -> bool:
    """Is parameter `name` the weight of a module the method covers (q_proj, …)?"""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and (
        parts[-2] in targets or (parts[-2] == "base_layer" and len(parts) >= 3 and parts[-3] in targets))


def full_param_groups(model: nn.Module, weight_decay: float, direction_weight: float,
                      targets: Sequence[str]) -> list[dict]:
    """Optimizer parameter groups for full fine-tuning, in the order their first tensor appears
    (empty ones left out), each with a 'name' key:
      projections     weights of the covered modules (`targets`)  weight_decay, direction_weight
      other_matrices  any other tensor of 2 or more dimensions    weight_decay, no turn
      no_decay        1-D tensors (norm gains, biases)            no decay (a decayed gain shrinks the weight), no turn
    """
    groups: dict[str, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            key, decay, turn = "no_decay", 0.0, 0.0
        elif _covered(n, targets):
            key, decay, turn = "projections", weight_decay, direction_weight
        else:
            key, decay, turn = "other_matrices", weight_decay, 0.0
        groups.setdefault(key, {"params": [], "name": key, "weight_decay": decay,
                                "direction_weight": turn})["params"].append(p)
    return list(groups.values())
