"""Triton kernels of the fused BalancedAdamW step (host side: dirtune.method.fused).

Every kernel works on a flat list of tensors of one dtype combination, passed as tables:
`*_addr` holds one int64 address per tensor (cast to a pointer of the constexpr element type
`*_TY`), `numels` their sizes; a program handles one chunk of CHUNK elements of one tensor
(`chunk_tensor`, `chunk_start`), so one launch covers all tensors, large and small.
Arithmetic is in ACC (fp32, or fp64 for fp64 tensors), in the order of the reference path
(update_rules._multi_tensor_balanced_adamw), with IEEE division and square root.

    _step_kernel      decay toward the anchor, moments, bias corrections, Adam step
                      (reads θ, g, m, v[, a]; writes θ, m, v)
    _dot_kernel       partial sums of <g, θ − a> per chunk (balance "selective", before the step)
    _row_turn_kernel  θ ← α_r·θ + β_r·θ0 per output row (direction turn, granularity "row")
    _sums_kernel      partial sums of ||θ||², <θ, θ0>, ||θ0||² per chunk (turn, "tensor")
    _axpby_kernel     θ ← α_t·θ + β_t·θ0 per tensor (turn, "tensor")

A chunk wholly inside its tensor takes an unmasked path so loads vectorise (ALIGNED says every
address is a multiple of 16 bytes); a tensor's last chunk takes the masked path. Loop bounds are
constexprs, not loaded sizes: the tail's extra iterations are fully masked (and Triton's
interpreter, which the CPU tests use, cannot loop to a loaded bound).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ptr(addr_table, t, TY: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to tensor t of a table of int64 addresses."""
    ptr = tl.load(addr_table + t).to(tl.pointer_type(TY))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _div(x, y, F64: tl.constexpr):
    if F64:
        r = x / y
    else:
        r = tl.div_rn(x, y)
    return r


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    if F64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _turn_coefficients(pp, pr, r2, k, ROWS: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr):
    """The row turn's (alpha, beta) from a row's sums p·p, p·r, r·r and the turn's strength k:
    alpha = 1 - k·cos, beta = k·|p|/|r| (0 where a norm is 0), as (ROWS, 1) columns."""
    norm = _sqrt(pp, F64)
    norm0 = _sqrt(r2, F64)
    one = tl.full([ROWS], 1.0, ACC)
    inv_norm = tl.where(norm > 0, _div(one, tl.where(norm > 0, norm, one), F64), 0.0)
    inv_norm0 = tl.where(norm0 > 0, _div(one, tl.where(norm0 > 0, norm0, one), F64), 0.0)
    cos = pr * inv_norm * inv_norm0
    return (1.0 - k * cos)[:, None], (k * norm * inv_norm0)[:, None]


@triton.jit
def _lerp(x, y, w):
    """torch.lerp's formula: exact at w = 0 and at w = 1."""
    diff = y - x
    return tl.where(w < 0.5, x + w * diff, y - diff * (1.0 - w))


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, a_ptr, offs, mask,
                k, one_minus_k, neg_step_size, sqrt_bc2, one_minus_beta1, beta2, one_minus_beta2, eps,
                ACC: tl.constexpr, F64: tl.constexpr, DECAY: tl.constexpr, HAS_ANCHOR: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask).to(ACC)
    m = tl.load(m_ptr + offs, mask=mask).to(ACC)
    v = tl.load(v_ptr + offs, mask=mask).to(ACC)
    if DECAY:
        if HAS_ANCHOR:  # θ ← lerp(θ, a, k); the reference rounds a to θ's dtype first
            a = tl.load(a_ptr + offs, mask=mask).to(p_ptr.dtype.element_ty).to(ACC)
            p = _lerp(p, a, k)
        else:           # anchor "zero": θ ← (1 − k)·θ
            p = p * one_minus_k
    m = _lerp(m, g, one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = _div(_sqrt(v, F64), sqrt_bc2, F64) + eps
    p = p + neg_step_size * _div(m, denom, F64)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_kernel(chunk_tensor, chunk_start, numels, p_addr, g_addr, m_addr, v_addr, a_addr,
                 coef, hyper,
                 P_TY: tl.constexpr, G_TY: tl.constexpr, M_TY: tl.constexpr, V_TY: tl.constexpr,
                 A_TY: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr, DECAY: tl.constexpr,
                 HAS_ANCHOR: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    """coef (n, 4): k, 1 − k, −η/(1 − β1^t), sqrt(1 − β2^t) per tensor; hyper: 1 − β1, β2, 1 − β2, ε."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    p_ptr = _ptr(p_addr, t, P_TY, ALIGNED)
    g_ptr = _ptr(g_addr, t, G_TY, ALIGNED)
    m_ptr = _ptr(m_addr, t, M_TY, ALIGNED)
    v_ptr = _ptr(v_addr, t, V_TY, ALIGNED)
    a_ptr = p_ptr
    if HAS_ANCHOR:
        a_ptr = _ptr(a_addr, t, A_TY, ALIGNED)
    k = tl.load(coef + 4 * t)
    one_minus_k = tl.load(coef + 4 * t + 1)
    neg_step_size = tl.load(coef + 4 * t + 2)
    sqrt_bc2 = tl.load(coef + 4 * t + 3)
    one_minus_beta1 = tl.load(hyper)
    beta2 = tl.load(hyper + 1)
    one_minus_beta2 = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    lanes = tl.arange(0, BLOCK)
    if start + CHUNK <= n:
        for i in range(0, CHUNK, BLOCK):
            offs = tl.max_contiguous(tl.multiple_of(start + i + lanes, BLOCK), BLOCK)
            _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, a_ptr, offs, None, k, one_minus_k, neg_step_size,
                        sqrt_bc2, one_minus_beta1, beta2, one_minus_beta2, eps,
                        ACC, F64, DECAY, HAS_ANCHOR)
    else:
        for i in range(0, CHUNK, BLOCK):
            offs = start + i + lanes
            _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, a_ptr, offs, offs < n, k, one_minus_k,
                        neg_step_size, sqrt_bc2, one_minus_beta1, beta2, one_minus_beta2, eps,
                        ACC, F64, DECAY, HAS_ANCHOR)


@triton.jit
def _dot_block(p_ptr, g_ptr, a_ptr, offs, mask, other, ACC: tl.constexpr, HAS_ANCHOR: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=other).to(ACC)
    if HAS_ANCHOR:  # θ ≈ a: form the difference first, <g, θ> − <g, a> would cancel
        p = p - tl.load(a_ptr + offs, mask=mask, other=other).to(ACC)
    return g * p


@triton.jit
def _dot_kernel(chunk_tensor, chunk_start, numels, p_addr, g_addr, a_addr, out, slots,
                P_TY: tl.constexpr, G_TY: tl.constexpr, A_TY: tl.constexpr, ACC: tl.constexpr,
                HAS_ANCHOR: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr):
    """out[t·slots + j] = Σ over chunk j of tensor t of g·(θ − a) (a = 0 without an anchor)."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    p_ptr = _ptr(p_addr, t, P_TY, ALIGNED)
    g_ptr = _ptr(g_addr, t, G_TY, ALIGNED)
    a_ptr = p_ptr
    if HAS_ANCHOR:
        a_ptr = _ptr(a_addr, t, A_TY, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC)
    if start + CHUNK <= n:
        for i in range(0, CHUNK, BLOCK):
            offs = tl.max_contiguous(tl.multiple_of(start + i + lanes, BLOCK), BLOCK)
            acc += _dot_block(p_ptr, g_ptr, a_ptr, offs, None, None, ACC, HAS_ANCHOR)
    else:
        for i in range(0, CHUNK, BLOCK):
            offs = start + i + lanes
            acc += _dot_block(p_ptr, g_ptr, a_ptr, offs, offs < n, 0.0, ACC, HAS_ANCHOR)
    tl.store(out + t * slots + start // CHUNK, tl.sum(acc, axis=0))


@triton.jit
def _row_turn_kernel(p_addr, r_addr, rows, kappa,
                     P_TY: tl.constexpr, R_TY: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr,
                     ALIGNED: tl.constexpr, cols: tl.constexpr, ROWS: tl.constexpr,
                     COLS: tl.constexpr):
    """Rows [ROWS·pid0, ROWS·pid0 + ROWS) of tensor pid1 (all tensors of one shape rows × cols):
    α = 1 − κ·c, β = κ·||θ_r||/||θ0_r|| from this row's sums, then θ_r ← α·θ_r + β·θ0_r.
    `cols` is a constexpr (a compile per row length, a handful per model) so the loops have
    static bounds."""
    t = tl.program_id(1)
    p_ptr = _ptr(p_addr, t, P_TY, ALIGNED)
    r_ptr = _ptr(r_addr, t, R_TY, ALIGNED)
    rr = tl.program_id(0) * ROWS + tl.arange(0, ROWS)                 # (ROWS,)
    row_ok = rr < rows
    base = rr.to(tl.int64) * cols                                      # (ROWS,)
    cc = tl.arange(0, COLS)
    pp = tl.zeros([ROWS], dtype=ACC)
    pr = tl.zeros([ROWS], dtype=ACC)
    r2 = tl.zeros([ROWS], dtype=ACC)
    for c0 in range(0, cols, COLS):
        idx = base[:, None] + (c0 + cc)[None, :]                       # (ROWS, COLS)
        mask = row_ok[:, None] & ((c0 + cc) < cols)[None, :]
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
        r = tl.load(r_ptr + idx, mask=mask, other=0.0).to(ACC)
        pp += tl.sum(p * p, axis=1)
        pr += tl.sum(p * r, axis=1)
        r2 += tl.sum(r * r, axis=1)
    alpha, beta = _turn_coefficients(pp, pr, r2, tl.load(kappa), ROWS, ACC, F64)
    for c0 in range(0, cols, COLS):  # second read of the row: mostly from L2
        idx = base[:, None] + (c0 + cc)[None, :]
        mask = row_ok[:, None] & ((c0 + cc) < cols)[None, :]
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
        r = tl.load(r_ptr + idx, mask=mask, other=0.0).to(ACC)
        tl.store(p_ptr + idx, (p * alpha + r * beta).to(P_TY), mask=mask)


@triton.jit
def _sums_kernel(chunk_tensor, chunk_start, numels, p_addr, r_addr, out, slots,
                 P_TY: tl.constexpr, R_TY: tl.constexpr, ACC: tl.constexpr,
                 ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """out[(t·slots + j)·3 + (0, 1, 2)] = Σ θ², Σ θ·θ0, Σ θ0² over chunk j of tensor t."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    p_ptr = _ptr(p_addr, t, P_TY, ALIGNED)
    r_ptr = _ptr(r_addr, t, R_TY, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    pp = tl.zeros([BLOCK], dtype=ACC)
    pr = tl.zeros([BLOCK], dtype=ACC)
    r2 = tl.zeros([BLOCK], dtype=ACC)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + lanes
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
        pp += p * p
        pr += p * r
        r2 += r * r
    slot = (t * slots + start // CHUNK) * 3
    tl.store(out + slot, tl.sum(pp, axis=0))
    tl.store(out + slot + 1, tl.sum(pr, axis=0))
    tl.store(out + slot + 2, tl.sum(r2, axis=0))


@triton.jit
def _axpby_kernel(chunk_tensor, chunk_start, numels, p_addr, r_addr, coef,
                  P_TY: tl.constexpr, R_TY: tl.constexpr, ACC: tl.constexpr,
                  ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """θ ← α_t·θ + β_t·θ0 with coef (n, 2) = (α_t, β_t)."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    p_ptr = _ptr(p_addr, t, P_TY, ALIGNED)
    r_ptr = _ptr(r_addr, t, R_TY, ALIGNED)
    alpha = tl.load(coef + 2 * t)
    beta = tl.load(coef + 2 * t + 1)
    lanes = tl.arange(0, BLOCK)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + lanes
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask).to(ACC)
        r = tl.load(r_ptr + offs, mask=mask).to(ACC)
        tl.store(p_ptr + offs, (p * alpha + r * beta).to(P_TY), mask=mask)


@triton.jit
def _step_turn_kernel(p_addr, g_addr, m_addr, v_addr, a_addr, r_addr, index, coef, hyper, kappa,
                      rows, cols,
                      P_TY: tl.constexpr, G_TY: tl.constexpr, M_TY: tl.constexpr, V_TY: tl.constexpr,
                      A_TY: tl.constexpr, R_TY: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr,
                      DECAY: tl.constexpr, HAS_ANCHOR: tl.constexpr, ALIGNED: tl.constexpr,
                      ROWS: tl.constexpr, COLS: tl.constexpr):
    """The step of _step_kernel and the row turn of _row_turn_kernel in one pass over rows
    [ROWS·pid0, +ROWS) of tensor pid1 (all tensors of one shape): the Adam step is stored
    (rounded to θ's dtype, as in the two-pass path), the turn's row sums are taken from the
    stored values, then each row is re-read (from L2: it was just written) and turned.
    index[t]: the tensor's row of coef (k, 1 − k, −η/(1 − β1^t), sqrt(1 − β2^t))."""
    t = tl.program_id(1)
    p_ptr = _ptr(p_addr, t, P_TY, ALIGNED)
    g_ptr = _ptr(g_addr, t, G_TY, ALIGNED)
    m_ptr = _ptr(m_addr, t, M_TY, ALIGNED)
    v_ptr = _ptr(v_addr, t, V_TY, ALIGNED)
    r_ptr = _ptr(r_addr, t, R_TY, ALIGNED)
    a_ptr = p_ptr
    if HAS_ANCHOR:
        a_ptr = _ptr(a_addr, t, A_TY, ALIGNED)
    ti = tl.load(index + t)
    k = tl.load(coef + 4 * ti)
    one_minus_k = tl.load(coef + 4 * ti + 1)
    neg_step_size = tl.load(coef + 4 * ti + 2)
    sqrt_bc2 = tl.load(coef + 4 * ti + 3)
    one_minus_beta1 = tl.load(hyper)
    beta2 = tl.load(hyper + 1)
    one_minus_beta2 = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    rr = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rr < rows
    base = rr.to(tl.int64) * cols
    cc = tl.arange(0, COLS)
    pp = tl.zeros([ROWS], dtype=ACC)
    pr = tl.zeros([ROWS], dtype=ACC)
    r2 = tl.zeros([ROWS], dtype=ACC)
    for c0 in range(0, cols, COLS):
        idx = base[:, None] + (c0 + cc)[None, :]
        mask = row_ok[:, None] & ((c0 + cc) < cols)[None, :]
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(ACC)
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(ACC)
        if DECAY:
            if HAS_ANCHOR:
                a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(P_TY).to(ACC)
                p = _lerp(p, a, k)
            else:
                p = p * one_minus_k
        m = _lerp(m, g, one_minus_beta1)
        v = v * beta2 + one_minus_beta2 * g * g
        denom = _div(_sqrt(v, F64), sqrt_bc2, F64) + eps
        p = (p + neg_step_size * _div(m, denom, F64)).to(P_TY)
        tl.store(p_ptr + idx, p, mask=mask)
        tl.store(m_ptr + idx, m.to(M_TY), mask=mask)
        tl.store(v_ptr + idx, v.to(V_TY), mask=mask)
        p = p.to(ACC)
        r = tl.load(r_ptr + idx, mask=mask, other=0.0).to(ACC)
        pp += tl.sum(p * p, axis=1)
        pr += tl.sum(p * r, axis=1)
        r2 += tl.sum(r * r, axis=1)
    alpha, beta = _turn_coefficients(pp, pr, r2, tl.load(kappa), ROWS, ACC, F64)
    for c0 in range(0, cols, COLS):
        idx = base[:, None] + (c0 + cc)[None, :]
        mask = row_ok[:, None] & ((c0 + cc) < cols)[None, :]
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
        r = tl.load(r_ptr + idx, mask=mask, other=0.0).to(ACC)
        tl.store(p_ptr + idx, (p * alpha + r * beta).to(P_TY), mask=mask)
