"""Full training steps (forward, backward, optimizer step) of random-weight LLaMA-2 models:
AdamW against the method, time per step and peak accelerator memory.

LoRA (r=16 on every linear projection): AdamW; BalancedAdamW alone (anchor "zero", as the
trainer uses for A/B); the coupled method (factored penalty in the loss + BalancedAdamW).
The decoupled turn is not offered with LoRA (config.validate refuses it), so it is not timed.
Full fine-tuning: AdamW; coupled (penalty with bf16 references + BalancedAdamW anchored at the
pretrained weights); decoupled (BalancedAdamW with the row turn on the projections), fused and
foreach.
"""

from __future__ import annotations

import warnings

import torch
from perf_measure import LORA_TARGETS, free, timed

from dirtune.method.balanced_adamw import BalancedAdamW
from dirtune.models.direction import DirectionPenalty

LR, WD, LAMBDA_DIR = 2e-4, 0.01, 1.0   # values do not change the work done per step


def build_llama(spec: dict, device: torch.device, seq: int, dtype=torch.bfloat16):
    """LlamaForCausalLM with random weights, made directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["inter"],
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["heads"], vocab_size=spec["vocab"],
                      max_position_embeddings=max(seq, 64), use_cache=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def _checkpointing(model) -> None:
    with warnings.catch_warnings():  # renamed in transformers 5.2x; the old name still works
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_groups(model) -> list[dict]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim == 2], "weight_decay": WD},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def full_groups(model, turn: float = 0.0) -> list[dict]:
    """As the trainer: projections (decay + turn), other matrices (decay), 1-D (neither)."""
    proj, other, vec = [], [], []
    for name, p in model.named_parameters():
        if p.ndim < 2:
            vec.append(p)
        elif name.split(".")[-2] in LORA_TARGETS:
            proj.append(p)
        else:
            other.append(p)
    return [{"params": proj, "weight_decay": WD, "direction_weight": turn},
            {"params": other, "weight_decay": WD, "direction_weight": 0.0},
            {"params": vec, "weight_decay": 0.0, "direction_weight": 0.0}]


def _plain(groups):
    return [{k: v for k, v in g.items() if k != "direction_weight"} for g in groups]


def lora_variants(cuda: bool):
    path = dict(fused=True) if cuda else {}
    return [
        ("adamw (torch, fused)", lambda m: (torch.optim.AdamW(lora_groups(m), lr=LR, fused=True), None)),
        ("balanced zero/scale", lambda m: (BalancedAdamW(lora_groups(m), lr=LR, anchor="zero", **path), None)),
        ("method coupled (penalty + balanced)",
         lambda m: (BalancedAdamW(lora_groups(m), lr=LR, anchor="zero", **path),
                    DirectionPenalty(m, LAMBDA_DIR))),
    ]


def full_variants(cuda: bool):
    path = dict(fused=True) if cuda else {}
    return [
        ("adamw (torch, fused)",
         lambda m: (torch.optim.AdamW(_plain(full_groups(m)), lr=LR, fused=True), None)),
        ("method coupled (penalty + balanced init/scale)",
         lambda m: (BalancedAdamW(full_groups(m), lr=LR, **path), DirectionPenalty(m, LAMBDA_DIR))),
        ("method decoupled (balanced + row turn)",
         lambda m: (BalancedAdamW(full_groups(m, LAMBDA_DIR), lr=LR, **path), None)),
        ("method decoupled, foreach path",
         lambda m: (BalancedAdamW(full_groups(m, LAMBDA_DIR), lr=LR, foreach=True), None)),
    ]


def training_step(spec: dict, device: torch.device, *, lora: bool, seq: int, checkpointing: bool,
                  warmup: int, reps: int) -> list[dict]:
    """ms per step (median) and peak memory of each variant on one model, batch 1 × seq."""
    model = build_llama(spec, device, seq)
    if checkpointing:
        _checkpointing(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = torch.randint(0, spec["vocab"], (1, seq), device=device)
    # Untimed forward/backward passes first: otherwise the first variant (AdamW, the baseline of
    # every ratio) pays for the GEMM heuristics and the allocator's growth (session 2 saw AdamW's
    # 7B LoRA step at 462 ms in one run and 393 ms in the next).
    for _ in range(warmup):
        model(input_ids=tokens, labels=tokens).loss.backward()
        model.zero_grad(set_to_none=True)
    out = []
    variants = lora_variants(device.type == "cuda") if lora else full_variants(device.type == "cuda")
    for name, factory in variants:
        row = {"variant": name, "params": total, "trainable": trainable, "seq": seq,
               "checkpointing": checkpointing}
        opt = pen = None
        try:
            opt, pen = factory(model)

            def step():
                loss = model(input_ids=tokens, labels=tokens).loss
                if pen is not None:
                    loss = loss + pen()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row["ms"] = timed(step, device, warmup, reps)
            if device.type == "cuda":
                row["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        model.zero_grad(set_to_none=True)
        del opt, pen
        free()
        out.append(row)
        print(f"    {name:48s} {row.get('ms', float('nan')):9.1f} ms  {row.get('error', '')}", flush=True)
    base = out[0].get("ms")
    for row in out:
        if base and "ms" in row:
            row["overhead_vs_adamw"] = row["ms"] / base - 1
    del model, tokens
    free()
    return out
