"""What the penalty, the optimizer and their fused paths share: the norm floor, the accumulation
dtype, the argument checks and the turn's (α, β). Imports only torch; every other module of
dirtune.method may import it, and it imports none of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

EPS = 1e-12
"""Norm floor ε of the penalty (penalty.py's docstring); squared, 1e-24 is still a normal fp32 number."""

ANCHORS = ("init", "zero", "none")
BALANCES = ("none", "scale", "selective")
GRANULARITIES = ("row", "tensor")


def accumulation_dtype(*xs: Tensor | torch.dtype) -> torch.dtype:
    """float64 if any input (a tensor or a dtype) is float64, else float32: sums and norms never
    run in bf16/fp16."""
    dtypes = [x if isinstance(x, torch.dtype) else x.dtype for x in xs]
    return torch.float64 if torch.float64 in dtypes else torch.float32


# ---------------------------------------------------------------- argument checks


def check_choice(what: str, value, accepted: tuple) -> None:
    """The optimizer's ladder style: `Invalid <what>: <value>; expected one of <accepted>`."""
    if value not in accepted:
        raise ValueError(f"Invalid {what}: {value!r}; expected one of {accepted}")


def check_granularity(fn: str, granularity: str) -> bool:
    """The penalty functions' style; True for "row", a ValueError naming the bad value otherwise."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"{fn}: granularity={granularity!r} is not supported; accepted: 'row', 'tensor'")
    return granularity == "row"


def as_list(fn: str, name: str, value) -> list:
    """A tensor or a list/tuple of tensors as a list; a ValueError naming `name` otherwise."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    raise ValueError(f"{fn}: {name} must be a tensor or a list/tuple of tensors, "
                     f"got {type(value).__name__}")


def check_floating(fn: str, name: str, i: int, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{fn}: {name}[{i}] must be a floating-point tensor, got {what}")


# ---------------------------------------------------------------- the decoupled turn


def turn_from_sums(norm: Tensor, norm0: Tensor, inner: Tensor, strength: float) -> tuple[Tensor, Tensor]:
    """(α, β) = (1 − κ·c, κ·||θ||/||θ0||) with c = <θ, θ0>/(||θ||·||θ0||) and κ = `strength`,
    so that α·θ + β·θ0 = θ + κ·||θ||·(u0 − c·u); a zero norm gives (1, 0)."""
    inv_norm = torch.where(norm > 0, norm.reciprocal(), 0.0)
    inv_norm0 = torch.where(norm0 > 0, norm0.reciprocal(), 0.0)
    cos = inner * inv_norm * inv_norm0
    alpha = 1.0 - strength * cos
    beta = strength * norm * inv_norm0
    return alpha, beta
