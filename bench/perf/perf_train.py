"""Full training steps (forward, backward, optimizer step) of random-weight LLaMA-2 models, the
variants interleaved: every round runs each variant for `reps` timed steps (after `warmup`
untimed ones), the order alternating between rounds, so a machine whose speed drifts moves
every variant alike. Reported per variant: the median of all timed steps, the per-round
medians, and the ratio to AdamW's median *of the same round* (median and range over rounds).

LoRA (r=16 on every projection of LLaMA-2-7B, checkpointing): AdamW; BalancedAdamW alone
(anchor "zero", as the trainer uses for A/B); the coupled method (factored penalty in the loss +
BalancedAdamW) on the Triton path, lazily every 4 steps (weight 4λ), and on the plain-torch
reference path (the code before issue 12, for comparison).
Full fine-tuning (~1B): AdamW; BalancedAdamW alone (anchor "init", balance "scale": the coupled
method's optimizer, so coupled − balanced is the penalty's share and balanced − AdamW the
optimizer's); coupled (row kernels, gradient added into .grad); decoupled (BalancedAdamW with the
row turn folded into the step). The code before issue 12 (reference penalty, turn as a second
pass) is in the 1B set only with `before=True` (measured in results/2026-12-01-h200-issue12).

With `split=True` each round also times `reps` steps with the host ahead (perf_measure.host_ahead):
the device's own time per step and the host's, so a step whose pace the host sets (Python and
launches, not the GPU) shows as host ms ≈ ms/step and device ms < ms/step. `profile=True` runs
one step per variant under torch.profiler afterwards: GPU kernel time by kind (GEMM, attention,
penalty kernels, optimizer, copies, other), the kernel count, and host syncs: what each variant
adds to AdamW's step, counted rather than inferred.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
from perf_measure import LORA_TARGETS, free, host_ahead, timings

from dirtune.method import fused as fused_mod
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


def lora_variants(model, cuda: bool, before: bool = True):
    """(name, optimizer, penalty or None, every, fold) per variant."""
    path = dict(fused=True) if cuda else {}
    adam = dict(fused=True) if cuda else {}
    return [
        ("adamw (torch, fused)", torch.optim.AdamW(lora_groups(model), lr=LR, **adam), None, 1, True),
        ("balanced zero/scale", BalancedAdamW(lora_groups(model), lr=LR, anchor="zero", **path), None, 1, True),
        ("coupled (penalty + balanced)", BalancedAdamW(lora_groups(model), lr=LR, anchor="zero", **path),
         DirectionPenalty(model, LAMBDA_DIR, fused=None), 1, True),
        ("coupled, lazy every 4", BalancedAdamW(lora_groups(model), lr=LR, anchor="zero", **path),
         DirectionPenalty(model, LAMBDA_DIR, fused=None), 4, True),
    ] + ([("coupled, reference penalty (before)", BalancedAdamW(lora_groups(model), lr=LR, anchor="zero", **path),
           DirectionPenalty(model, LAMBDA_DIR, fused=False), 1, True)] if before else [])


def full_variants(model, cuda: bool, before: bool = False):
    path = dict(fused=True) if cuda else {}
    adam = dict(fused=True) if cuda else {}
    out = [
        ("adamw (torch, fused)", torch.optim.AdamW(_plain(full_groups(model)), lr=LR, **adam), None, 1, True),
        ("balanced init/scale alone", BalancedAdamW(full_groups(model), lr=LR, **path), None, 1, True),
        ("coupled (penalty + balanced init/scale)", BalancedAdamW(full_groups(model), lr=LR, **path),
         DirectionPenalty(model, LAMBDA_DIR, fused=None), 1, True),
        ("decoupled (balanced + row turn, folded)", BalancedAdamW(full_groups(model, LAMBDA_DIR), lr=LR, **path),
         None, 1, True),
    ]
    if before:
        out += [
            ("coupled, reference penalty (before)", BalancedAdamW(full_groups(model), lr=LR, **path),
             DirectionPenalty(model, LAMBDA_DIR, fused=False), 1, True),
            ("decoupled, turn as a second pass (before)",
             BalancedAdamW(full_groups(model, LAMBDA_DIR), lr=LR, **path), None, 1, False),
        ]
    return out


def interleaved(steps: list[tuple[str, object]], device: torch.device, *, rounds: int, warmup: int,
                reps: int, deadline: float | None = None, min_rounds: int = 3,
                split: dict | None = None) -> dict[str, list[list[float]]]:
    """{name: [per round: the timed ms]}: every round runs every variant (order alternating);
    rounds beyond `min_rounds` are skipped once `deadline` (time.time()) has passed.
    `split` (a dict): after the back-to-back steps, `reps` more with the host ahead, their
    device and host ms stored as split["device"][name], split["host"][name] (per round), and
    split["lead"][name] the lead each round used."""
    times: dict[str, list[list[float]]] = {name: [] for name, _ in steps}
    if split is not None:
        for key in ("device", "host", "lead"):
            split[key] = {name: [] for name, _ in steps}
    for r in range(rounds):
        if r >= min_rounds and deadline is not None and time.time() > deadline:
            break
        for name, fn in (steps if r % 2 == 0 else steps[::-1]):
            for _ in range(warmup):
                fn()
            got = timings(fn, device, reps)
            times[name].append(got)
            if split is not None:
                # the host must finish enqueuing a step before the lead runs out: 1.5× the host
                # time of the last step (+ 5 ms), from a step whose device time was just measured
                t0 = time.perf_counter()
                fn()
                lead = 1.5e3 * (time.perf_counter() - t0) + 5.0
                pairs = [host_ahead(fn, device, lead) for _ in range(reps)]
                split["device"][name].append([d for d, _ in pairs])
                split["host"][name].append([h for _, h in pairs])
                split["lead"][name].append(lead)
    return times


def summarise(times: dict[str, list[list[float]]], baseline: str, split: dict | None = None) -> list[dict]:
    """Rows: ms (median of all timed steps), round medians, and the per-round ratio to baseline;
    with `split`, the same for the device's own time (device_*) and the host's (host_ms)."""
    base = [statistics.median(t) for t in times.get(baseline, [])]
    rows = []
    for name, per_round in times.items():
        meds = [statistics.median(t) for t in per_round]
        row = {"variant": name, "rounds": len(per_round), "steps": sum(len(t) for t in per_round),
               "ms": statistics.median([x for t in per_round for x in t]) if per_round else None,
               "round_ms": meds}
        if base and len(base) == len(meds):
            ratios = [m / b for m, b in zip(meds, base)]
            row.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                       overhead_vs_adamw=statistics.median(ratios) - 1)
        if split and split["device"].get(name):
            dev = split["device"][name]
            dmeds = [statistics.median(t) for t in dev]
            dbase = [statistics.median(t) for t in split["device"].get(baseline, [])]
            row.update(device_ms=statistics.median([x for t in dev for x in t]), device_round_ms=dmeds,
                       host_ms=statistics.median([x for t in split["host"][name] for x in t]),
                       host_blocked=sum(h >= lead for hs, lead in zip(split["host"][name], split["lead"][name])
                                        for h in hs))
            if dbase and len(dbase) == len(dmeds):
                dr = [m / b for m, b in zip(dmeds, dbase)]
                row.update(device_ratio=statistics.median(dr), device_ratio_min=min(dr), device_ratio_max=max(dr))
        rows.append(row)
    return rows


def training_step(spec: dict, device: torch.device, *, lora: bool, seq: int, checkpointing: bool,
                  warmup: int, reps: int, rounds: int = 3, deadline: float | None = None,
                  min_rounds: int = 3, split: bool = True, profile: bool = False,
                  before: bool = False) -> list[dict]:
    """Interleaved ms per step of each variant on one model, batch 1 × seq (see the module
    docstring for split, profile and before)."""
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
    cuda = device.type == "cuda"
    variants = lora_variants(model, cuda, before) if lora else full_variants(model, cuda, before)

    def make(opt, pen, every, fold):
        count = [0]

        def step():
            fused_mod.FOLD_TURN = fold
            loss = model(input_ids=tokens, labels=tokens).loss
            if pen is not None and count[0] % every == 0:   # lazy: weight every·λ on those steps
                value = pen()
                loss = loss + (value * every if every > 1 else value)
            count[0] += 1
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            fused_mod.FOLD_TURN = True
        return step

    steps = [(name, make(opt, pen, every, fold)) for name, opt, pen, every, fold in variants]
    sp: dict | None = {} if split else None
    try:
        times = interleaved(steps, device, rounds=rounds, warmup=warmup, reps=reps, deadline=deadline,
                            min_rounds=min_rounds, split=sp)
        profiles = profile_steps(steps, device) if profile else {}
    finally:
        fused_mod.FOLD_TURN = True
    out = summarise(times, steps[0][0], sp)
    for row in out:
        row.update(params=total, trainable=trainable, seq=seq, checkpointing=checkpointing)
        if row["variant"] in profiles:
            row["profile"] = profiles[row["variant"]]
        spread = f"[{row.get('ratio_min', 0) - 1:+.1%}, {row.get('ratio_max', 0) - 1:+.1%}]" if "ratio" in row else ""
        dev = (f"  device {row['device_ms']:8.1f} ms {row.get('device_ratio', 1) - 1:+.1%} "
               f"[{row.get('device_ratio_min', 1) - 1:+.1%}, {row.get('device_ratio_max', 1) - 1:+.1%}]"
               f"  host {row['host_ms']:7.1f} ms" if "device_ms" in row else "")
        print(f"    {row['variant']:44s} {row['ms']:9.1f} ms  {row.get('overhead_vs_adamw', 0):+.1%} {spread}{dev}",
              flush=True)
    model.zero_grad(set_to_none=True)
    del model, tokens, variants, steps
    free()
    return out


KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("penalty", ("_row_sums", "_row_grad", "_lora_proj")),
    ("optimizer", ("_step_kernel", "_step_turn", "_dot_kernel", "_row_turn", "_sums_kernel", "_axpby",
                   "fused_adam", "FusedAdam", "multi_tensor", "adam")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "splitK")),
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn")),
    ("copy/memset", ("Memcpy", "Memset", "memcpy", "memset")),
)


def _kind(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def profile_steps(steps: list[tuple[str, object]], device: torch.device) -> dict[str, dict]:
    """One step per variant (after one untimed) under torch.profiler: GPU kernel ms by kind, the
    number of kernels, the top kernels by time, and the host syncs the step made."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for name, fn in steps:
        try:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            kinds: dict[str, float] = {}
            per_kernel: dict[str, list] = {}
            syncs = launches = 0
            for e in prof.events():
                dev = str(getattr(e, "device_type", "")).endswith("CUDA")
                if dev:
                    us = e.time_range.elapsed_us()
                    k = _kind(e.name)
                    kinds[k] = kinds.get(k, 0.0) + us / 1e3
                    acc = per_kernel.setdefault(e.name[:90], [0, 0.0])
                    acc[0] += 1
                    acc[1] += us / 1e3
                elif "Synchronize" in e.name:
                    syncs += 1
                elif "LaunchKernel" in e.name or e.name.startswith("cuLaunch"):
                    launches += 1
            top = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:10]
            # less the synchronize that closes the profiled step (ours, not the step's)
            syncs -= device.type == "cuda" and syncs > 0
            out[name] = {"kernel_ms": sum(kinds.values()), "by_kind_ms": kinds,
                         "kernels": sum(c for c, _ in per_kernel.values()), "launch_calls": launches,
                         "host_syncs": syncs, "top": [[k, c, ms] for k, (c, ms) in top],
                         "by_kernel": {k: [c, ms] for k, (c, ms) in per_kernel.items()}}
        except Exception as e:  # the profiler is a diagnostic: its failure keeps the timings
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"    profile {name:36s} " + (f"{out[name]['kernel_ms']:8.1f} ms in {out[name]['kernels']} kernels, "
              f"{out[name]['host_syncs']} syncs" if "error" not in out[name] else out[name]["error"]), flush=True)
    return out
