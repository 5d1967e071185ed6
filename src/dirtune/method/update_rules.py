"""The update of BalancedAdamW (method.md §1 decoupled, §2), apart from the optimizer's bookkeeping.

The two plain-torch paths of the step, `_single_tensor_balanced_adamw` (the readable reference)
and `_multi_tensor_balanced_adamw` (torch._foreach_*), which share three pure functions with
each other and with the fused path (dirtune.method.fused, same signature); the functional entry
`balanced_adamw` that picks one of the three lives in balanced_adamw.py:

    balance_scales      b_i = s̄ / rms(a_i),  s̄ = mean_j rms(a_j)               (balance "scale")
    decay_coefficients  k_i = min(1, η·λ·b_i), one per tensor                    (before the Adam step)
    turn_coefficients   (α, β) with θ ← α·θ + β·θ0, one pair per row or tensor   (after the Adam step)

and `apply_turn` / `apply_turns`, which apply the last one in place. Imports only torch.

Sharded parameters (DTensors, FSDP2): `balanced_adamw` works on their local shards; every
per-tensor sum above (rms, <g, θ − a>, the tensor-granularity turn's norms and inner product)
is summed over the local shard and completed by `sharded.sum_over_shards`, one all-reduce for
all tensors of the group and phase; rows are whole on each rank, so row quantities are local.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

from dirtune.method import sharded
from dirtune.method.common import BALANCES, GRANULARITIES, accumulation_dtype, check_choice, turn_from_sums

# reduce(partials, index): full sums of per-tensor partial sums, row j of `partials` (a shard's
# sum) belonging to tensor index[j] of the functional lists (sharded.sum_over_shards behind it).
Reduce = Callable[[Tensor, list[int]], Tensor]

def rms(t: Tensor) -> float:
    """sqrt(mean(t²)) in at least fp32 over the whole tensor (all shards of a DTensor); 0.0 for
    an empty tensor. One host sync."""
    return _rms_all([t])[0]


def _rms_all(values: list[Tensor]) -> list[float]:
    """rms of each tensor, one host sync and (for DTensors) one all-reduce for all of them."""
    if not values:
        return []
    norms = []
    for v in values:
        x = sharded.local(v.detach())
        norms.append(torch.linalg.vector_norm(x.to(accumulation_dtype(x.dtype))).to(
            device=sharded.local(values[0]).device, dtype=torch.float64))
    norms = torch.stack(norms)
    if any(sharded.is_dtensor(v) for v in values):
        norms = sharded.sum_over_shards(norms.square(), values).sqrt()  # ||a||² = Σ_shards ||a_s||²
    return [n / math.sqrt(v.numel()) if v.numel() else 0.0 for n, v in zip(norms.tolist(), values)]


def balance_scales(values: list[Tensor]) -> list[float]:
    """b_i = s̄ / rms(a_i) with s̄ the mean of rms(a_j) over the tensors with rms > 0.

    With these b_i every tensor settles at the same relative drift ||θ−a||/||a|| for a given λ.
    A tensor whose anchor is all zeros (a zero-initialised bias, LoRA's B) has no scale to
    balance against: it gets b_i = 1 and does not enter s̄ (else b_i = ∞ would pin it to 0).
    If no tensor has a scale, every b_i is 1.
    """
    scales = _rms_all(values)
    positive = [s for s in scales if s > 0]
    if not positive:
        return [1.0] * len(values)
    mean = sum(positive) / len(positive)
    return [mean / s if s > 0 else 1.0 for s in scales]


def decay_coefficients(
    params: list[Tensor],
    grads: list[Tensor],
    anchors: list[Tensor | None],
    scales: list[float],
    *,
    lr: float,
    weight_decay: float,
    balance: str,
    reduce: Reduce | None = None,
) -> Tensor:
    """k_i = min(1, η·λ·b_i), the share of θ_i − a_i removed by this step's decay; shape (n,), float64.

    b_i: "none" → 1; "scale" → scales[i]; "selective" → 1 if c_i = −<g_i, θ_i − a_i> < 0 else 0,
    i.e. only when moving back toward the anchor lowers the loss (SPD's condition; g is the raw
    gradient and θ the value before this step). An anchor of None means a_i = 0.
    "none"/"scale" read no data and return a CPU tensor (free to turn into Python floats);
    "selective" returns a tensor on params[0].device, so no host sync is needed.
    Anchors may live elsewhere (e.g. the CPU; moved transiently) and be in any floating dtype.
    `reduce` (sharded tensors: the lists hold local shards) completes the per-shard sums
    <g_i, θ_i − a_i> into whole-tensor sums, one call for all tensors.
    """
    check_choice("balance", balance, BALANCES)
    cap = min(1.0, lr * weight_decay)
    if balance == "none":
        return torch.tensor([cap] * len(params), dtype=torch.float64)
    if balance == "scale":
        return torch.tensor([min(1.0, lr * weight_decay * b) for b in scales], dtype=torch.float64)
    # selective: the sign of <g, θ − a> per tensor, reduced in at least fp32 (θ ≈ a, so the
    # difference is formed first: <g, θ> − <g, a> would cancel).
    dots = []
    for p, g, a in zip(params, grads, anchors, strict=True):
        acc = accumulation_dtype(p.dtype)
        offset = p.to(acc) if a is None else p.to(acc) - a.to(device=p.device, dtype=acc)
        dots.append((g.to(acc) * offset).sum().to(device=params[0].device, dtype=torch.float64))
    if not dots:
        return torch.zeros(0, dtype=torch.float64)
    dots = torch.stack(dots)
    if reduce is not None:
        dots = reduce(dots, list(range(len(params))))
    return (dots > 0).to(torch.float64) * cap


def turn_coefficients(
    param: Tensor, reference: Tensor, *, strength: float, granularity: str
) -> tuple[Tensor, Tensor]:
    """(α, β) such that α·θ + β·θ0 = θ + κ·||θ||·(u0 − c·u), the decoupled direction turn.

    u = θ/||θ||, u0 = θ0/||θ0||, c = <u, u0>, κ = strength (callers pass min(1, η·λ_dir)), per
    output row (granularity "row": shapes (rows, 1)) or for the whole 2-D tensor ("tensor":
    (1, 1)); so α = 1 − κ·c and β = κ·||θ||/||θ0||. Computed in at least fp32.
    Promises: the result has norm ||θ||·sqrt(1 + κ²·sin²∠(θ, θ0)) (norm kept to first order);
    for κ ≤ 1 it never turns past θ0. A zero row of θ or θ0 is left unchanged (α = 1, β = 0).
    """
    return turn_from_sums(*turn_sums(param, reference, granularity=granularity), strength)


def turn_sums(param: Tensor, reference: Tensor, *, granularity: str) -> tuple[Tensor, Tensor, Tensor]:
    """(||θ||, ||θ0||, <θ, θ0>) per output row ((rows, 1) each) or for the tensor ((1, 1)), in
    at least fp32: what the turn needs from the data. On a shard these are the shard's values."""
    check_choice("granularity", granularity, GRANULARITIES)
    if param.ndim != 2 or reference.shape != param.shape:
        raise ValueError(f"turn_coefficients needs a 2-D param and a reference of the same shape, "
                         f"got {tuple(param.shape)} and {tuple(reference.shape)}")
    acc = accumulation_dtype(param.dtype)
    dims = (1,) if granularity == "row" else (0, 1)
    w = param.to(acc)
    w0 = reference.to(device=param.device, dtype=acc)
    norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)     # ||θ_r||,  (rows, 1) | (1, 1)
    norm0 = torch.linalg.vector_norm(w0, dim=dims, keepdim=True)   # ||θ0_r||
    inner = (w * w0).sum(dim=dims, keepdim=True)                    # <θ_r, θ0_r>
    return norm, norm0, inner


def apply_turn(param: Tensor, reference: Tensor, *, strength: float, granularity: str) -> None:
    """θ ← θ + κ·||θ||·(u0 − c·u) in place (see turn_coefficients); fp32 math for half params."""
    alpha, beta = turn_coefficients(param, reference, strength=strength, granularity=granularity)
    _axpby(param, reference, alpha, beta)


def apply_turns(params: list[Tensor], references: list[Tensor | None], *, strength: float,
                granularity: str, reduce: Reduce | None = None) -> None:
    """apply_turn to every 2-D params[i] (references[i] is its θ0).

    With `reduce` (the lists hold local shards of row-sharded tensors) and granularity "tensor",
    the shards' norms and inner products are completed into whole-tensor ones first, one
    `reduce` for all tensors; rows are whole on every shard, so "row" needs nothing.
    """
    index = [i for i, p in enumerate(params) if p.ndim == 2]
    if reduce is None or granularity == "row":
        for i in index:
            apply_turn(params[i], _beside(references[i], params[i]), strength=strength,
                       granularity=granularity)
        return
    if not index:
        return
    # (n, 3): ||θ||², ||θ0||², <θ, θ0> of each shard, summed over shards, then back to norms
    parts = [torch.cat(turn_sums(params[i], _beside(references[i], params[i]), granularity="tensor"))
             for i in index]
    device = parts[0].device
    sums = torch.stack([q.reshape(3).to(device=device, dtype=torch.float64) for q in parts])
    sums = reduce(torch.cat([sums[:, :2].square(), sums[:, 2:]], dim=1), index)
    for j, i in enumerate(index):
        p = params[i]
        acc = accumulation_dtype(p.dtype)
        norm, norm0, inner = (sums[j, 0].sqrt(), sums[j, 1].sqrt(), sums[j, 2])
        alpha, beta = turn_from_sums(*(x.to(device=p.device, dtype=acc).reshape(1, 1)
                                        for x in (norm, norm0, inner)), strength)
        _axpby(p, _beside(references[i], p), alpha, beta)


def _axpby(param: Tensor, reference: Tensor, alpha: Tensor, beta: Tensor) -> None:
    """θ ← α·θ + β·θ0 in place, in α's dtype (fp32 for half params, rounded once)."""
    w0 = reference.to(device=param.device, dtype=alpha.dtype)
    if param.dtype == alpha.dtype:
        param.mul_(alpha).addcmul_(w0, beta)
    else:  # bf16/fp16 weights: compute in fp32, round once
        param.copy_(param.to(alpha.dtype).mul_(alpha).addcmul_(w0, beta))


def _beside(t: Tensor | None, p: Tensor, dtype: torch.dtype | None = None) -> Tensor | None:
    """t on p's device (an asynchronous upload for pinned CPU anchors), in `dtype` if given."""
    if t is None:
        return None
    return t.to(device=p.device, dtype=dtype or t.dtype, non_blocking=True)


def _scalars(k: Tensor) -> list:
    """Host coefficients as Python floats (foreach ScalarList kernels; AdamW's exact arithmetic),
    device ones (balance "selective") as 0-d tensors, which needs no host sync."""
    return k.tolist() if k.device.type == "cpu" else list(k.unbind(0))


def _single_tensor_balanced_adamw(
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
    reduce: Reduce | None = None,
) -> None:
    decay = weight_decay != 0 and anchor != "none"
    if decay:  # k_i = min(1, η·λ·b_i) from the values before this step (one reduce if sharded)
        ks = _scalars(decay_coefficients(params, grads, anchors, scales, lr=lr,
                                         weight_decay=weight_decay, balance=balance, reduce=reduce))
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq, step_t = grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        step_t += 1
        # decay toward the anchor: θ ← θ − k·(θ − a), k = min(1, η·λ·b)
        if decay:
            a, k = _beside(anchors[i], param), ks[i]
            if a is None:
                param.mul_(1 - k)
            else:  # lerp lands exactly on a when k = 1
                param.lerp_(a.to(param.dtype), k)
        # Adam: moments, bias corrections, θ ← θ − η·m̂/(√v̂ + ε)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
    # decoupled direction turn toward θ0 (2-D weights only), each from its own post-Adam value
    if direction_weight != 0:
        apply_turns(params, references, strength=min(1.0, lr * direction_weight),
                    granularity=granularity, reduce=reduce)


def _group_by_device_and_dtype(params: list[Tensor]) -> dict[tuple, list[int]]:
    """Indices of params per (device, dtype): each foreach kernel needs one of each."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    return groups


def _multi_tensor_balanced_adamw(
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
    reduce: Reduce | None = None,
) -> None:
    decay = weight_decay != 0 and anchor != "none"
    if decay:  # k_i from the values before this step, for all tensors at once (one reduce if sharded)
        ks_all = decay_coefficients(params, grads, anchors, scales, lr=lr, weight_decay=weight_decay,
                                    balance=balance, reduce=reduce)
    for (device, dtype), idx in _group_by_device_and_dtype(params).items():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        steps = [state_steps[i] for i in idx]
        torch._foreach_add_(steps, 1.0)
        # decay toward the anchor, as in the single-tensor path
        if decay:
            anc = [_beside(anchors[i], params[i]) for i in idx]
            sub = ks_all[idx] if ks_all.device.type == "cpu" else ks_all[idx].to(device)
            ks = _scalars(sub)
            if anchor == "zero":
                torch._foreach_mul_(ps, [1 - k for k in ks])
            else:
                torch._foreach_lerp_(ps, [a.to(dtype) for a in anc], ks)
            del anc
        # Adam
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
        bias_correction1 = [1 - beta1 ** s.item() for s in steps]
        bias_correction2 = [1 - beta2 ** s.item() for s in steps]
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [bc**0.5 for bc in bias_correction2])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, [-(lr / bc) for bc in bias_correction1])
        del denom
    # the turn needs per-row reductions, which have no foreach kernel: one tensor at a time
    if direction_weight != 0:
        apply_turns(params, references, strength=min(1.0, lr * direction_weight),
                    granularity=granularity, reduce=reduce)
