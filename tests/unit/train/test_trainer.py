"""compose.build_method (what the config's method becomes) and the trainer's optimizer."""

from __future__ import annotations

import pytest
import torch

from dirtune.method.balanced_adamw import BalancedAdamW
from dirtune.models.lora import apply_lora
from dirtune.train.compose import build_method, optimizer_plan
from dirtune.train.config import ConfigError, from_dict
from dirtune.train.trainer import build_optimizer


def cfg_of(**sections):
    return from_dict({k: dict(v) for k, v in sections.items()})


def lora(model, **finetune):
    return apply_lora(model, cfg_of(finetune={"type": "lora", "lora_r": 2, **finetune}).finetune)


def full(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.mark.parametrize("penalty, drift_every, dora, has_penalty, has_meter", [
    ("none", 10, False, False, True),     # a weight-0 penalty measures drift
    ("none", 0, False, False, False),     # nothing to measure: nothing built
    ("none", 10, True, False, False),     # DoRA: W is not W0 + s·B·A, no drift metric
    ("coupled", 10, False, True, True),   # the penalty measures too
    ("coupled", 0, False, True, False),
])
def test_build_method_decides_penalty_and_meter(tiny_llama, penalty, drift_every, dora, has_penalty, has_meter):
    cfg = cfg_of(finetune={"type": "lora", "lora_r": 2, "use_dora": dora},
                 method={"penalty": penalty, "direction_weight": 3.0 if penalty != "none" else 0.0},
                 train={"drift_every": drift_every})
    parts = build_method(lora(tiny_llama(), use_dora=dora), cfg)
    assert (parts.penalty is not None) == has_penalty
    assert (parts.meter is not None) == has_meter
    if has_penalty:
        assert parts.penalty.weight == 3.0 and (parts.meter is None or parts.meter is parts.penalty)
    elif has_meter:
        assert parts.meter.weight == 0.0


def test_lora_optimizer_anchors_at_zero_with_loraplus_groups(tiny_llama):
    model = lora(tiny_llama(), loraplus_ratio=4.0)
    cfg = cfg_of(finetune={"type": "lora", "lora_r": 2, "loraplus_ratio": 4.0},
                 optimizer={"name": "balanced_adamw", "lr": 1e-3, "weight_decay": 0.1, "anchor": "init",
                            "anchor_dtype": "fp32"},
                 method={"reference_device": "cpu"})
    plan = optimizer_plan(cfg)
    assert plan.options["anchor"] == "zero" and plan.options["anchor_device"] == "cpu"
    opt = plan.build(model)
    assert isinstance(opt, BalancedAdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"lora_A", "lora_B"}
    assert groups["lora_B"]["lr"] == pytest.approx(4e-3) and groups["lora_A"]["lr"] == pytest.approx(1e-3)
    assert all(g["weight_decay"] == 0.1 and g["direction_weight"] == 0.0 for g in groups.values())
    n_lora = sum(1 for n, p in model.named_parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups.values()) == n_lora


def test_full_groups_turn_only_the_covered_projections(tiny_llama):
    model = full(tiny_llama())
    cfg = cfg_of(finetune={"type": "full"},
                 method={"penalty": "decoupled", "direction_weight": 5.0, "targets": ["q_proj", "v_proj"]},
                 optimizer={"name": "balanced_adamw", "weight_decay": 0.2, "anchor_dtype": "fp32"})
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"projections", "other_matrices", "no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    covered = {names[id(p)].split(".")[-2] for p in groups["projections"]["params"]}
    assert covered == {"q_proj", "v_proj"}
    assert groups["projections"]["direction_weight"] == 5.0
    assert groups["other_matrices"]["direction_weight"] == 0.0 and groups["other_matrices"]["weight_decay"] == 0.2
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"])
    assert opt.param_groups[0]["anchor"] == "init"   # full fine-tuning anchors at the pretrained weights


def test_adamw_gets_the_same_groups_without_the_turn(tiny_llama):
    cfg = cfg_of(finetune={"type": "full"}, optimizer={"name": "adamw", "weight_decay": 0.1, "fused": False})
    opt = build_optimizer(full(tiny_llama()), cfg)
    assert type(opt) is torch.optim.AdamW
    assert {g["name"] for g in opt.param_groups} == {"projections", "other_matrices", "no_decay"}
    assert all("direction_weight" not in g for g in opt.param_groups)
    assert opt.defaults["fused"] is False


def test_no_trainable_parameters_is_a_config_error(tiny_llama):
    model = tiny_llama()
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, cfg_of(finetune={"type": "full"}))
