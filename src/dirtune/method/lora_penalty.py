"""The LoRA-factored weight direction penalty (method.md §1): for `W = W0 + s·B·A` with the
frozen base `W0` as reference, `1 − cos(W, W0)` from r-sized quantities only, never forming B·A:

    <W0, BA> = sum((Bᵀ W0) ∘ A),  ||BA||² = sum((Bᵀ B) ∘ (A Aᵀ)),  per row with C = W0·Aᵀ, G = A·Aᵀ,
    1 − cos = s²·(n0·q − c²)₊ / (√(n0·v)·(√(n0·v) + u)),  u = n0 + s·c,  v = n0 + 2s·c + s²·q

(cancellation-free), in fp32 whatever the weights' dtype. Layers of one shape are batched.

Imports only torch and the method's shared pieces (common.py); penalty.py re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dirtune.method import sharded
from dirtune.method.common import EPS, accumulation_dtype, as_list, check_floating, check_granularity
from dirtune.method.penalty_path import fused_module


def base_row_norms(base: torch.Tensor) -> torch.Tensor:
    """`||W0 rows||²` (d,) in fp32 (float64 for float64): the constant `n0` of a frozen base,
    to compute once and pass to `lora_direction_penalty(..., base_sq_norms=...)`."""
    return torch.linalg.vector_norm(base.detach().to(accumulation_dtype(base)), dim=1).square()


class _BaseProjection(torch.autograd.Function):
    """`C[l] = W0_l · A[l]ᵀ` (L, d, r) for frozen bases W0_l.

    The bases are constants; each is cast to the compute dtype one at a time, transiently, and
    only the bases themselves (no copies) are kept for the backward `∇A[l] = ∇C[l]ᵀ · W0_l`.
    Plain autograd would keep the fp32 cast of every bf16 base alive until backward. One matmul
    per layer: W0·Aᵀ reads all of W0, so it is memory-bound and one launch per layer costs
    nothing measurable, while stacking the bases for a bmm would copy them.
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor, *bases: torch.Tensor):
        ctx.save_for_backward(*bases)
        # the bf16→fp32 cast is transient: one layer's copy at a time
        return torch.stack([base.to(A.dtype) @ A[i].T for i, base in enumerate(bases)])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_C: torch.Tensor):
        bases = ctx.saved_tensors
        grad_A = torch.stack([grad_C[i].T @ base.to(grad_C.dtype) for i, base in enumerate(bases)])
        return (grad_A, *([None] * len(bases)))


def _lora_one_minus_cos(n0, c, q, s, eps: float) -> torch.Tensor:
    """`1 − cos(W0 + s·BA, W0)` from `n0 = ||W0||²`, `c = <W0, BA>`, `q = ||BA||²` (elementwise).

    Cancellation-free branch (both norms ≥ ε and `u ≥ 0`):
        `s²·(n0·q − c²)₊ / (√(n0·v)·(√(n0·v) + u))`,  `u = n0 + s·c`, `v = n0 + 2s·c + s²·q`.
    Otherwise (a norm below ε, or cos < 0 where `√(n0·v) + u` may vanish) the plain
    `1 − u / (max(√n0, ε)·max(√v, ε))`, which has no cancellation there. Both branches get
    safe denominators so that the unused one cannot put NaN into the gradient.
    """
    u = n0 + s * c
    v = n0 + 2 * s * c + s * s * q
    e2 = eps * eps
    den = n0.clamp_min(e2).sqrt() * v.clamp_min(e2).sqrt()   # max(||W0||, ε)·max(||W||, ε)
    den2 = den * (den + u.clamp_min(0))
    stable = (n0 >= e2) & (v >= e2) & (u >= 0) & (den2 > 0)
    one = torch.ones_like(den)
    num = (s * s) * (n0 * q - c * c).clamp_min(0)
    return torch.where(stable, num / torch.where(stable, den2, one),
                       1 - u / torch.where(stable, one, den))


def _lora_sums(bases, As, Bs, scales, cd: torch.dtype, norms, pf=None):
    """Per row (L, d): `n0 = ||W0_i||²`, `c = <W0_i, (BA)_i>`, `q = ||(BA)_i||²`, and s (a number
    or (L, 1)), for L layers of identical shapes, batched (method.md §1).

    With `C = W0·Aᵀ` (d×r) and `G = A·Aᵀ` (r×r), row i has `c_i = Σ_j B_ij C_ij`,
    `q_i = (B·G)_i · B_i`; tensor values are the sums over rows (`Σ_i c_i = sum((BᵀW0)∘A)`,
    `Σ_i q_i = sum((BᵀB)∘(AAᵀ))`). Memory beyond the inputs: O(L·r·(d + k)).
    """
    A = torch.stack([a.to(cd) for a in As])                     # (L, r, k)
    B = torch.stack([b.to(cd) for b in Bs])                     # (L, d, r)
    if pf is not None and pf.lora_eligible(bases, A):
        C = pf.lora_projection(A, bases)                        # (L, d, r), bases read as stored
    else:
        C = _BaseProjection.apply(A, *bases)
    n0 = torch.stack([base_row_norms(w) if n is None else n.to(cd) for w, n in zip(bases, norms)])  # (L, d)
    G = A @ A.transpose(1, 2)                                   # (L, r, r)
    c = (B * C).sum(-1)                                         # (L, d)
    q = ((B @ G) * B).sum(-1)                                   # (L, d)
    if len(set(scales)) == 1:
        s = scales[0]                                           # the usual case: no tensor
    else:
        s = torch.tensor(scales, dtype=cd, device=A.device)[:, None]   # (L, 1)
    return n0, c, q, s


def _lora_group(bases, As, Bs, scales, rows: bool, cd: torch.dtype, norms, pf=None) -> torch.Tensor:
    """Per-layer `1 − cos` (L,) for L layers of identical shapes."""
    n0, c, q, s = _lora_sums(bases, As, Bs, scales, cd, norms, pf)
    if rows:
        return _lora_one_minus_cos(n0, c, q, s, EPS).mean(-1)
    s = s[:, 0] if isinstance(s, torch.Tensor) else s
    return _lora_one_minus_cos(n0.sum(-1), c.sum(-1), q.sum(-1), s, EPS)


def _prepare(fn: str, base, lora_A, lora_B, scale, base_sq_norms):
    """The checked arguments as lists, the compute dtype, and the layers grouped by shape."""
    bases = as_list(fn, "base", base)
    As, Bs = as_list(fn, "lora_A", lora_A), as_list(fn, "lora_B", lora_B)
    if any(sharded.is_dtensor(t) for t in (*bases, *As, *Bs)):
        raise ValueError(f"{fn}: sharded (DTensor, FSDP) LoRA layers are not supported: the "
                         "factored identities need whole A and W0 rows on each rank. LoRA's "
                         "trainable weights are small: train LoRA data-parallel (accelerate "
                         "launch without an FSDP config); see docs/distributed.md")
    if not bases:
        raise ValueError(f"{fn}: base is empty; give at least one layer")
    if not (len(bases) == len(As) == len(Bs)):
        raise ValueError(f"{fn}: got {len(bases)} bases, {len(As)} lora_A and {len(Bs)} lora_B; "
                         "give one of each per layer")
    if isinstance(scale, Sequence):
        scales = list(scale)
    elif isinstance(scale, torch.Tensor) and scale.dim() > 0:
        scales = scale.tolist()
    else:
        scales = [scale] * len(bases)
    if len(scales) != len(bases):
        raise ValueError(f"{fn}: got {len(scales)} scales for {len(bases)} layers")
    norms = [None] * len(bases) if base_sq_norms is None else as_list(fn, "base_sq_norms", base_sq_norms)
    if len(norms) != len(bases):
        raise ValueError(f"{fn}: got {len(norms)} base_sq_norms for {len(bases)} layers")
    for i, (w, n) in enumerate(zip(bases, norms)):
        if n is not None and tuple(n.shape) != (w.shape[0],):
            raise ValueError(f"{fn}: base_sq_norms[{i}] has shape {tuple(n.shape)}; the base has "
                             f"{w.shape[0]} rows, so it needs ({w.shape[0]},)")
    for i, (w, a, b, s) in enumerate(zip(bases, As, Bs, scales)):
        for name, t in (("base", w), ("lora_A", a), ("lora_B", b)):
            check_floating(fn, name, i, t)
        ok = w.dim() == 2 and a.dim() == 2 and b.dim() == 2
        if not ok or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(
                f"{fn}: layer {i}: base {tuple(w.shape)}, lora_A {tuple(a.shape)}, lora_B "
                f"{tuple(b.shape)} do not fit; need base (d, k), lora_A (r, k), lora_B (d, r)")
        s = float(s)
        if not math.isfinite(s):
            raise ValueError(f"{fn}: scale[{i}] = {s} is not a finite number")
        scales[i] = s
    cd = accumulation_dtype(*bases, *As, *Bs)
    # Group layers of identical shapes (and device) so that each group is one batched computation.
    groups: dict[tuple, list[int]] = {}
    for i, (w, a) in enumerate(zip(bases, As)):
        groups.setdefault((tuple(w.shape), a.shape[0], w.device, w.dtype), []).append(i)
    return bases, As, Bs, scales, norms, cd, groups


def lora_direction_penalty(base, lora_A, lora_B, scale, granularity: str = "row", *,
                           base_sq_norms=None, fused=None) -> torch.Tensor:
    """The direction penalty of `W = W0 + s·B·A` against `W0`, without forming `B·A`.

    Equal to `direction_penalty([W0 + s·B·A], [W0], granularity)` (to round-off), computed with
    method.md's factored identities
        `<W0, BA> = sum((BᵀW0)∘A)`, `||BA||² = sum((BᵀB)∘(AAᵀ))`,
        `<W, W0> = n0 + s·c`, `||W||² = n0 + 2s·c + s²·q`   (per row for "row": C = W0·Aᵀ, G = AAᵀ)
    and the cancellation-free `1 − cos = s²·(n0·q − c²)₊ / (√(n0·v)·(√(n0·v) + u))`.

    base:   `W0` (d×k), frozen: a constant, never copied beyond a transient fp32 cast.
    lora_A: `A` (r×k); lora_B: `B` (d×r); gradients flow to both by autograd.
    scale:  `s` (a number).
    base_sq_norms: optional `||W0 rows||²` (d,) per layer (`base_row_norms`): the bases are
            frozen, so a caller that keeps these saves reading every base once more per call.
    Each of these may instead be a list (one entry per layer; `scale` a number or a list):
    layers of equal shapes are stacked and computed with batched matmuls, and the result is
    the mean over all layers. fp32 math (float64 if an input is float64). At `B = 0` value and
    gradients are exactly zero.
    fused: None (default) computes `W0·Aᵀ` and its gradient with the Triton grouped GEMMs of
    `penalty_fused` (each base read once per pass, in its own dtype) when the layers are on CUDA
    and Triton imports; False keeps the per-layer fp32 cast below (the reference).
    """
    fn = "lora_direction_penalty"
    rows = check_granularity(fn, granularity)
    bases, As, Bs, scales, norms, cd, groups = _prepare(fn, base, lora_A, lora_B, scale, base_sq_norms)
    pf = fused_module(bases, fused, fn) if cd == torch.float32 else None
    terms = [_lora_group([bases[i].detach() for i in idx], [As[i] for i in idx],
                         [Bs[i] for i in idx], [scales[i] for i in idx], rows, cd, [norms[i] for i in idx], pf)
             for idx in groups.values()]
    values = terms[0] if len(terms) == 1 else torch.cat(terms)
    return values.mean()


@torch.no_grad()
def lora_angle_and_drift(base, lora_A, lora_B, scale, *, base_sq_norms=None, fused=None):
    """Per layer, the tensor angle ∠(W0 + s·B·A, W0) in degrees and the relative drift
    `||s·B·A|| / ||W0||`, from the factored sums (no B·A is formed): one read of each base.

    Arguments as for `lora_direction_penalty` (lists of layers). Returns two (L,) tensors in
    fp32 (float64 for float64 inputs) on the layers' device, equal to `angle_and_drift` of the
    dense `W` to round-off; no host sync.
    """
    fn = "lora_angle_and_drift"
    bases, As, Bs, scales, norms, cd, groups = _prepare(fn, base, lora_A, lora_B, scale, base_sq_norms)
    pf = fused_module(bases, fused, fn) if cd == torch.float32 else None
    angle = torch.empty(len(bases), dtype=cd, device=bases[0].device)
    drift = torch.empty_like(angle)
    for idx in groups.values():
        n0, c, q, s = _lora_sums([bases[i].detach() for i in idx], [As[i] for i in idx],
                                 [Bs[i] for i in idx], [scales[i] for i in idx], cd,
                                 [norms[i] for i in idx], pf)
        n0, c, q = n0.sum(-1), c.sum(-1), q.sum(-1)
        s = s[:, 0] if isinstance(s, torch.Tensor) else s
        one_minus_cos = _lora_one_minus_cos(n0, c, q, s, EPS)
        where = torch.tensor(idx)
        where = where.pin_memory().to(angle.device, non_blocking=True) if angle.is_cuda else where
        angle[where] = torch.rad2deg(2 * torch.asin((one_minus_cos / 2).clamp(0, 1).sqrt()))
        drift[where] = abs(s) * q.sqrt() / n0.sqrt().clamp_min(EPS)
    return angle, drift
