"""The penalty alone, against its traffic floor: what is left when a training-step goal is missed.

    dense   DirectionPenalty's row kernels over the ~1B model's projections (bf16 weights and
            references): forward (read θ, θ0) + backward adding into .grad (read θ, θ0, g; write
            g) = 12 bytes per parameter; the plain-torch reference beside it
    lora    the factored LoRA penalty over LLaMA-2-7B's frozen bf16 bases, r = 16: forward and
            backward each read every base once = 4 bytes per base parameter; reference beside it

Floor = those bytes at the measured copy bandwidth. Times: CUDA-event medians, three ways
(perf_measure.timed_split): `ms` back to back (host overhead not hidden: the GPU waits for the
host's Python between launches), `gpu_ms` with the host ahead (what the penalty costs inside a
training step whose host runs ahead of the GPU), `host_ms` the host's own time per call.
"""

from __future__ import annotations

import torch
from perf_measure import LORA_TARGETS, free, llama_shapes, timed_split

from dirtune.method.lora_penalty import base_row_norms, lora_direction_penalty
from dirtune.method.penalty import direction_penalty


def _covered(spec: dict) -> list[tuple[int, ...]]:
    return [shape for name, shape in llama_shapes(spec) if name.split(".")[-1] in LORA_TARGETS]


def dense_floor(spec: dict, device: torch.device, copy_GBps=None, warmup=2, reps=8) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    ws = [torch.randn(s, device=device, generator=g, dtype=torch.bfloat16).requires_grad_() for s in _covered(spec)]
    rs = [(w.detach() + 0.01 * torch.randn(w.shape, device=device, generator=g, dtype=torch.bfloat16))
          for w in ws]
    for w in ws:
        w.grad = torch.zeros_like(w)
    n = sum(w.numel() for w in ws)
    out = []
    for name, kw, nbytes in (("dense penalty, row kernels (into .grad)", dict(fused=None, into_grad=True), 12),
                             ("dense penalty, reference", dict(fused=False), None)):
        row = {"what": name, "params": n,
               **timed_split(lambda: direction_penalty(ws, rs, **kw).backward(), device, warmup, reps)}
        if nbytes and copy_GBps:
            row.update(bytes_per_param=nbytes, floor_ms=nbytes * n / copy_GBps / 1e6)
        out.append(row)
        print(f"    {name:44s} {row['ms']:8.2f} ms  gpu {row['gpu_ms']:8.2f}  host {row['host_ms']:8.2f}  "
              f"floor {row.get('floor_ms', float('nan')):.2f}", flush=True)
    del ws, rs
    free()
    return out


def lora_floor(spec: dict, device: torch.device, copy_GBps=None, warmup=2, reps=8, r=16) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(1)
    shapes = _covered(spec)
    bases = [torch.randn(s, device=device, generator=g, dtype=torch.bfloat16) for s in shapes]
    norms = [base_row_norms(w) for w in bases]
    As = [(0.01 * torch.randn(r, s[1], device=device, generator=g)).requires_grad_() for s in shapes]
    Bs = [(0.01 * torch.randn(s[0], r, device=device, generator=g)).requires_grad_() for s in shapes]
    n = sum(w.numel() for w in bases)
    out = []
    for name, fused, nbytes in (("LoRA penalty, grouped GEMMs", None, 4), ("LoRA penalty, reference", False, None)):
        def step():
            lora_direction_penalty(bases, As, Bs, 2.0, base_sq_norms=norms, fused=fused).backward()
            for t in (*As, *Bs):
                t.grad = None
        row = {"what": name, "params": n, **timed_split(step, device, warmup, reps)}
        if nbytes and copy_GBps:
            row.update(bytes_per_param=nbytes, floor_ms=nbytes * n / copy_GBps / 1e6)
        out.append(row)
        print(f"    {name:44s} {row['ms']:8.2f} ms  gpu {row['gpu_ms']:8.2f}  host {row['host_ms']:8.2f}  "
              f"floor {row.get('floor_ms', float('nan')):.2f}", flush=True)
    del bases, As, Bs
    free()
    return out
