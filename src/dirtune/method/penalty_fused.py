"""The direction penalty at its traffic floor on CUDA: Triton kernels (penalty_kernels) behind
the same math as penalty.py / lora_penalty.py, which stay the reference (and the CPU path).

Dense weights, granularity "row" (`dense_values`): the forward reads θ and θ0 once (one launch
per weight shape) and keeps only per-row scalars; the backward's gradient
`∇_θr = a_r·θ_r − b_r·θ0_r` is one more read of θ and θ0. Where the weights are leaves that this
backward pass accumulates into (`loss.backward()` in one process), the gradient is added to
`.grad` in place at the end of the backward pass (one read and write of g, instead of writing a
gradient that autograd then adds: 12 instead of 16 bytes per bf16 parameter and step).
Otherwise (`torch.autograd.grad`, a process group, non-leaf weights) it is returned to autograd.

LoRA (`lora_projection`): `C = W0·Aᵀ` and `∇A = ∇Cᵀ·W0` as grouped GEMMs over the layers of one
shape, each reading every frozen base once in its own dtype (bf16: on the tensor cores with the
fp32 side split in three bf16 parts; fp32: IEEE dots), no fp32 copy of any base.

Imports torch, and Triton when present (`available()` says whether these paths can run).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict

import torch

from dirtune.method import sharded
from dirtune.method.common import accumulation_dtype

try:
    import triton

    from dirtune.method import penalty_kernels as K
except ImportError:  # CPU-only installs: the reference path runs instead
    K = None

ROW_TILE = 4096     # elements per iteration of the row kernels (ROWS × COLS)
MAX_COLS = 1024
NUM_WARPS = 4
LORA_BM, LORA_BK, LORA_GRAD_BK, LORA_BD = 128, 64, 128, 64
_TYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def available() -> bool:
    return K is not None


def interpreted() -> bool:
    """Kernels in Triton's interpreter (TRITON_INTERPRET=1 before import): they run on CPU tensors."""
    return K is not None and type(K._row_sums_kernel).__name__ == "InterpretedFunction"


def _device_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or interpreted()


def _tl(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.float64: tl.float64}[dtype]


_UPLOADS: OrderedDict = OrderedDict()   # (device, kind, values) → the int64 tensor on the device
_UPLOADS_MAX = 256


def _upload(values: tuple, device: torch.device, kind: str) -> torch.Tensor:
    """A small int64 table on `device`, uploaded once and then reused: the weights, references
    and gradients keep their addresses from step to step, so each step's tables are the last
    step's (the key is the content itself, so a reused entry is always right). A new one is
    uploaded without a host sync (torch.tensor(list, device=cuda) copies from pageable memory,
    which waits for the stream)."""
    key = (device, kind, values)
    hit = _UPLOADS.get(key)
    if hit is not None:
        _UPLOADS.move_to_end(key)
        return hit
    t = torch.tensor(values, dtype=torch.int64)
    t = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
    _UPLOADS[key] = t
    if len(_UPLOADS) > _UPLOADS_MAX:
        _UPLOADS.popitem(last=False)
    return t


def _table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tensors' addresses on `device` (cached: see _upload)."""
    return _upload(tuple(x.data_ptr() for x in tensors), device, "addr")


def _index(idx: list[int], device: torch.device) -> torch.Tensor:
    """An index tensor on `device` (cached, no host sync: see _upload)."""
    return _upload(tuple(idx), device, "index")


_EPS: dict = {}


def _eps(eps: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """ε as a 1-element tensor of the accumulation dtype (a Python float argument would reach the
    kernel as fp32, which is not fp64's ε)."""
    key = (eps, dtype, device)
    if key not in _EPS:
        t = torch.tensor([eps], dtype=dtype)
        _EPS[key] = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
    return _EPS[key]


def _aligned(tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _tiles(rows: int, cols: int) -> tuple[int, int]:
    c = min(MAX_COLS, triton.next_power_of_2(max(cols, 1)))
    return min(max(1, ROW_TILE // c), triton.next_power_of_2(max(rows, 1))), c


# ---------------------------------------------------------------------------------------------
# Dense rows
# ---------------------------------------------------------------------------------------------


def dense_eligible(ws: list, rs: list) -> bool:
    """Whether `dense_values` can take these weights and references (granularity "row")."""
    if K is None or not ws:
        return False
    dev = ws[0].device
    for w, r in zip(ws, rs):
        if sharded.is_dtensor(w) or sharded.is_dtensor(r) or not _device_ok(w):
            return False
        if w.device != dev or r.device != dev or w.numel() == 0 or w.dim() == 0:
            return False
        if not (w.is_contiguous() and r.is_contiguous()) or w.dtype not in _TYPES or r.dtype not in _TYPES:
            return False
    return True


def _rows2(t: torch.Tensor) -> tuple[int, int]:
    return (t.shape[0], t.numel() // t.shape[0]) if t.dim() >= 2 else (1, t.numel())


def _groups(ws: list) -> dict:
    out: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(ws):
        out[_rows2(w)].append(i)
    return out


def _from_sums(s: torch.Tensor, eps: float):
    """(val, m, m0) per row from the kernel's sums (…, 4); see penalty_kernels' docstring. The
    row kernel computes the same in its epilogue (STATS) for the penalty; this is the angles'."""
    spp, srr, sdd, sde = s.unbind(-1)
    n, n0 = spp.sqrt(), srr.sqrt()
    m, m0 = n.clamp_min(eps), n0.clamp_min(eps)
    dm = sde / (n + n0).clamp_min(eps)                         # m − m0, formed without cancellation
    half = 0.5 * (sdd - dm * dm).clamp_min(0) / (m * m0)       # ||θ/m − θ0/m0||²/2
    # a norm at or below ε: the definition 1 − <θ, θ0>/(m·m0) itself (no cancellation there)
    val = torch.where((n > eps) & (n0 > eps), half, 1 - 0.5 * (spp + srr - sdd) / (m * m0))
    return val, m, m0


def _launch_rows(kernel, ws, rs, extra, rows, cols, acc: torch.dtype, **kw):
    dev = ws[0].device
    block_rows, block_cols = _tiles(rows, cols)
    grid = (triton.cdiv(rows, block_rows), len(ws))
    kernel[grid](_table(ws, dev), _table(rs, dev), *extra, rows, cols, P_TY=_tl(ws[0].dtype),
                 R_TY=_tl(rs[0].dtype), ACC=_tl(acc), F64=acc == torch.float64,
                 ALIGNED=_aligned(ws) and _aligned(rs), ROWS=block_rows, COLS=block_cols,
                 num_warps=NUM_WARPS, **kw)


class _DenseRows(torch.autograd.Function):
    """Per tensor `mean_rows(1 − cos(θ_r, θ0_r))` (n,), closed-form gradient (penalty.py)."""

    @staticmethod
    def forward(ctx, into_grad, eps: float, n: int, *tensors):
        ws, rs = tensors[:n], tensors[n:]
        cd = accumulation_dtype(*tensors)
        dev = ws[0].device
        vals = torch.empty(n, dtype=cd, device=dev)
        saved, layout = [], []
        for (rows, cols), idx in _groups(ws).items():
            by_dtype: dict[tuple, list[int]] = defaultdict(list)
            for i in idx:
                by_dtype[(ws[i].dtype, rs[i].dtype)].append(i)
            for sub in by_dtype.values():
                # per row (1 − cos, α, m·m0), computed in the kernel's epilogue
                stats = torch.empty(len(sub), rows, 3, dtype=cd, device=dev)
                _launch_rows(K._row_sums_kernel, [ws[i] for i in sub], [rs[i] for i in sub],
                             [stats, _eps(eps, cd, dev)], rows, cols, cd, STATS=True)
                vals[_index(sub, dev)] = stats[..., 0].mean(1)
                saved.append(stats)
                layout.append(sub)
        ctx.save_for_backward(*tensors, *saved)
        ctx.n, ctx.eps, ctx.layout, ctx.into_grad = n, eps, layout, into_grad
        return vals

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_vals: torch.Tensor):
        n, saved = ctx.n, ctx.saved_tensors
        ws, rs, stats = saved[:n], saved[n:2 * n], saved[2 * n:]
        into = ctx.into_grad is not None and _accumulating(ctx.into_grad)
        grads: list = [None] * n
        pending = []
        for j, sub in enumerate(ctx.layout):
            st = stats[j]
            if not any(ctx.needs_input_grad[3 + i] for i in sub):
                continue
            # ∇ = θ·(c/m²)·k − θ0·k/(m·m0) per row, k = grad_out/R (penalty._DenseDirection);
            # the row factors α = c/m² and m·m0 came from the forward's kernel
            k = grad_vals[_index(sub, grad_vals.device)].to(st.dtype) / st.shape[1]
            coef = (st, k)
            if into:
                pending.append((sub, coef))
                continue
            out = [torch.empty_like(ws[i]) for i in sub]
            _row_grad(out, [ws[i] for i in sub], [rs[i] for i in sub], coef, False)
            for i, g in zip(sub, out):
                grads[i] = g
        if pending:
            leaves = [ws[i] for sub, _ in pending for i in sub]
            refs = [rs[i] for sub, _ in pending for i in sub]
            coefs = [(sub, c) for sub, c in pending]
            # after every other contribution to .grad of this backward pass: one in-place add
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: _add_into_grads(leaves, refs, coefs))
        return (None, None, None, *grads, *([None] * n))


def _accumulating(nodes) -> bool:
    """Whether this backward pass runs the weights' AccumulateGrad nodes (`loss.backward()`)."""
    try:
        return all(torch._C._will_engine_execute_node(node) for node in nodes)
    except RuntimeError:   # torch.autograd.grad(): it refuses leaf nodes, and fills no .grad
        return False


def _row_grad(gs, ws, rs, coef, accumulate: bool) -> None:
    """coef = (stats (n, rows, 3), k (n,)) of these tensors (see _row_grad_kernel)."""
    stats, k = coef
    rows, cols = _rows2(ws[0])
    _launch_rows(K._row_grad_kernel, ws, rs, [_table(gs, ws[0].device), stats, k], rows, cols,
                 stats.dtype, G_TY=_tl(gs[0].dtype), ACCUMULATE=accumulate)


def _pick(coef, sel: list[int]):
    """The (stats, k) rows of the tensors `sel` of a group."""
    stats, k = coef
    where = _index(sel, k.device)
    return stats[where].contiguous(), k[where].contiguous()


def _add_into_grads(leaves, refs, coefs) -> None:
    """`.grad += a·θ − b·θ0` (or `.grad = …` where there is none yet), per group of `coefs`."""
    pos = 0
    for sub, coef in coefs:
        ws, rs = leaves[pos:pos + len(sub)], refs[pos:pos + len(sub)]
        pos += len(sub)
        fresh = [w.grad is None for w in ws]
        for w, f in zip(ws, fresh):
            if f:
                w.grad = torch.empty_like(w)
        # a .grad that is not a plain contiguous tensor of θ's dtype: add a computed gradient
        odd = [i for i, w in enumerate(ws) if not (w.grad.is_contiguous() and w.grad.dtype == w.dtype
                                                   and w.grad.shape == w.shape)]
        for i in odd:
            g = torch.empty_like(ws[i])
            _row_grad([g], [ws[i]], [rs[i]], _pick(coef, [i]), False)
            ws[i].grad.add_(g)
        odd_set = set(odd)
        keep = [i for i in range(len(ws)) if i not in odd_set]
        for want in (True, False):   # fresh .grad is written, existing is accumulated
            sel = [i for i in keep if fresh[i] == want]
            if sel:
                _row_grad([ws[i].grad for i in sel], [ws[i] for i in sel], [rs[i] for i in sel],
                          coef if len(sel) == len(ws) else _pick(coef, sel), not want)


def _accumulate_nodes(ws: list):
    """The AccumulateGrad nodes of the weights when adding into `.grad` at the end of the
    backward pass is exactly what autograd would do; None otherwise."""
    if not hasattr(torch._C, "_will_engine_execute_node") or not torch.is_grad_enabled():
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None  # DDP reduces .grad from hooks during the backward pass: give it the gradient
    if not all(w.is_leaf and w.requires_grad and not w._backward_hooks for w in ws):
        return None
    return [w.view_as(w).grad_fn.next_functions[0][0] for w in ws]


@torch.no_grad()
def dense_angle_drift(ws: list, rs: list, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tensor: angle ∠(θ, θ0) in degrees and `||θ − θ0|| / ||θ0||` (penalty.angle_and_drift),
    from the row kernel's sums added over rows: one read of θ and θ0, one launch per shape."""
    n = len(ws)
    cd = accumulation_dtype(*ws, *rs)
    angle = torch.empty(n, dtype=cd, device=ws[0].device)
    drift = torch.empty_like(angle)
    for (rows, cols), idx in _groups(ws).items():
        for dts in {(ws[i].dtype, rs[i].dtype) for i in idx}:
            sub = [i for i in idx if (ws[i].dtype, rs[i].dtype) == dts]
            sums = torch.empty(len(sub), rows, 4, dtype=cd, device=angle.device)
            _launch_rows(K._row_sums_kernel, [ws[i] for i in sub], [rs[i] for i in sub],
                         [sums, _eps(eps, cd, angle.device)], rows, cols, cd, STATS=False)
            tot = sums.sum(1)
            val, _, m0 = _from_sums(tot, eps)
            where = _index(sub, angle.device)
            angle[where] = torch.rad2deg(2 * torch.asin((val / 2).clamp(0, 1).sqrt()))
            drift[where] = tot[:, 2].sqrt() / m0
    return angle, drift


def dense_values(ws: list, rs: list, eps: float, into_grad: bool = False) -> torch.Tensor:
    """Per tensor `mean_rows(1 − cos)` (n,) of `dense_eligible` weights; `into_grad`: add the
    gradient to the leaves' `.grad` at the end of `loss.backward()` where that is exact."""
    nodes = _accumulate_nodes(ws) if into_grad else None
    return _DenseRows.apply(nodes, eps, len(ws), *ws, *[r.detach() for r in rs])


# ---------------------------------------------------------------------------------------------
# LoRA base projection
# ---------------------------------------------------------------------------------------------


def lora_eligible(bases: list, A: torch.Tensor) -> bool:
    """Whether `lora_projection` can take these frozen bases (one shape) and stacked A (L, r, k)."""
    if K is None or A.dtype != torch.float32 or not _device_ok(A):
        return False
    dt = bases[0].dtype
    return all(w.device == A.device and w.is_contiguous() and w.dtype == dt for w in bases) and dt in (
        torch.bfloat16, torch.float32)


def _split(x: torch.Tensor, parts: int, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32) as `parts` tensors of `dtype` whose fp32 sum is x to fp32's precision (bf16:
    3 parts of 8 significant bits each), stacked on a new first dimension."""
    out, rest = [], x
    for _ in range(parts):
        hi = rest.to(dtype)
        out.append(hi)
        rest = rest - hi.to(x.dtype)
    return torch.stack(out)


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., r) → (..., width) with zero columns, contiguous."""
    if x.shape[-1] == width:
        return x.contiguous()
    out = x.new_zeros(*x.shape[:-1], width)
    out[..., :x.shape[-1]] = x
    return out


def _kind(dtype: torch.dtype):
    """(parts, part dtype, IEEE dots) for a base dtype."""
    return (3, torch.bfloat16, False) if dtype == torch.bfloat16 else (1, torch.float32, True)


class _LoraProjection(torch.autograd.Function):
    """`C[l] = W0_l·A[l]ᵀ` (L, d, r) over frozen bases of one shape, each read once per pass."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, *bases: torch.Tensor):
        L, r, k = A.shape
        d = bases[0].shape[0]
        br = max(16, triton.next_power_of_2(r))
        parts, pdt, ieee = _kind(bases[0].dtype)
        a_parts = _split(_padded(A.transpose(1, 2), br), parts, pdt).contiguous()   # (P, L, k, br)
        out = torch.empty(L, d, br, dtype=torch.float32, device=A.device)
        K._lora_proj_kernel[(triton.cdiv(d, LORA_BM), L)](
            _table(list(bases), A.device), a_parts, out, d, k, L, W_TY=_tl(bases[0].dtype),
            NPARTS=parts, IEEE=ieee, UPCAST=interpreted(), ALIGNED=_aligned(bases), BM=LORA_BM, BK=LORA_BK, BR=br,
            num_warps=NUM_WARPS, num_stages=3)
        ctx.save_for_backward(*bases)
        ctx.r = r
        return out[..., :r]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_C: torch.Tensor):
        bases = ctx.saved_tensors
        L, d, r = grad_C.shape
        k = bases[0].shape[1]
        br = max(16, triton.next_power_of_2(r))
        parts, pdt, ieee = _kind(bases[0].dtype)
        g_parts = _split(_padded(grad_C.float(), br), parts, pdt).contiguous()      # (P, L, d, br)
        out = torch.empty(L, k, br, dtype=torch.float32, device=grad_C.device)
        K._lora_proj_grad_kernel[(triton.cdiv(k, LORA_GRAD_BK), L)](
            _table(list(bases), grad_C.device), g_parts, out, d, k, L, W_TY=_tl(bases[0].dtype),
            NPARTS=parts, IEEE=ieee, UPCAST=interpreted(), ALIGNED=_aligned(bases), BK=LORA_GRAD_BK, BD=LORA_BD, BR=br,
            num_warps=NUM_WARPS, num_stages=3)
        return (out[..., :r].transpose(1, 2), *([None] * len(bases)))


def lora_projection(A: torch.Tensor, bases: list) -> torch.Tensor:
    """`W0_l·A[l]ᵀ` (L, d, r) in fp32, differentiable in A; bases are constants."""
    return _LoraProjection.apply(A, *bases)
