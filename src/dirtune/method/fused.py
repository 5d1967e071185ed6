"""The fused CUDA path of BalancedAdamW: `_fused_balanced_adamw`, same signature and the same
update as `update_rules._multi_tensor_balanced_adamw` (the reference, and the CPU path).

Per group of tensors sharing device and dtypes, one step is at most four launches, whatever
the number of tensors (kernels in dirtune.method.fused_kernels):

    balance "selective"   _dot_kernel      c_i = <g_i, θ_i − a_i> per tensor, then k_i on the device
    always                _step_kernel     θ ← lerp(θ, a, k_i) (or (1 − k_i)·θ); m, v; θ ← θ − η·m̂/(√v̂ + ε)
    λ_dir > 0, "row"      _step_turn_kernel  the step, then θ_r ← α_r·θ_r + β_r·θ0_r, in one pass
                          over the rows of each turned 2-D weight, one launch per weight shape
                          (FOLD_TURN; else _step_kernel, then _row_turn_kernel as a second pass)
    λ_dir > 0, "tensor"   _sums_kernel + _axpby_kernel

Per-tensor scalars (k_i, −η/(1 − β1^t), sqrt(1 − β2^t)) are computed on the host in float64
exactly as the reference computes them (decay_coefficients for balance none/scale), packed into
one table and uploaded once; "selective" keeps k_i on the device, so no step syncs the host.

Bytes per element, bf16 θ/g/a, moments in dtype M (2 or 4 bytes):
    step            read θ, g, m, v, a: 6 + 2M,  write θ, m, v: 2 + 2M   (24 for fp32 M, 16 for bf16)
    + selective     read θ, g, a again: + 6
    + turn "row"    folded: θ0 read in the step's pass, the just-written rows re-read from L2 and
                    written again: + 2 at most (the two-pass path: read θ, θ0, write θ, + 6)
    + turn "tensor" read θ, θ0 twice, write θ: + 10
torch.optim.AdamW(fused=True) moves 6 + 4M (22 with fp32 moments, 14 with bf16); anchor "zero"
or "none" drops the anchor's 2.

Numerics: arithmetic in fp32 (fp64 for fp64 tensors) with IEEE division and square root. For
fp32/fp64 tensors the result equals the reference to round-off (FMA contraction, reduction
order). For bf16/fp16 tensors each stored value is rounded once, as in torch's fused AdamW,
where the reference rounds after every op; the two differ by a few units in the last place
of the storage dtype per step. Moments may be wider than the parameter (e.g. fp32 moments
for bf16 weights): the kernel reads and writes each tensor in its own dtype.

Tensors that are not contiguous, or whose state is laid out differently from the parameter,
are handed to the reference path (same math, more launches). Anchors and references kept on
the CPU are uploaded in batches of UPLOAD_BATCH elements, so the copies stay small.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict

import torch
from torch import Tensor

from dirtune.method.common import GRANULARITIES, accumulation_dtype, check_choice, turn_from_sums
from dirtune.method.update_rules import _multi_tensor_balanced_adamw, decay_coefficients

try:
    import triton
    import triton.language as tl

    from dirtune.method import fused_kernels as K
    _MISSING = None
except ImportError as e:  # CI and CPU-only installs have no Triton
    K = None
    _MISSING = e

CHUNK = 16384       # elements per program of the chunked kernels
BLOCK = 1024        # elements per loop iteration (8 per thread with 4 warps: 16-byte bf16 loads)
NUM_WARPS = 4
ROW_TILE = 2048     # elements per iteration of the row-turn kernel (ROWS × COLS)
UPLOAD_BATCH = 1 << 28  # elements of CPU-held anchors uploaded at a time (512 MiB in bf16)
FOLD_TURN = True    # the row turn inside the step of each turned weight (_step_turn_kernel)

_CHUNK_CACHE: OrderedDict = OrderedDict()


def available() -> bool:
    """True when Triton is importable (the kernels then run on CUDA tensors)."""
    return K is not None


def interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before import),
    which executes them on CPU tensors; used by the tests."""
    return K is not None and type(K._step_kernel).__name__ == "InterpretedFunction"


def _check(params: list[Tensor], granularity: str) -> None:
    if K is None:
        raise ValueError(f"fused=True needs Triton, which cannot be imported here ({_MISSING}); "
                         "install triton, or use fused=None / foreach=True") from None
    check_choice("granularity", granularity, GRANULARITIES)
    if not interpreted():
        bad = sorted({str(p.device) for p in params if p.device.type != "cuda"})
        if bad:
            raise ValueError(f"fused=True needs every parameter on a CUDA device, got {bad}; "
                             "use fused=None (foreach or per-tensor loop) for these")


def _tl(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.float64: tl.float64}[dtype]


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host table on `device`; pinned first so the copy does not wait for the stream."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _chunks(numels: list[int], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(tensor index int32, start element int64) of every chunk, and the most chunks of one
    tensor (slots of the per-chunk partial sums). Cached: the shapes rarely change."""
    key = (device, CHUNK, tuple(numels))
    if key in _CHUNK_CACHE:
        _CHUNK_CACHE.move_to_end(key)
        return _CHUNK_CACHE[key]
    counts = torch.tensor([-(-n // CHUNK) for n in numels], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(numels)), counts)     # (chunks,)
    first = torch.cumsum(counts, 0) - counts                               # first chunk of each tensor
    start = (torch.arange(len(owner)) - first[owner]) * CHUNK              # (chunks,)
    entry = (_to_device(owner.to(torch.int32), device), _to_device(start, device),
             max(1, int(counts.max())) if len(numels) else 1)
    _CHUNK_CACHE[key] = entry
    if len(_CHUNK_CACHE) > 64:
        _CHUNK_CACHE.popitem(last=False)
    return entry


def _table(rows: list[list[int]], device: torch.device) -> Tensor:
    """int64 rows (addresses, numels) as one (len(rows), n) device tensor: one upload."""
    return _to_device(torch.tensor(rows, dtype=torch.int64), device)


def _aligned(*lists: list[Tensor]) -> bool:
    return all(t.data_ptr() % 16 == 0 for ts in lists for t in ts)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _fast(p: Tensor, g: Tensor, m: Tensor, v: Tensor, a: Tensor | None, r: Tensor | None) -> bool:
    """The flat kernels need every tensor of a parameter contiguous and of the same size.
    (A plain loop: this runs for every parameter at every step, on the host's critical path.)"""
    if not p.is_contiguous() or p.dtype not in _KERNEL_DTYPES:
        return False
    shape = p.shape
    for t in (g, m, v, a, r):
        if t is not None and not (t.is_contiguous() and t.shape == shape and t.dtype in _KERNEL_DTYPES):
            return False
    return True


def _fused_balanced_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    anchors: list[Tensor | None],
    references: list[Tensor | None],
    scales: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    anchor: str,
    balance: str,
    direction_weight: float,
    granularity: str,
    reduce=None,
) -> None:
    """One step; `reduce` (local shards of sharded tensors) completes per-tensor sums across
    shards, which the kernels do not do: steps that need such sums take the reference path."""
    if not params:
        return
    _check(params, granularity)
    decay = weight_decay != 0 and anchor != "none"
    turn = direction_weight != 0
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps, anchors, references, scales)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, anchor=anchor,
                 balance=balance, direction_weight=direction_weight, granularity=granularity)
    if reduce is not None and ((decay and balance == "selective") or (turn and granularity == "tensor")):
        _multi_tensor_balanced_adamw(*lists, **hyper, reduce=reduce)
        return
    fast, slow = [], []
    for i, p in enumerate(params):
        a = anchors[i] if decay else None
        r = references[i] if turn and p.ndim == 2 else None
        ok = _fast(p, grads[i], exp_avgs[i], exp_avg_sqs[i], a, r)
        (fast if ok else slow).append(i)
    if slow:
        _multi_tensor_balanced_adamw(*([x[i] for i in slow] for x in lists), **hyper)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in fast:
        a = anchors[i] if decay else None
        groups[(params[i].device, params[i].dtype, grads[i].dtype, exp_avgs[i].dtype,
                exp_avg_sqs[i].dtype, None if a is None else a.dtype)].append(i)
    for idx in groups.values():
        for batch in _batches(idx, params, anchors, references):
            _group_step(*([x[i] for i in batch] for x in lists), **hyper)


def _batches(idx: list[int], params, anchors, references) -> list[list[int]]:
    """All of idx at once, or runs of at most UPLOAD_BATCH elements when anchors or references
    live off the parameters' device (each run's uploads are freed before the next)."""
    away = any(t is not None and t.device != params[i].device
               for i in idx for t in (anchors[i], references[i]))
    if not away:
        return [idx]
    out, run, size = [], [], 0
    for i in idx:
        if run and size + params[i].numel() > UPLOAD_BATCH:
            out.append(run)
            run, size = [], 0
        run.append(i)
        size += params[i].numel()
    return out + [run]


def _group_step(ps, gs, ms, vs, steps, anchors, references, scales, *, lr, beta1, beta2, eps,
                weight_decay, anchor, balance, direction_weight, granularity) -> None:
    """One step for tensors of one device and one dtype combination (see the module docstring).

    Long on purpose: one optimizer step of one tensor group: coefficient table, then the launches, in the order the module docstring lists them.
    """
    device, n = ps[0].device, len(ps)
    acc = accumulation_dtype(ps[0].dtype)
    decay = weight_decay != 0 and anchor != "none"
    has_anchor = decay and anchor == "init"
    uploaded: dict[int, Tensor] = {}  # id(original) → on-device copy, shared by anchor and reference

    def here(t: Tensor | None) -> Tensor | None:
        if t is None or t.device == device:
            return t
        if id(t) not in uploaded:
            uploaded[id(t)] = t.to(device, non_blocking=True)
        return uploaded[id(t)]

    ancs = [here(a) for a in anchors] if has_anchor else [None] * n
    torch._foreach_add_(steps, 1.0)
    chunk_t, chunk_s, slots = _chunks([p.numel() for p in ps], device)
    n_chunks = len(chunk_t)
    a_list = ancs if has_anchor else ps
    meta = _table([[t.data_ptr() for t in ts] for ts in (ps, gs, ms, vs, a_list)]
                  + [[p.numel() for p in ps]], device)
    aligned = _aligned(ps, gs, ms, vs, a_list)
    tys = dict(P_TY=_tl(ps[0].dtype), ACC=_tl(acc), ALIGNED=aligned, CHUNK=CHUNK, BLOCK=BLOCK)
    a_ty = _tl(a_list[0].dtype)

    # per-tensor coefficients: rows k, 1 − k, −η/(1 − β1^t), sqrt(1 − β2^t); then the hyper row
    k_dev = None
    if not decay:
        k = [0.0] * n
    elif balance == "selective":
        k = [0.0] * n
        partial = torch.zeros(n * slots, dtype=acc, device=device)
        if n_chunks:
            K._dot_kernel[(n_chunks,)](chunk_t, chunk_s, meta[5], meta[0], meta[1], meta[4], partial,
                                       slots, G_TY=_tl(gs[0].dtype), A_TY=a_ty,
                                       HAS_ANCHOR=has_anchor, num_warps=NUM_WARPS, **tys)
        dots = partial.view(n, slots).sum(1, dtype=torch.float64)
        # decay_coefficients' rule: decay only where <g, θ − a> > 0, by min(1, η·λ)
        k_dev = (dots > 0).to(torch.float64) * min(1.0, lr * weight_decay)
    else:
        k = decay_coefficients(ps, gs, ancs, scales, lr=lr, weight_decay=weight_decay,
                               balance=balance).tolist()
    kappa = min(1.0, lr * direction_weight)
    rows = [[k[i], 1 - k[i], -(lr / (1 - beta1 ** s.item())), (1 - beta2 ** s.item()) ** 0.5]
            for i, s in enumerate(steps)]
    rows += [[1 - beta1, beta2, 1 - beta2, eps], [kappa, 0.0, 0.0, 0.0]]
    coef = _to_device(torch.tensor(rows, dtype=torch.float64).to(acc), device)
    if k_dev is not None:
        coef[:n, 0] = k_dev.to(acc)
        coef[:n, 1] = (1 - k_dev).to(acc)

    step_kw = dict(G_TY=_tl(gs[0].dtype), M_TY=_tl(ms[0].dtype), V_TY=_tl(vs[0].dtype), A_TY=a_ty,
                   F64=acc == torch.float64, DECAY=decay, HAS_ANCHOR=has_anchor, num_warps=NUM_WARPS)
    # the row turn folded into the step of the 2-D weights it turns (one pass instead of two)
    folded = ([i for i, p in enumerate(ps) if p.ndim == 2 and p.numel() > 0 and references[i] is not None]
              if FOLD_TURN and direction_weight != 0 and granularity == "row" else [])
    if not folded:
        if n_chunks:
            K._step_kernel[(n_chunks,)](chunk_t, chunk_s, meta[5], meta[0], meta[1], meta[2], meta[3],
                                        meta[4], coef, coef[n], **step_kw, **tys)
    else:
        rest = [i for i in range(n) if i not in set(folded)]
        if rest:
            ct, cs, _ = _chunks([ps[i].numel() for i in rest], device)
            sub = _table([[ts[i].data_ptr() for i in rest] for ts in (ps, gs, ms, vs, a_list)]
                         + [[ps[i].numel() for i in rest]], device)
            if len(ct):
                K._step_kernel[(len(ct),)](ct, cs, sub[5], sub[0], sub[1], sub[2], sub[3], sub[4],
                                           coef[_to_device(torch.tensor(rest), device)].contiguous(),
                                           coef[n], **step_kw, **tys)
        refs = {i: here(references[i]) for i in folded}
        _step_turn(folded, ps, gs, ms, vs, a_list, refs, coef, n, acc, step_kw, aligned)
        return

    if direction_weight != 0:
        two_d = [i for i, p in enumerate(ps) if p.ndim == 2 and p.numel() > 0]
        refs = {i: here(references[i]) for i in two_d}
        if granularity == "row":
            _row_turn(ps, refs, coef[n + 1], acc)
        else:
            _tensor_turn(ps, refs, kappa, acc)


def _step_turn(idx, ps, gs, ms, vs, a_list, refs, coef, n, acc, step_kw, aligned) -> None:
    """Step and row turn of the 2-D weights idx, one launch per (shape, reference dtype)."""
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i in idx:
        by_shape[(tuple(ps[i].shape), refs[i].dtype)].append(i)
    device = ps[0].device
    for (shape, r_dtype), sel in by_shape.items():
        rows, cols = shape
        tables = _table([[ts[i].data_ptr() for i in sel] for ts in (ps, gs, ms, vs, a_list)]
                        + [[refs[i].data_ptr() for i in sel], sel], device)
        block_cols = min(BLOCK, triton.next_power_of_2(cols))
        block_rows = min(max(1, ROW_TILE // block_cols), triton.next_power_of_2(rows))
        K._step_turn_kernel[(triton.cdiv(rows, block_rows), len(sel))](
            *tables[:6], tables[6], coef, coef[n], coef[n + 1], rows, cols, P_TY=_tl(ps[0].dtype),
            R_TY=_tl(r_dtype), ACC=_tl(acc), ALIGNED=aligned and _aligned([refs[i] for i in sel]),
            ROWS=block_rows, COLS=block_cols, **step_kw)


def _row_turn(ps: list[Tensor], refs: dict[int, Tensor], kappa: Tensor, acc: torch.dtype) -> None:
    """θ_r ← α_r·θ_r + β_r·θ0_r for every row, one launch per (shape, reference dtype)."""
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, r in refs.items():
        by_shape[(tuple(ps[i].shape), r.dtype)].append(i)
    for (shape, r_dtype), idx in by_shape.items():
        rows, cols = shape
        p_list, r_list = [ps[i] for i in idx], [refs[i] for i in idx]
        meta = _table([[t.data_ptr() for t in p_list], [t.data_ptr() for t in r_list]], ps[0].device)
        block_cols = min(BLOCK, triton.next_power_of_2(cols))
        block_rows = min(max(1, ROW_TILE // block_cols), triton.next_power_of_2(rows))
        grid = (triton.cdiv(rows, block_rows), len(idx))
        K._row_turn_kernel[grid](meta[0], meta[1], rows, kappa, cols=cols, P_TY=_tl(ps[0].dtype),
                                 R_TY=_tl(r_dtype), ACC=_tl(acc), F64=acc == torch.float64,
                                 ALIGNED=_aligned(p_list, r_list), ROWS=block_rows,
                                 COLS=block_cols, num_warps=NUM_WARPS)


def _tensor_turn(ps: list[Tensor], refs: dict[int, Tensor], kappa: float, acc: torch.dtype) -> None:
    """θ ← α·θ + β·θ0 per tensor, (α, β) from whole-tensor sums (turn_coefficients' formula)."""
    by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, r in refs.items():
        by_dtype[r.dtype].append(i)
    for r_dtype, idx in by_dtype.items():
        device = ps[0].device
        p_list, r_list = [ps[i] for i in idx], [refs[i] for i in idx]
        chunk_t, chunk_s, slots = _chunks([p.numel() for p in p_list], device)
        meta = _table([[t.data_ptr() for t in p_list], [t.data_ptr() for t in r_list],
                       [p.numel() for p in p_list]], device)
        tys = dict(P_TY=_tl(ps[0].dtype), R_TY=_tl(r_dtype), ACC=_tl(acc),
                   ALIGNED=_aligned(p_list, r_list), CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS)
        partial = torch.zeros(len(idx) * slots * 3, dtype=acc, device=device)
        K._sums_kernel[(len(chunk_t),)](chunk_t, chunk_s, meta[2], meta[0], meta[1], partial,
                                        slots, **tys)
        pp, pr, rr = partial.view(len(idx), slots, 3).sum(1, dtype=torch.float64).unbind(1)
        alpha, beta = turn_from_sums(pp.sqrt(), rr.sqrt(), pr, kappa)
        coef = torch.stack([alpha, beta], 1).to(acc).contiguous()
        K._axpby_kernel[(len(chunk_t),)](chunk_t, chunk_s, meta[2], meta[0], meta[1], coef, **tys)


__all__ = ["_fused_balanced_adamw", "available", "interpreted"]
