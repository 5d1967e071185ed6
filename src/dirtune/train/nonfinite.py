"""The guard against non-finite weights: a NaN or Inf is never saved.

Light at import (torch is imported where used): dirtune.errors imports NonFiniteError.
"""

from __future__ import annotations

from typing import Iterable


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss, gradient or weight: the run stops before anything non-finite is saved."""


def check_finite_weights(params: Iterable, step: int) -> None:
    """NonFiniteError unless every tensor in `params` is finite."""
    import torch

    from dirtune.method.sharded import local
    from dirtune.train.distributed import any_process

    # FSDP2 weights are DTensors: check this process's shards, and decide on every process
    tensors = [local(p.detach()) for p in params]
    if not tensors:
        return
    # max |w| per tensor in one fused pass: NaN and Inf propagate, and unlike the 2-norm it
    # cannot overflow in fp16 for finite weights.
    norms = torch.stack([n.float().cpu() for n in torch._foreach_norm(tensors, float("inf"))])
    (bad,) = any_process([not bool(torch.isfinite(norms).all())], tensors[0].device)
    if bad:
        raise NonFiniteError(f"step {step}: the weights hold NaN or Inf; they were not saved and the "
                             "checkpoints already written are untouched. Lower optimizer.lr, check the "
                             "data, or resume from the last checkpoint")

