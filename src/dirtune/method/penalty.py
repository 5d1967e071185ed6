"""The weight direction penalty of method.md §1, in plain torch.

For a trainable tensor `θ` and its pretrained reference `θ0`,

    R(θ)     = (1/|S|) Σ_i (1 − cos(θ_i, θ0_i))                    granularity "tensor"
    R_row(θ) = (1/|S|) Σ_i mean_r (1 − cos(θ_i[r,:], θ0_i[r,:]))   granularity "row"

with the Frobenius inner product and norm. Near `cos ≈ 1` (where fine-tuning lives) `1 − cos`
taken as one minus a ratio is all round-off in fp32, so nothing here computes it that way:

- dense weights: `1 − cos = ||u − u0||² / 2` with the unit vectors `u = θ/||θ||`,
  `u0 = θ0/||θ0||`, and the closed-form gradient `∇_θ (1 − c) = −(u0 − c·u)/||θ||`;
- LoRA (`W = W0 + s·B·A`, reference `W0`): the factored identities of method.md and
  `1 − cos = s²·(n0·q − c²)₊ / (√(n0·v)·(√(n0·v) + u))`, `u = n0 + s·c`, `v = n0 + 2s·c + s²·q`.

The arithmetic is fp32 whatever the weights' dtype (float64 when an input is float64).

`eps`: a norm below `EPS` is replaced by `EPS`, i.e. `cos(a, b) = <a, b> / (max(||a||, ε)·
max(||b||, ε))`. This differs from method.md's `||a||·||b|| + ε` only for norms near ε, and it
keeps unit vectors exactly of length one whenever the norm exceeds ε, which the cancellation-free
identities need. A zero row (or tensor) thus has `cos = 0` and a penalty of 1, never NaN;
the gradient at a zero row of θ is the exact one of this definition, `−u0/ε` (finite, large:
it pushes a collapsed row back out along θ0; trained weights never sit exactly at zero).

Sharded weights (DTensors, FSDP2: whole output rows per rank) give the same value and the same
gradient as the unsharded ones: "row" terms are local and only the value is summed over ranks;
"tensor" terms sum the shards' squared norms first (one all-reduce for all tensors), then the
shards' `||u − u0||²` (a second one), and the backward is local. References may be full
tensors (cut to the local rows at each call) or DTensors like their weights.

Imports only torch (house rule: the method does not know about transformers or peft). The
LoRA-factored form lives in lora_penalty.py; `lora_direction_penalty` is served from here too.
"""

from __future__ import annotations

import torch

from dirtune.method import sharded
from dirtune.method.common import EPS, accumulation_dtype, as_list, check_floating, check_granularity
from dirtune.method.lora_penalty import lora_direction_penalty
from dirtune.method.penalty_path import fused_module

__all__ = ["EPS", "angle_and_drift", "angles_and_drifts", "direction_penalty", "lora_direction_penalty"]

# ---------------------------------------------------------------------------------------------
# Dense form
# ---------------------------------------------------------------------------------------------


def _rows_view(t: torch.Tensor, rows: bool) -> torch.Tensor:
    """(R, N) view: one row per output row (dim 0) for "row", a single row for "tensor".

    Tensors of dimension < 2 have no output rows; they are one row (the whole vector)."""
    if rows and t.dim() >= 2:
        return t.flatten(1)  # not reshape(R, -1), which a shard with no rows (R = 0) refuses
    return t.reshape(1, -1)


def _on_device(ref: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`ref` on `device`, in its own (storage) dtype so that a bf16 reference moves 2 bytes per
    element; asynchronous only towards an accelerator, where the copy is ordered on its stream."""
    if ref.device == device:
        return ref
    return ref.to(device, non_blocking=device.type != "cpu")


def _one_minus_cos_rows(t: torch.Tensor, r: torch.Tensor, cd: torch.dtype, eps: float):
    """Per-row `1 − cos` of two (R, N) tensors, cancellation-free, computed in `cd`.

    Returns (val (R,), m (R,), m0 (R,)) with `m = max(||t_r||, ε)`, `m0 = max(||r_r||, ε)`.
    `val = ||u − u0||²/2 + (1 − ||u||²)/2 + (1 − ||u0||²)/2` with `u = t/m`, `u0 = r/m0`, which is
    `1 − <t, r>/(m·m0)` exactly; the two corrections are exactly 0 unless a norm is below ε
    (then `n/m` is not 1), so near `cos ≈ 1` only `||u − u0||²/2` is computed.
    The inputs are never cast as a whole: bf16 × fp32 row factors promote to fp32 per element.
    """
    n = torch.linalg.vector_norm(t, dim=1, dtype=cd)
    n0 = torch.linalg.vector_norm(r, dim=1, dtype=cd)
    m, m0 = n.clamp_min(eps), n0.clamp_min(eps)
    val = _half_square_distance(t, r, m, m0) + _below_eps(n, m, n0, m0)
    return val, m, m0


def _half_square_distance(t: torch.Tensor, r: torch.Tensor, m: torch.Tensor, m0: torch.Tensor):
    """`||t/m − r/m0||²/2` per row of two (R, N) tensors, in m's dtype; m, m0 (R,)."""
    d = t * (1 / m)[:, None]                                 # u, (R, N) in cd
    d.sub_(r * (1 / m0)[:, None])                            # u − u0 (two roundings, no FMA:
    return 0.5 * torch.linalg.vector_norm(d, dim=1).square()  #  exactly 0 when t == r)


def _below_eps(n, m, n0, m0):
    """The corrections `(1 − (n/m)²)/2 + (1 − (n0/m0)²)/2`: exactly 0 unless a norm is below ε."""
    return 0.5 * (1 - (n / m).square()) + 0.5 * (1 - (n0 / m0).square())


class _DenseDirection(torch.autograd.Function):
    """`mean_rows(1 − cos(θ_r, θ0_r))` of one tensor with the closed-form gradient.

    Saves θ and θ0 as given (no copies: both are alive anyway) and three per-row vectors, so no
    (R, N) intermediate is kept between forward and backward. θ0 is a constant (no gradient)
    and may live on another device (e.g. the CPU): it is moved to θ's device for the forward
    and again for the backward, transiently.

    `count` is the number of rows the mean is over: None for this tensor's own rows; the global
    row count when θ is one rank's shard of a row-sharded tensor (the result is then that
    shard's share of the mean, and the shares sum to it over ranks).
    """

    @staticmethod
    def forward(ctx, theta: torch.Tensor, ref: torch.Tensor, rows: bool, eps: float, count):
        cd = accumulation_dtype(theta, ref)
        r = _on_device(_rows_view(ref, rows), theta.device)
        val, m, m0 = _one_minus_cos_rows(_rows_view(theta, rows), r, cd, eps)
        ctx.save_for_backward(theta, ref, val, m, m0)
        ctx.rows, ctx.eps, ctx.count = rows, eps, count
        return val.mean() if count is None else val.sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        theta, ref, val, m, m0 = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        t = _rows_view(theta, ctx.rows)
        r = _on_device(_rows_view(ref, ctx.rows), theta.device)
        # ∇ = −(u0 − c·u)/m per row, times grad_out/R (mean over R rows), written as two row
        # scalings of θ and θ0:  ∇ = θ·(c/m²)·k − θ0·(1/(m·m0))·k,  k = grad_out/R.
        # c = 1 − val: its rounding (~1e-7 absolute) is that of u itself, so nothing is lost.
        # Below ε the norm is the constant ε and the θ term vanishes (∇ = −u0/ε, finite);
        # m > ε: the norm was not clamped, m == ε: it was at or below ε.
        k = grad_out / (val.numel() if ctx.count is None else ctx.count)
        a = torch.where(m > ctx.eps, (1 - val) / (m * m), torch.zeros_like(m)) * k
        b = k / (m * m0)
        g = t * a[:, None]
        g.sub_(r * b[:, None])
        return g.reshape(theta.shape).to(theta.dtype), None, None, None, None


class _SumOverRanks(torch.autograd.Function):
    """Shares of a value summed over ranks (all-reduce); the backward is the identity, because
    each rank's share depends only on its own shard: ∂R/∂θ_shard = ∂share/∂θ_shard."""

    @staticmethod
    def forward(ctx, shares: torch.Tensor, owners):
        return sharded.sum_over_shards(shares.detach(), owners)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ShardedTensorDirection(torch.autograd.Function):
    """`1 − cos(θ_i, θ0_i)` (n,) of whole tensors given their local shards, closed-form gradient.

    forward: the shards' squared norms are summed over ranks (one all-reduce for all tensors),
    giving the whole-tensor `m = max(||θ||, ε)`, `m0`; then the shards' `||θ/m − θ0/m0||²/2`
    (a second all-reduce). The backward `−(u0 − c·u)/m` per element needs only `c`, `m`, `m0`
    (whole-tensor scalars, saved) and the local shard: no communication.
    inputs: owners (the sharded tensors, for their process groups), eps, then n local θ shards
    and n local θ0 shards.
    """

    @staticmethod
    def forward(ctx, owners, eps: float, *tensors: torch.Tensor):
        n = len(owners)
        ts = [t.reshape(1, -1) for t in tensors[:n]]
        rs = [_on_device(r.reshape(1, -1), t.device) for r, t in zip(tensors[n:], ts)]
        cd = accumulation_dtype(*ts, *rs)
        dev = ts[0].device
        sq = torch.stack([torch.cat([torch.linalg.vector_norm(t, dim=1, dtype=cd),
                                     torch.linalg.vector_norm(r, dim=1, dtype=cd)]).to(dev)
                          for t, r in zip(ts, rs)]).square()          # (n, 2) shard ||θ||², ||θ0||²
        norms = sharded.sum_over_shards(sq, owners).sqrt()             # (n, 2) whole tensors
        nn_, nn0 = norms[:, 0], norms[:, 1]
        m, m0 = nn_.clamp_min(eps), nn0.clamp_min(eps)
        half = torch.stack([_half_square_distance(t, r, m[i:i + 1].to(t.device), m0[i:i + 1].to(t.device))[0]
                            .to(dev) for i, (t, r) in enumerate(zip(ts, rs))])
        val = sharded.sum_over_shards(half, owners) + _below_eps(nn_, m, nn0, m0)
        ctx.save_for_backward(*tensors, val, m, m0)
        ctx.n, ctx.eps = n, eps
        return val

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_val: torch.Tensor):
        saved = ctx.saved_tensors
        n = ctx.n
        thetas, refs, (val, m, m0) = saved[:n], saved[n:2 * n], saved[2 * n:]
        grads = []
        for i, (theta, ref) in enumerate(zip(thetas, refs)):
            if not ctx.needs_input_grad[2 + i]:
                grads.append(None)
                continue
            # the same two scalings of θ and θ0 as _DenseDirection.backward, with whole-tensor
            # c = 1 − val, m, m0
            k = grad_val[i]
            a = torch.where(m[i] > ctx.eps, (1 - val[i]) / (m[i] * m[i]), torch.zeros_like(m[i])) * k
            b = k / (m[i] * m0[i])
            t = theta.reshape(1, -1)
            g = t * a.to(t.device)
            g.sub_(_on_device(ref.reshape(1, -1), t.device) * b.to(t.device))
            grads.append(g.reshape(theta.shape).to(theta.dtype))
        return (None, None, *grads, *([None] * n))


def _local_ref(ref: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The reference rows beside `weight`'s local shard: a DTensor reference's own shard, or
    the matching rows (a view) of a full reference."""
    if sharded.is_dtensor(ref):
        return sharded.local(ref)
    return sharded.local_rows(ref, weight)


def _sharded_direction_penalty(ws: list, rs: list, rows: bool) -> torch.Tensor:
    """direction_penalty when some weights are DTensors: per-tensor terms from local shards,
    completed over ranks (module docstring), in the order of `ws`."""
    for w in ws:
        sharded.shard_dims(w)  # refuses placements that split rows
    locals_ = [(sharded.local(w), _local_ref(r, w)) for w, r in zip(ws, rs)]
    terms: list = [None] * len(ws)
    # "row" on a 2-D (or higher) tensor: rows are whole on each shard
    by_row = [i for i, w in enumerate(ws) if rows and w.dim() >= 2]
    if by_row:
        shares = torch.stack([_DenseDirection.apply(*locals_[i], True, EPS, ws[i].shape[0]) for i in by_row])
        for i, v in zip(by_row, _SumOverRanks.apply(shares, [ws[i] for i in by_row]).unbind(0)):
            terms[i] = v
    # "tensor", and 1-D tensors (one row that spans the shards)
    whole = [i for i in range(len(ws)) if i not in set(by_row)]
    if whole:
        vals = _ShardedTensorDirection.apply([ws[i] for i in whole], EPS,
                                             *[locals_[i][0] for i in whole],
                                             *[locals_[i][1] for i in whole])
        dev = terms[by_row[0]].device if by_row else vals.device
        for i, v in zip(whole, vals.to(dev).unbind(0)):
            terms[i] = v
    return terms[0] if len(terms) == 1 else torch.stack(terms).mean()


def direction_penalty(weights, refs, granularity: str = "row", *, fused=None,
                      into_grad: bool = False) -> torch.Tensor:
    """`R` (or `R_row`) of method.md §1: mean over tensors of `1 − cos(θ_i, θ0_i)`.

    weights: a tensor or a list/tuple of tensors `θ_i` (any float dtype; differentiable).
    refs:    the references `θ0_i`, same count and shapes; constants (no gradient), possibly on
             another device (moved to the weight's device, transiently, at each call).
    granularity: "row" = per tensor, the mean over output rows (dim 0) of the per-row
             `1 − cos` (a 1-D tensor is one row); "tensor" = one Frobenius cosine per tensor.

    Returns a 0-d fp32 tensor (float64 if an input is float64). Computed as
    `||u − u0||²/2` per row/tensor, with gradient `−(u0 − c·u)/||θ||` (divided by the number of
    rows and tensors); at `θ = θ0` value and gradient are zero, and the value is invariant to
    scaling a row/tensor of `θ` by a positive number.

    fused: None (default) takes the Triton kernels of `penalty_fused` for granularity "row" when
    every weight is a contiguous CUDA tensor and Triton imports; True asks for them (an error
    where they cannot run); False keeps the plain-torch reference below.
    into_grad: on the fused path, add the gradient to the weights' `.grad` at the end of
    `loss.backward()` instead of handing it to autograd, where that is exact (single process,
    leaf weights, a backward that accumulates into them); DirectionPenalty asks for it.
    """
    fn = "direction_penalty"
    rows = check_granularity(fn, granularity)
    ws, rs = as_list(fn, "weights", weights), as_list(fn, "refs", refs)
    if not ws:
        raise ValueError(f"{fn}: weights is empty; give at least one tensor")
    if len(ws) != len(rs):
        raise ValueError(f"{fn}: got {len(ws)} weights but {len(rs)} refs; give one reference "
                         "per weight")
    for i, (w, r) in enumerate(zip(ws, rs)):
        check_floating(fn, "weights", i, w)
        check_floating(fn, "refs", i, r)
        if w.shape != r.shape:
            raise ValueError(f"{fn}: weights[{i}] has shape {tuple(w.shape)} but refs[{i}] has "
                             f"shape {tuple(r.shape)}; a reference must have its weight's shape")
    if any(sharded.is_dtensor(w) for w in ws):
        return _sharded_direction_penalty(ws, [r.detach() for r in rs], rows)
    pf = fused_module(ws, fused, fn) if rows else None
    if pf is not None:
        if pf.dense_eligible(ws, rs):
            return pf.dense_values(ws, rs, EPS, into_grad).mean()
        if fused:
            raise ValueError(f"{fn}: fused=True needs contiguous weights and references on one "
                             "CUDA device; use fused=None or False")
    terms = [_DenseDirection.apply(w, r.detach(), rows, EPS, None) for w, r in zip(ws, rs)]
    return terms[0] if len(terms) == 1 else torch.stack(terms).mean()


@torch.no_grad()
def angle_and_drift(weight: torch.Tensor, ref: torch.Tensor):
    """Tensor-level angle ∠(θ, θ0) in degrees and relative drift `||θ − θ0|| / ||θ0||`.

    Without gradient, in fp32 (float64 for float64 inputs). The angle is
    `2·asin(||u − u0||/2)`, i.e. `2·asin(√((1 − cos)/2))` with the cancellation-free `1 − cos`
    above, so it resolves thousandths of a degree in fp32. Returns two 0-d tensors (no host
    sync; call `.item()` when logging). A zero tensor has angle 90° (cos = 0).
    """
    if weight.shape != ref.shape:
        raise ValueError(f"angle_and_drift: weight has shape {tuple(weight.shape)} but ref has "
                         f"shape {tuple(ref.shape)}")
    if sharded.is_dtensor(weight):
        return _sharded_angle_and_drift(weight, ref)
    cd = accumulation_dtype(weight, ref)
    t = weight.reshape(1, -1)
    r = _on_device(ref.reshape(1, -1), weight.device)
    val, _, m0 = _one_minus_cos_rows(t, r, cd, EPS)
    angle = torch.rad2deg(2 * torch.asin((val[0] / 2).clamp(0, 1).sqrt()))
    drift = torch.linalg.vector_norm(t.to(cd) - r.to(cd)) / m0[0]
    return angle, drift


@torch.no_grad()
def angles_and_drifts(weights: list, refs: list, *, fused=None):
    """`angle_and_drift` of every pair as two (n,) tensors: on the fused path (see
    `direction_penalty`) one read of each weight and reference, one launch per shape."""
    fn = "angles_and_drifts"
    pf = fused_module(list(weights), fused, fn) if weights else None
    if pf is not None and pf.dense_eligible(list(weights), list(refs)):
        return pf.dense_angle_drift(list(weights), [r.detach() for r in refs], EPS)
    pairs = [angle_and_drift(w, r) for w, r in zip(weights, refs)]
    dev = pairs[0][0].device if pairs else None
    return (torch.stack([a.to(dev) for a, _ in pairs]) if pairs else torch.zeros(0),
            torch.stack([d.to(dev) for _, d in pairs]) if pairs else torch.zeros(0))


def _sharded_angle_and_drift(weight: torch.Tensor, ref: torch.Tensor):
    """angle_and_drift of a row-sharded DTensor weight from its local shard: the same numbers,
    with two all-reduces (norms and distance, then `||u − u0||²`)."""
    sharded.shard_dims(weight)
    t = sharded.local(weight).reshape(1, -1)
    r = _on_device(_local_ref(ref, weight).reshape(1, -1), t.device)
    cd = accumulation_dtype(t, r)
    shard = torch.cat([torch.linalg.vector_norm(t, dim=1, dtype=cd),
                       torch.linalg.vector_norm(r, dim=1, dtype=cd),
                       torch.linalg.vector_norm(t.to(cd) - r.to(cd), dim=1)]).square()
    n, n0, dist = sharded.sum_over_shards(shard[None], [weight])[0].sqrt()
    m, m0 = n.clamp_min(EPS), n0.clamp_min(EPS)
    half = _half_square_distance(t, r, m.reshape(1), m0.reshape(1))
    val = sharded.sum_over_shards(half[None], [weight])[0, 0] + _below_eps(n, m, n0, m0)
    angle = torch.rad2deg(2 * torch.asin((val / 2).clamp(0, 1).sqrt()))
    return angle, dist / m0
