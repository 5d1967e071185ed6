"""The per-tensor scalars of BalancedAdamW (method.md §1 decoupled, §2), apart from its bookkeeping.

Three pure functions, shared by the single-tensor, multi-tensor and (later) fused paths:

    balance_scales      b_i = s̄ / rms(a_i),  s̄ = mean_j rms(a_j)               (balance "scale")
    decay_coefficients  k_i = min(1, η·λ·b_i), one per tensor                    (before the Adam step)
    turn_coefficients   (α, β) with θ ← α·θ + β·θ0, one pair per row or tensor   (after the Adam step)

and `apply_turn`, which applies the last one in place. Imports only torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ANCHORS = ("init", "zero", "none")
BALANCES = ("none", "scale", "selective")
GRANULARITIES = ("row", "tensor")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 stays fp64: reductions never run in bf16/fp16."""
    return torch.promote_types(dtype, torch.float32)


def rms(t: Tensor) -> float:
    """sqrt(mean(t²)) in at least fp32; 0.0 for an empty tensor. One host sync."""
    if t.numel() == 0:
        return 0.0
    x = t.detach().to(_accumulation_dtype(t.dtype))
    return float(torch.linalg.vector_norm(x)) / math.sqrt(t.numel())


def balance_scales(values: list[Tensor]) -> list[float]:
    """b_i = s̄ / rms(a_i) with s̄ the mean of rms(a_j) over the tensors with rms > 0.

    With these b_i every tensor settles at the same relative drift ||θ−a||/||a|| for a given λ.
    A tensor whose anchor is all zeros (a zero-initialised bias, LoRA's B) has no scale to
    balance against: it gets b_i = 1 and does not enter s̄ (else b_i = ∞ would pin it to 0).
    If no tensor has a scale, every b_i is 1.
    """
    scales = [rms(v) for v in values]
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
) -> Tensor:
    """k_i = min(1, η·λ·b_i), the share of θ_i − a_i removed by this step's decay; shape (n,), float64.

    b_i: "none" → 1; "scale" → scales[i]; "selective" → 1 if c_i = −<g_i, θ_i − a_i> < 0 else 0,
    i.e. only when moving back toward the anchor lowers the loss (SPD's condition; g is the raw
    gradient and θ the value before this step). An anchor of None means a_i = 0.
    "none"/"scale" read no data and return a CPU tensor (free to turn into Python floats);
    "selective" returns a tensor on params[0].device, so no host sync is needed.
    Anchors must be on their parameter's device (any floating dtype).
    """
    if balance not in BALANCES:
        raise ValueError(f"Invalid balance: {balance!r}; expected one of {BALANCES}")
    cap = min(1.0, lr * weight_decay)
    if balance == "none":
        return torch.tensor([cap] * len(params), dtype=torch.float64)
    if balance == "scale":
        return torch.tensor([min(1.0, lr * weight_decay * b) for b in scales], dtype=torch.float64)
    # selective: the sign of <g, θ − a> per tensor, reduced in at least fp32 (θ ≈ a, so the
    # difference is formed first: <g, θ> − <g, a> would cancel).
    dots = []
    for p, g, a in zip(params, grads, anchors, strict=True):
        acc = _accumulation_dtype(p.dtype)
        offset = p.to(acc) if a is None else p.to(acc) - a.to(acc)
        dots.append((g.to(acc) * offset).sum().to(device=params[0].device, dtype=torch.float64))
    if not dots:
        return torch.zeros(0, dtype=torch.float64)
    return (torch.stack(dots) > 0).to(torch.float64) * cap


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
    if granularity not in GRANULARITIES:
        raise ValueError(f"Invalid granularity: {granularity!r}; expected one of {GRANULARITIES}")
    if param.ndim != 2 or reference.shape != param.shape:
        raise ValueError(f"turn_coefficients needs a 2-D param and a reference of the same shape, "
                         f"got {tuple(param.shape)} and {tuple(reference.shape)}")
    acc = _accumulation_dtype(param.dtype)
    dims = (1,) if granularity == "row" else (0, 1)
    w = param.to(acc)
    w0 = reference.to(device=param.device, dtype=acc)
    norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)     # ||θ_r||,  (rows, 1) | (1, 1)
    norm0 = torch.linalg.vector_norm(w0, dim=dims, keepdim=True)   # ||θ0_r||
    inner = (w * w0).sum(dim=dims, keepdim=True)                    # <θ_r, θ0_r>
    inv_norm = torch.where(norm > 0, norm.reciprocal(), 0.0)
    inv_norm0 = torch.where(norm0 > 0, norm0.reciprocal(), 0.0)
    cos = inner * inv_norm * inv_norm0
    alpha = 1.0 - strength * cos
    beta = strength * norm * inv_norm0
    return alpha, beta


def apply_turn(param: Tensor, reference: Tensor, *, strength: float, granularity: str) -> None:
    """θ ← θ + κ·||θ||·(u0 − c·u) in place (see turn_coefficients); fp32 math for half params."""
    alpha, beta = turn_coefficients(param, reference, strength=strength, granularity=granularity)
    w0 = reference.to(device=param.device, dtype=alpha.dtype)
    if param.dtype == alpha.dtype:
        param.mul_(alpha).addcmul_(w0, beta)
    else:  # bf16/fp16 weights: compute in fp32, round once
        param.copy_(param.to(alpha.dtype).mul_(alpha).addcmul_(w0, beta))
