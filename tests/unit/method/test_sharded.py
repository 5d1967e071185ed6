"""sharded.py on plain tensors, and BalancedAdamW under wrappers that swap its parameters
(accelerate's FSDP2 preparation, DeepSpeed ZeRO's flat partitions), in one process.
The 2-process checks on real DTensors are in tests/integration/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from dirtune.method import sharded
from dirtune.method.balanced_adamw import BalancedAdamW

F64 = torch.float64


def test_plain_tensors_pass_through():
    t = torch.randn(5, 3)
    assert not sharded.is_dtensor(t)
    assert sharded.local(t) is t and sharded.local(None) is None
    assert sharded.shard_dims(t) == ()
    assert sharded.local_rows(t, torch.empty(5, 3)) is t
    assert sharded.wrap_like(t, torch.empty(5, 3)) is t
    partials = torch.randn(3, 2)
    assert sharded.sum_over_shards(partials, [t, None, t]) is partials
    with pytest.raises(ValueError, match="3 rows of partial sums for 2 owners"):
        sharded.sum_over_shards(partials, [t, t])
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        sharded.local_rows(torch.randn(4, 3), t)


def test_deepspeed_parameters_are_recognised():
    p = torch.nn.Parameter(torch.randn(4))
    assert not sharded.is_flat_partition(p)
    p.ds_id = 7
    assert sharded.is_flat_partition(p)


def _params(seed=0, shapes=((4, 3), (5,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=F64)) for s in shapes]


def _grads(step, shapes):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g, dtype=F64) for s in shapes]


@pytest.mark.parametrize("kwargs", [dict(balance="scale"), dict(balance="selective"),
                                    dict(balance="none", direction_weight=1.0)])
def test_zero3_partitioned_parameters_refuse_structured_options(kwargs):
    params = _params()
    for p in params:
        p.ds_id = 0
    with pytest.raises(ValueError, match="DeepSpeed ZeRO.*docs/distributed.md"):
        BalancedAdamW(params, weight_decay=0.1, **kwargs)
    BalancedAdamW(params, weight_decay=0.1, balance="none")  # elementwise: accepted


def _flatten_into(opt, params):
    """What ZeRO stage 1/2 does: the group's params become one flat fp32 partition."""
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    opt.param_groups[0]["params"] = [flat]
    return flat


@pytest.mark.parametrize("kwargs", [dict(balance="scale"), dict(balance="selective"),
                                    dict(balance="none", direction_weight=1.0)])
def test_flat_partition_swapped_in_refuses_structured_options(kwargs):
    params = _params()
    opt = BalancedAdamW(params, lr=0.1, weight_decay=0.1, **kwargs)
    flat = _flatten_into(opt, params)
    flat.grad = torch.ones_like(flat)
    with pytest.raises(ValueError, match="flat partition.*balance='none' and direction_weight=0"):
        opt.step()


def test_flat_partition_with_elementwise_anchored_decay_equals_unflattened():
    """anchor 'init' + balance 'none' is elementwise, so a flat partition steps exactly like
    the tensors it concatenates; its anchor is taken at its first step (the pretrained value)."""
    ref, mine = _params(), _params()
    kw = dict(lr=0.05, weight_decay=0.5, anchor="init", balance="none", anchor_dtype=None)
    opt_ref = BalancedAdamW(ref, **kw)
    opt = BalancedAdamW(mine, **kw)
    flat = _flatten_into(opt, mine)
    for step in range(5):
        grads = _grads(step, [p.shape for p in ref])
        for p, g in zip(ref, grads):
            p.grad = g
        flat.grad = torch.cat([g.reshape(-1) for g in grads])
        opt_ref.step()
        opt.step()
    assert torch.equal(flat.detach(), torch.cat([p.detach().reshape(-1) for p in ref]))
    assert list(opt.state) == [flat]  # the unflattened anchors were dropped


def test_parameters_swapped_after_construction_are_adopted_at_first_step():
    """accelerate's FSDP2 preparation swaps each parameter for a new tensor (its shard) after
    the optimizer is built; the new ones get anchors, references and scales at step 1."""
    ref, mine = _params(shapes=((4, 3), (2, 5))), _params(shapes=((4, 3), (2, 5)))
    kw = dict(lr=0.05, weight_decay=0.5, balance="scale", direction_weight=2.0, anchor_dtype=None)
    opt_ref = BalancedAdamW(ref, **kw)
    opt = BalancedAdamW(mine, **kw)
    swapped = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    opt.param_groups[0]["params"] = swapped
    for step in range(4):
        for a, b, g in zip(ref, swapped, _grads(step, [p.shape for p in ref])):
            a.grad, b.grad = g, g.clone()
        opt_ref.step()
        opt.step()
    for a, b in zip(ref, swapped):
        assert torch.equal(a, b)
    assert set(opt.state) == set(swapped)
    assert opt.state[swapped[0]]["balance"] == opt_ref.state[ref[0]]["balance"]
