"""Triton kernels of the direction penalty's fast path (host side: dirtune.method.penalty_fused).

Dense weights (full fine-tuning), one launch per group of tensors of one shape (address tables,
as in fused_kernels), each program a tile of ROWS rows:

    _row_sums_kernel  per row: Σθ², Σθ0², Σ(θ−θ0)², Σ(θ−θ0)(θ+θ0)   (reads θ, θ0 once), and
                      from them (STATS) the row's 1 − cos and its gradient's two row factors
    _row_grad_kernel  per row: g ← [g +] a_r·θ − b_r·θ0                 (reads θ, θ0[, g]; writes g)

The four sums give `1 − cos` without cancellation: with m = ||θ||, m0 = ||θ0||,
`||θ/m − θ0/m0||² = (||θ − θ0||² − (m − m0)²)/(m·m0)` and `m − m0 = Σ(θ² − θ0²)/(m + m0)`, both
differences formed elementwise first (θ ≈ θ0 is where fine-tuning lives). The remaining
round-off of `1 − cos` is ~ε·||θ − θ0||²/(m·m0) absolute: it vanishes at θ = θ0, and stays far
below the penalty's own size unless a row's norm changed by much more than its direction.

LoRA (frozen base W0 (d×k), A (r×k)), a grouped GEMM over the L layers of one shape that reads
each base once, with fp32 accumulation:

    _lora_proj_kernel       C[l] = W0_l · A[l]ᵀ        (d × r)
    _lora_proj_grad_kernel  ∇A[l]ᵀ = W0_lᵀ · ∇C[l]     (k × r)

A bf16 base is multiplied on the tensor cores with the fp32 side split into NPARTS bf16 parts
(x = x1 + x2 + x3 to fp32's 24 bits): a bf16 × bf16 product is exact in fp32, so the sum is the
fp32 product to accumulation round-off. An fp32 base uses IEEE fp32 dots (no TF32).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dirtune.method.fused_kernels import _div, _ptr, _sqrt


@triton.jit
def _row_sums_kernel(p_addr, r_addr, out, eps_ptr, rows, cols,
                     P_TY: tl.constexpr, R_TY: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr,
                     STATS: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr,
                     COLS: tl.constexpr):
    """Rows [ROWS·pid0, +ROWS) of tensor pid1, from Σθ², Σθ0², Σ(θ−θ0)², Σ(θ−θ0)(θ+θ0):

    STATS=False: out[t, row, :4] = the four sums (angles and drifts add them over rows);
    STATS=True:  out[t, row, :3] = (1 − cos, α, m·m0), what the penalty's value and its row
                 gradient need (α = (1 − cos)/m² where m > ε, else 0), so no per-row torch ops
                 run between the launches. eps_ptr: ε in ACC (exact in fp64)."""
    t = tl.program_id(1)
    p_ptr = _ptr(p_addr, t, P_TY, ALIGNED)
    r_ptr = _ptr(r_addr, t, R_TY, ALIGNED)
    rr = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rr < rows
    base = rr.to(tl.int64) * cols
    cc = tl.arange(0, COLS)
    s_pp = tl.zeros([ROWS], dtype=ACC)
    s_rr = tl.zeros([ROWS], dtype=ACC)
    s_dd = tl.zeros([ROWS], dtype=ACC)
    s_de = tl.zeros([ROWS], dtype=ACC)
    for c0 in range(0, cols, COLS):
        idx = base[:, None] + (c0 + cc)[None, :]
        mask = row_ok[:, None] & ((c0 + cc) < cols)[None, :]
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
        r = tl.load(r_ptr + idx, mask=mask, other=0.0).to(ACC)
        d = p - r
        s_pp += tl.sum(p * p, axis=1)
        s_rr += tl.sum(r * r, axis=1)
        s_dd += tl.sum(d * d, axis=1)
        s_de += tl.sum(d * (p + r), axis=1)
    if STATS:
        # penalty_fused._from_sums, in the same order of operations
        e = tl.load(eps_ptr)
        n = _sqrt(s_pp, F64)
        n0 = _sqrt(s_rr, F64)
        m = tl.maximum(n, e)
        m0 = tl.maximum(n0, e)
        mm0 = m * m0
        dm = _div(s_de, tl.maximum(n + n0, e), F64)              # m − m0 without cancellation
        half = _div(0.5 * tl.maximum(s_dd - dm * dm, 0.0), mm0, F64)
        full = 1.0 - _div(0.5 * (s_pp + s_rr - s_dd), mm0, F64)    # a norm at or below ε
        val = tl.where((n > e) & (n0 > e), half, full)
        alpha = tl.where(m > e, _div(1.0 - val, m * m, F64), 0.0)
        o = out + (t.to(tl.int64) * rows + rr) * 3
        tl.store(o, val, mask=row_ok)
        tl.store(o + 1, alpha, mask=row_ok)
        tl.store(o + 2, mm0, mask=row_ok)
    else:
        o = out + (t.to(tl.int64) * rows + rr) * 4
        tl.store(o, s_pp, mask=row_ok)
        tl.store(o + 1, s_rr, mask=row_ok)
        tl.store(o + 2, s_dd, mask=row_ok)
        tl.store(o + 3, s_de, mask=row_ok)


@triton.jit
def _row_grad_kernel(p_addr, r_addr, g_addr, stats, k_ptr, rows, cols,
                     P_TY: tl.constexpr, R_TY: tl.constexpr, G_TY: tl.constexpr, ACC: tl.constexpr,
                     F64: tl.constexpr, ACCUMULATE: tl.constexpr, ALIGNED: tl.constexpr,
                     ROWS: tl.constexpr, COLS: tl.constexpr):
    """g_r ← a_r·θ_r − b_r·θ0_r (ACCUMULATE: g_r + that, rounded once), with a_r = α_r·k_t and
    b_r = k_t/(m·m0)_r from the forward's stats[t, row] = (1 − cos, α, m·m0); k_t = the
    upstream gradient of tensor t divided by its row count."""
    t = tl.program_id(1)
    p_ptr = _ptr(p_addr, t, P_TY, ALIGNED)
    r_ptr = _ptr(r_addr, t, R_TY, ALIGNED)
    g_ptr = _ptr(g_addr, t, G_TY, ALIGNED)
    rr = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rr < rows
    k = tl.load(k_ptr + t)
    s = stats + (t.to(tl.int64) * rows + rr) * 3
    a = (tl.load(s + 1, mask=row_ok, other=0.0) * k)[:, None]
    b = _div(k, tl.load(s + 2, mask=row_ok, other=1.0), F64)[:, None]
    base = rr.to(tl.int64) * cols
    cc = tl.arange(0, COLS)
    for c0 in range(0, cols, COLS):
        idx = base[:, None] + (c0 + cc)[None, :]
        mask = row_ok[:, None] & ((c0 + cc) < cols)[None, :]
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
        r = tl.load(r_ptr + idx, mask=mask, other=0.0).to(ACC)
        g = p * a - r * b
        if ACCUMULATE:
            g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(ACC) + g
        tl.store(g_ptr + idx, g.to(G_TY), mask=mask)


@triton.jit
def _dot(x, y, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x·y. UPCAST (Triton's interpreter only, whose bf16 dot is wrong): as fp32 dots,
    which gives the same exact products."""
    if UPCAST:
        acc = tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(x, y, acc, input_precision="ieee")
    else:
        acc = tl.dot(x, y, acc)
    return acc


@triton.jit
def _lora_proj_kernel(w_addr, a_parts, c_out, d, k, n_layers,
                      W_TY: tl.constexpr, NPARTS: tl.constexpr, IEEE: tl.constexpr,
                      UPCAST: tl.constexpr, ALIGNED: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """C[l, rows] = W0_l[rows, :] · A[l]ᵀ for BM rows of layer pid1.

    a_parts (NPARTS, L, k, BR): the parts of A[l]ᵀ, zero-padded from r to BR columns;
    c_out (L, d, BR) fp32."""
    l = tl.program_id(1)
    w_ptr = _ptr(w_addr, l, W_TY, ALIGNED)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < d
    kk = tl.arange(0, BK)
    rr = tl.arange(0, BR)
    w_rows = rows.to(tl.int64) * k
    acc = tl.zeros([BM, BR], dtype=tl.float32)
    for k0 in range(0, k, BK):
        cols = k0 + kk
        col_ok = cols < k
        w = tl.load(w_ptr + w_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)
        for part in tl.static_range(NPARTS):
            a_off = ((part * n_layers + l).to(tl.int64) * k + cols[:, None]) * BR + rr[None, :]
            a = tl.load(a_parts + a_off, mask=col_ok[:, None], other=0.0)
            acc = _dot(w, a, acc, IEEE, UPCAST)
    c_off = ((l.to(tl.int64) * d + rows[:, None]) * BR) + rr[None, :]
    tl.store(c_out + c_off, acc, mask=row_ok[:, None])


@triton.jit
def _lora_proj_grad_kernel(w_addr, gc_parts, ga_out, d, k, n_layers,
                           W_TY: tl.constexpr, NPARTS: tl.constexpr, IEEE: tl.constexpr,
                           UPCAST: tl.constexpr, ALIGNED: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                           BR: tl.constexpr):
    """∇A[l]ᵀ[cols] = W0_l[:, cols]ᵀ · ∇C[l] for BK columns of layer pid1.

    gc_parts (NPARTS, L, d, BR): the parts of ∇C[l], zero-padded; ga_out (L, k, BR) fp32."""
    l = tl.program_id(1)
    w_ptr = _ptr(w_addr, l, W_TY, ALIGNED)
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    col_ok = cols < k
    dd = tl.arange(0, BD)
    rr = tl.arange(0, BR)
    acc = tl.zeros([BK, BR], dtype=tl.float32)
    for d0 in range(0, d, BD):
        rows = d0 + dd
        row_ok = rows < d
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * k + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        wt = tl.trans(w)
        for part in tl.static_range(NPARTS):
            g_off = ((part * n_layers + l).to(tl.int64) * d + rows[:, None]) * BR + rr[None, :]
            g = tl.load(gc_parts + g_off, mask=row_ok[:, None], other=0.0)
            acc = _dot(wt, g, acc, IEEE, UPCAST)
    o_off = ((l.to(tl.int64) * k + cols[:, None]) * BR) + rr[None, :]
    tl.store(ga_out + o_off, acc, mask=col_ok[:, None])
