"""Per-tensor sums over sharded parameters, so the method stays exact under FSDP2 (and refuses
DeepSpeed ZeRO's flat partitions where it cannot be).

FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps every parameter as a DTensor sharded along
dim 0 (`Shard(0)`): each rank holds whole output rows. So

- a *row* quantity (a row's norm, its cosine to the reference, its turn) is local: the local
  shard's rows are complete rows, nothing is communicated;
- a *tensor* quantity (`||θ||`, `<θ, θ0>`, `rms(a)`, `<g, θ − a>`) is a sum over all shards:
  each rank sums its local shard, and the partial sums of all tensors of a step go through one
  all-reduce (SUM) per process group (`sum_over_shards`), not one per tensor.

Placements other than `Shard(0)` and `Replicate` (tensor parallel `Shard(1)`, `Partial`,
strided shards) are refused with a ValueError: rows would then be split across ranks.

DeepSpeed ZeRO hands the optimizer flat 1-D partitions that mix pieces of many tensors, so rows
and tensors cannot be told apart there; `is_flat_partition` recognises DeepSpeed's parameters
(they carry `ds_id` / `ds_tensor`) and the optimizer refuses every option that needs per-tensor
or per-row structure (see docs/distributed.md).

Imports only torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch.distributed.tensor is public from torch 2.4; absent on builds without distributed
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - a torch built without distributed support
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = ["is_dtensor", "local", "local_rows", "wrap_like", "shard_dims", "sum_over_shards",
           "is_flat_partition"]


def is_dtensor(t: object) -> bool:
    """True for a torch.distributed.tensor.DTensor (an FSDP2 parameter, its grad or its state)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor | None) -> Tensor | None:
    """The local shard of a DTensor (a view of its storage: in-place updates reach the DTensor),
    else `t` itself. Differentiable when grad mode is on: the gradient comes back as a DTensor
    with the same placements."""
    if t is None or not is_dtensor(t):
        return t
    return t.to_local()


def shard_dims(t: Tensor) -> tuple[int, ...]:
    """Mesh dims along which DTensor `t` is sharded by rows (`Shard(0)`); () for a plain tensor
    or a replicated DTensor. Raises ValueError for any placement that splits rows."""
    if not is_dtensor(t):
        return ()
    dims = []
    for d, placement in enumerate(t.placements):
        if type(placement) is Shard and placement.dim == 0:   # exact type: not a strided shard
            dims.append(d)
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"sharded parameter of shape {tuple(t.shape)} has placements {tuple(t.placements)}; "
                "dirtune's method supports Shard(0) (FSDP2's fully_shard: whole rows per rank) and "
                "Replicate only, because other placements split output rows across ranks")
    return tuple(dims)


def _group_key(t: Tensor):
    dims = shard_dims(t)
    return (t.device_mesh, dims) if dims else None


def sum_over_shards(partials: Tensor, owners: Sequence[Tensor | None]) -> Tensor:
    """Full sums from local partial sums: row i of `partials` ((n, ...), any float dtype) is a sum
    over the local shard of `owners[i]`; rows of row-sharded DTensor owners are all-reduced (SUM)
    over the owner's shard groups, other rows are returned as given.

    One all-reduce per distinct (mesh, sharded mesh dim) — with FSDP2, one for the whole call.
    Not differentiable (the optimizer's and the penalty's own backward use it under no_grad).
    """
    if partials.shape[0] != len(owners):
        raise ValueError(f"sum_over_shards: {partials.shape[0]} rows of partial sums for "
                         f"{len(owners)} owners")
    groups: dict = {}
    for i, owner in enumerate(owners):
        key = None if owner is None else _group_key(owner)
        if key is not None:
            groups.setdefault(key, []).append(i)
    if not groups:
        return partials
    out = partials.clone()
    for (mesh, dims), rows in groups.items():
        index = torch.tensor(rows, device=partials.device)
        # One contiguous buffer is one message; gloo and NCCL reduce float64 as given.
        buf = out.index_select(0, index).contiguous()
        # CPU-offloaded shards on a CUDA mesh: NCCL reduces device memory only.
        buf = buf.to(mesh.device_type) if buf.device.type != mesh.device_type else buf
        for d in dims:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        out.index_copy_(0, index, buf.to(out.device))
    return out


def local_rows(full: Tensor, like: Tensor) -> Tensor:
    """The rows of the full (unsharded) tensor `full` that DTensor `like` holds on this rank, as a
    view; `full` itself when `like` is not row-sharded. Follows DTensor's `Shard(0)` layout
    (`torch.chunk` along dim 0, nested in mesh-dim order), which is FSDP2's."""
    if full.shape != like.shape:
        raise ValueError(f"local_rows: the full tensor has shape {tuple(full.shape)} but the "
                         f"sharded one {tuple(like.shape)}")
    out = full
    for d in shard_dims(like):
        mesh = like.device_mesh
        size, coord = mesh.size(d), mesh.get_local_rank(d)
        chunks = torch.chunk(out, size, dim=0)
        # torch.chunk gives fewer chunks than ranks when rows are few: the last ranks hold none.
        out = chunks[coord] if coord < len(chunks) else out[:0]
    return out


def wrap_like(local_tensor: Tensor, like: Tensor) -> Tensor:
    """`local_tensor` (this rank's shard) as a DTensor with `like`'s mesh, placements and global
    shape; `local_tensor` unchanged when `like` is a plain tensor. No communication."""
    if not is_dtensor(like):
        return local_tensor
    return DTensor.from_local(local_tensor, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def is_flat_partition(p: Tensor) -> bool:
    """True for a DeepSpeed ZeRO parameter (it carries `ds_id` or `ds_tensor`): what the
    optimizer then steps is a flat 1-D partition in which rows and tensors are not identifiable."""
    return hasattr(p, "ds_id") or hasattr(p, "ds_tensor")
