"""DirectionPenalty on tiny LLaMA models: full fine-tuning and PEFT LoRA."""

from __future__ import annotations

import pytest
import torch

from dirtune.method.penalty import direction_penalty
from dirtune.models.direction import DEFAULT_TARGETS, DirectionPenalty

N_LAYERS = 2


@pytest.fixture
def llama(tiny_llama):
    """`llama()`: a fresh tiny LLaMA (vocabulary 128, 64 positions), seeded with 0."""
    return lambda: tiny_llama(vocab_size=128, num_hidden_layers=N_LAYERS, max_position_embeddings=64)


@pytest.fixture
def tiny_lora(llama):
    """`tiny_lora(targets=(q_proj, v_proj, down_proj), **LoraConfig fields)`: `llama()` with LoRA (r 4)."""
    peft = pytest.importorskip("peft")

    def build(targets=("q_proj", "v_proj", "down_proj"), **kwargs):
        config = peft.LoraConfig(target_modules=list(targets), r=4, lora_alpha=8, **kwargs)
        return peft.get_peft_model(llama(), config)

    return build


@torch.no_grad()
def perturb(params, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


# --- full fine-tuning ---------------------------------------------------------------------------


def test_full_finds_targets_zero_at_init_and_grows(llama):
    model = llama()
    pen = DirectionPenalty(model, weight=3.0, reference_dtype=None)
    assert pen.mode == "full"
    assert len(pen.names) == 7 * N_LAYERS
    assert {n.rsplit(".", 1)[-1] for n in pen.names} == set(DEFAULT_TARGETS)
    assert pen().item() == 0.0
    weights = [model.get_submodule(n).weight for n in pen.names]
    perturb(weights)
    value = pen()
    assert value.item() > 0
    value.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)
    # λ·R with R the plain mean over the covered tensors
    refs = [r.float() for r in pen._refs()]
    expected = 3.0 * direction_penalty([w.detach() for w in weights], refs, "row")
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_full_reference_bytes_and_state_dict(llama):
    model = llama()
    keys = set(model.state_dict())
    pen = DirectionPenalty(model, weight=1.0)            # bf16 references by default
    numel = sum(model.get_submodule(n).weight.numel() for n in pen.names)
    assert pen.reference_bytes == 2 * numel
    assert all(r.dtype == torch.bfloat16 for r in pen._refs())
    assert pen.state_dict() == {} and list(pen.parameters()) == []
    model.add_module("direction_penalty", pen)           # even attached, refs are not weights
    assert set(model.state_dict()) == keys
    # a rounded bf16 reference leaves a tiny floor at init, nothing more
    assert 0 <= pen().item() < 1e-5
    fp32 = DirectionPenalty(llama(), weight=1.0, reference_dtype="fp32")
    assert fp32.reference_bytes == 4 * numel


def test_full_cpu_reference_device_and_granularity(llama):
    model = llama()
    pen = DirectionPenalty(model, weight=1.0, granularity="tensor", reference_device="cpu",
                           reference_dtype=None)
    assert all(r.device.type == "cpu" for r in pen._refs())
    assert pen.granularity == "tensor" and pen().item() == 0.0
    perturb(model.get_submodule(n).weight for n in pen.names)
    pen().backward()
    assert model.get_submodule(pen.names[0]).weight.grad is not None


def test_frozen_modules_skipped_and_subset_targets(llama):
    model = llama()
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    pen = DirectionPenalty(model, weight=1.0, targets=["q_proj", "k_proj"])
    assert pen.names == ["model.layers.0.self_attn.q_proj"]
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen and not LoRA"):
        DirectionPenalty(model, weight=1.0)


def test_errors_name_the_bad_value(llama):
    model = llama()
    with pytest.raises(ValueError, match=r"no module is named \['qproj', 'mlp_in'\].*q_proj"):
        DirectionPenalty(model, 1.0, targets=["qproj", "v_proj", "mlp_in"])
    with pytest.raises(ValueError, match="granularity='col'"):
        DirectionPenalty(model, 1.0, granularity="col")
    with pytest.raises(ValueError, match="weight=-1.0"):
        DirectionPenalty(model, -1.0)
    with pytest.raises(ValueError, match="reference_dtype='int8'"):
        DirectionPenalty(model, 1.0, reference_dtype="int8")


def test_angles_full(llama):
    model = llama()
    pen = DirectionPenalty(model, weight=1.0, reference_dtype=None)
    angles = pen.angles()
    assert set(angles) == set(DEFAULT_TARGETS)
    assert all(v == {"angle_deg": 0.0, "drift": 0.0} for v in angles.values())
    perturb(model.get_submodule(n).weight for n in pen.names if n.endswith("q_proj"))
    angles = pen.angles()
    assert angles["q_proj"]["angle_deg"] > 0.1 and angles["q_proj"]["drift"] > 0.01
    assert angles["k_proj"]["angle_deg"] == 0.0


# --- LoRA ---------------------------------------------------------------------------------------


def lora_layers(model, pen):
    return [model.get_submodule(n) for n in pen.names]


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_lora_zero_at_init_then_equals_merged_dense(granularity, tiny_lora):
    model = tiny_lora()
    pen = DirectionPenalty(model, weight=2.0, granularity=granularity)
    assert pen.mode == "lora" and pen.reference_bytes == 0
    assert len(pen.names) == 3 * N_LAYERS
    assert pen().item() == 0.0
    layers = lora_layers(model, pen)
    perturb([m.lora_B["default"].weight for m in layers], scale=0.3)
    value = pen()
    assert value.item() > 0
    merged = [m.base_layer.weight + m.scaling["default"] * m.lora_B["default"].weight
              @ m.lora_A["default"].weight for m in layers]
    dense = 2.0 * direction_penalty([w.detach() for w in merged],
                                    [m.base_layer.weight for m in layers], granularity)
    assert value.item() == pytest.approx(dense.item(), rel=1e-4)
    value.backward()
    assert all(m.lora_A["default"].weight.grad.abs().sum() > 0 for m in layers)
    assert all(m.base_layer.weight.grad is None for m in layers)


def test_lora_base_norms_read_once_and_again_after_the_base_changes(monkeypatch, tiny_lora):
    from dirtune.models import direction

    calls = []
    real = direction.base_row_norms
    monkeypatch.setattr(direction, "base_row_norms", lambda w: calls.append(w) or real(w))
    model = tiny_lora()
    pen = DirectionPenalty(model, weight=1.0)
    layers = lora_layers(model, pen)
    perturb([m.lora_B["default"].weight for m in layers], scale=0.3)
    first = pen().item()
    assert len(calls) == len(layers)
    assert pen().item() == first and len(calls) == len(layers)   # frozen bases: not read again
    perturb([layers[0].base_layer.weight], scale=0.3)             # e.g. a merge rewrote one base
    changed = pen().item()
    assert len(calls) == len(layers) + 1 and changed != first
    fresh = DirectionPenalty(model, weight=1.0)
    assert changed == pytest.approx(fresh().item(), rel=1e-6)


def test_lora_angles_and_skips_frozen_targets(tiny_lora):
    model = tiny_lora()
    pen = DirectionPenalty(model, weight=1.0)           # default: all seven names, 3 have LoRA
    angles = pen.angles()
    assert set(angles) == {"q_proj", "v_proj", "down_proj"}
    assert all(v["angle_deg"] == 0.0 and v["drift"] == 0.0 for v in angles.values())
    perturb([m.lora_B["default"].weight for m in lora_layers(model, pen)], scale=0.3)
    angles = pen.angles()
    assert all(v["angle_deg"] > 0.01 and v["drift"] > 0 for v in angles.values())


def test_lora_dora_refused(tiny_lora):
    model = tiny_lora(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        DirectionPenalty(model, weight=1.0)


def test_lora_two_active_adapters_and_mixed_mode(tiny_lora):
    peft = pytest.importorskip("peft")
    model = tiny_lora(targets=("q_proj",))
    model.add_adapter("second", peft.LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=6))
    model.base_model.set_adapter(["default", "second"])
    k_proj = model.get_submodule("base_model.model.model.layers.1.self_attn.k_proj")
    k_proj.weight.requires_grad_(True)                   # one trainable non-LoRA target
    pen = DirectionPenalty(model, weight=1.0, targets=["q_proj", "k_proj"], reference_dtype=None)
    assert pen.mode == "mixed" and len(pen.names) == N_LAYERS + 1
    layers = [model.get_submodule(n) for n in pen.names if n.endswith("q_proj")]
    adapters = ["default", "second"]
    perturb([m.lora_B[a].weight for m in layers for a in adapters], scale=0.3)
    perturb([k_proj.weight], scale=0.1)
    merged = [m.base_layer.weight + sum(m.scaling[a] * m.lora_B[a].weight @ m.lora_A[a].weight
                                        for a in adapters) for m in layers]
    dense = direction_penalty([w.detach() for w in merged] + [k_proj.weight.detach()],
                              [m.base_layer.weight for m in layers] + pen._refs())
    assert pen().item() == pytest.approx(dense.item(), rel=1e-4)
