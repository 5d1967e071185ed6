"""BalancedAdamW against torch.optim.AdamW, its two paths against each other, and its promises
(anchored decay rate, scale balance, selective decay, cap, direction turn, exact resume)."""

from __future__ import annotations

import io
import math
import sys

import pytest
import torch

from dirtune.method.balanced_adamw import BalancedAdamW
from dirtune.method.update_rules import turn_coefficients

F64, F32 = torch.float64, torch.float32
FOREACH = [False, True]
DTYPES = [F64, F32]


def make_params(dtype, seed=0):
    """Three tensors in two groups: a 2-D weight, a bias, and a second 2-D weight."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (6,), (4, 6)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def groups(params, lr, wd):
    """Two groups with different lr and weight decay; the second holds two tensors."""
    return [{"params": params[:1], "lr": lr, "weight_decay": wd},
            {"params": params[1:], "lr": lr / 3, "weight_decay": wd * 3}]


def run(params, opt, steps, seed=1, skip_last_every=2):
    """`steps` steps with seeded random gradients; the last tensor has no gradient every other
    step, so per-tensor step counts differ."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.grad = None if (i == len(params) - 1 and t % skip_last_every == 1) else grad
        opt.step()
    return params


# --- reproduces torch.optim.AdamW ----------------------------------------------------------------

# (kwargs, steps): weight_decay = 0 whatever anchor/balance, and anchor "zero" + balance "none".
ADAMW_ROWS = [
    (dict(weight_decay=0.0, anchor="init", balance="scale"), 25),
    (dict(weight_decay=0.0, anchor="init", balance="selective"), 25),
    (dict(weight_decay=0.0, anchor="zero", balance="scale"), 25),
    (dict(weight_decay=0.0, anchor="none", balance="none"), 25),
    (dict(weight_decay=0.1, anchor="zero", balance="none"), 25),
    (dict(weight_decay=0.3, anchor="zero", balance="none", betas=(0.8, 0.95), eps=1e-6), 20),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("kwargs,steps", ADAMW_ROWS)
def test_equals_torch_adamw(kwargs, steps, foreach, dtype):
    kw = dict(kwargs)
    wd = kw.pop("weight_decay")
    extra = {k: kw.pop(k) for k in ("betas", "eps") if k in kw}
    ours, theirs = make_params(dtype), make_params(dtype)
    run(ours, BalancedAdamW(groups(ours, 1e-2, wd), foreach=foreach, **extra, **kw), steps)
    run(theirs, torch.optim.AdamW(groups(theirs, 1e-2, wd), foreach=foreach, **extra), steps)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b), (a - b).abs().max()


# --- the foreach path equals the single-tensor path ----------------------------------------------

ALL_MODES = [
    (dict(weight_decay=0.5, anchor="init", balance="none"), 20),
    (dict(weight_decay=0.5, anchor="init", balance="scale"), 20),
    (dict(weight_decay=2.0, anchor="init", balance="selective"), 20),
    (dict(weight_decay=0.5, anchor="zero", balance="scale"), 20),
    (dict(weight_decay=2.0, anchor="zero", balance="selective"), 20),
    (dict(weight_decay=0.5, anchor="init", balance="scale", direction_weight=3.0), 20),
    (dict(weight_decay=0.5, anchor="zero", balance="none", direction_weight=3.0,
          granularity="tensor"), 20),
    (dict(weight_decay=0.0, anchor="none", balance="none", direction_weight=50.0), 20),
    (dict(weight_decay=1e4, anchor="init", balance="scale", anchor_dtype=F32), 5),  # capped at 1
    (dict(weight_decay=0.5, anchor="init", balance="selective", anchor_dtype=None,
          anchor_device="cpu", direction_weight=1.0), 20),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs,steps", ALL_MODES)
def test_foreach_equals_single_tensor(kwargs, steps, dtype):
    kw = dict(kwargs)
    wd = kw.pop("weight_decay")
    loop, multi = make_params(dtype), make_params(dtype)
    opt_loop = BalancedAdamW(groups(loop, 1e-2, wd), foreach=False, **kw)
    opt_multi = BalancedAdamW(groups(multi, 1e-2, wd), foreach=True, **kw)
    run(loop, opt_loop, steps)
    run(multi, opt_multi, steps)
    for a, b in zip(loop, multi):
        assert torch.equal(a, b), (a - b).abs().max()
        for key, value in opt_loop.state[a].items():
            other = opt_multi.state[b][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


@pytest.mark.parametrize("kwargs,steps", ALL_MODES[:7])
def test_gradients_are_not_modified(kwargs, steps):
    params = make_params(F32)
    opt = BalancedAdamW(params, lr=1e-2, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    opt.step()
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


# --- what the decay promises ---------------------------------------------------------------------


def offset_params(anchors, rel_offset, seed=0):
    """Parameters a + δ with ||δ||/||a|| = rel_offset, built after the optimizer took a as anchor."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(a.clone()) for a in anchors]
    deltas = []
    for p in params:
        d = torch.randn(p.shape, generator=g, dtype=p.dtype)
        deltas.append(d * (rel_offset * p.norm() / d.norm()))
    return params, deltas


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("balance", ["none", "scale"])
def test_offset_shrinks_by_one_minus_eta_lambda_b_with_zero_grads(balance, foreach):
    g = torch.Generator().manual_seed(0)
    anchors = [torch.randn(8, 4, generator=g, dtype=F64), 100 * torch.randn(5, generator=g, dtype=F64)]
    params, deltas = offset_params(anchors, 0.1)
    lr, wd = 1e-2, 0.7
    opt = BalancedAdamW(params, lr=lr, weight_decay=wd, balance=balance, anchor_dtype=None, foreach=foreach)
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.add_(d)
    rms = [a.square().mean().sqrt().item() for a in anchors]
    b = [1.0, 1.0] if balance == "none" else [sum(rms) / 2 / r for r in rms]
    for _ in range(10):
        for p in params:
            p.grad = torch.zeros_like(p)  # Adam's step is 0: m = 0
        opt.step()
    for p, a, d, bi in zip(params, anchors, deltas, b):
        expected = d * (1 - lr * wd * bi) ** 10
        torch.testing.assert_close(p - a, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("foreach", FOREACH)
def test_scale_balance_gives_equal_relative_drift_at_equilibrium(foreach):
    """Adam's step is ~η per element whatever the scale; with b_i = s̄/rms(a_i) the equilibrium
    offset 1/(λ·b_i) per element is the same share of every tensor's scale: 1/(λ·s̄)."""
    g = torch.Generator().manual_seed(0)
    anchors = []
    for scale in (1.0, 100.0):
        a = torch.randn(32, generator=g, dtype=F64)
        anchors.append(a * (scale / a.square().mean().sqrt()))  # rms 1 and rms 100
    drifts = {}
    for balance in ("none", "scale"):
        params = [torch.nn.Parameter(a.clone()) for a in anchors]
        lr, wd = 1e-2, 1.5
        opt = BalancedAdamW(params, lr=lr, weight_decay=wd, balance=balance, anchor_dtype=None,
                            foreach=foreach)
        for _ in range(1500):
            for p in params:
                p.grad = torch.ones_like(p)  # constant gradient: m̂/√v̂ = 1
            opt.step()
        drifts[balance] = [((p - a).norm() / a.norm()).item() for p, a in zip(params, anchors)]
    s_bar = (1.0 + 100.0) / 2
    assert drifts["scale"] == pytest.approx([1 / (wd * s_bar)] * 2, rel=1e-3)
    assert drifts["none"][0] / drifts["none"][1] == pytest.approx(100.0, rel=1e-3)  # unbalanced


@pytest.mark.parametrize("anchor", ["init", "zero"])
@pytest.mark.parametrize("foreach", FOREACH)
def test_selective_decays_only_when_gradient_points_back_to_anchor(anchor, foreach):
    """Run selective decay beside λ = 0 on the same values and gradients: their difference is the
    decay, which must be −k·(θ − a) when <g, θ − a> > 0 and exactly 0 otherwise."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(6, 5, generator=g, dtype=F64)
    theta = torch.nn.Parameter(start.clone())
    twin = torch.nn.Parameter(start.clone())
    lr, wd = 1e-2, 3.0
    opt = BalancedAdamW([theta], lr=lr, weight_decay=wd, anchor=anchor, balance="selective",
                        anchor_dtype=None, foreach=foreach)
    ref_opt = BalancedAdamW([twin], lr=lr, weight_decay=0.0, anchor=anchor, anchor_dtype=None,
                            foreach=foreach)
    a = start if anchor == "init" else torch.zeros_like(start)
    with torch.no_grad():
        theta.add_(0.5 * torch.randn(theta.shape, generator=g, dtype=F64))
    decayed = []
    for t in range(12):
        with torch.no_grad():
            twin.copy_(theta)
        offset = (theta - a).detach()
        sign = 1.0 if t % 3 == 0 else -1.0  # <g, θ − a> > 0 on every third step
        grad = sign * offset + 0.1 * torch.randn(offset.shape, generator=g, dtype=F64)
        theta.grad, twin.grad = grad, grad.clone()
        opt.step()
        ref_opt.step()
        diff = theta.detach() - twin.detach()
        if (grad * offset).sum() > 0:
            decayed.append(t)
            torch.testing.assert_close(diff, -lr * wd * offset, rtol=1e-9, atol=1e-15)
        else:
            assert torch.equal(diff, torch.zeros_like(diff))
    assert decayed == [0, 3, 6, 9]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("balance", ["none", "scale"])
@pytest.mark.parametrize("anchor,anchor_dtype", [("init", torch.bfloat16), ("init", None), ("zero", None)])
def test_huge_decay_is_capped_and_lands_exactly_on_the_anchor(anchor, anchor_dtype, balance, foreach):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=g)
    p = torch.nn.Parameter(start.clone())
    opt = BalancedAdamW([p], lr=1.0, weight_decay=1e6, anchor=anchor, anchor_dtype=anchor_dtype,
                        balance=balance, foreach=foreach)
    with torch.no_grad():
        p.add_(torch.randn(p.shape, generator=g))
    p.grad = torch.zeros_like(p)
    opt.step()
    target = opt.state[p]["anchor"].float() if anchor == "init" else torch.zeros_like(start)
    assert torch.equal(p.detach(), target)


# --- the decoupled direction turn ----------------------------------------------------------------


def rows_cos(w, w0, granularity):
    if granularity == "tensor":
        w, w0 = w.reshape(1, -1), w0.reshape(1, -1)
    return (w * w0).sum(1) / (w.norm(dim=1) * w0.norm(dim=1))


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("anchor", ["init", "zero"])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_turn_keeps_norm_to_first_order_and_reduces_angle(granularity, anchor, foreach):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(7, 9, generator=g, dtype=F64)
    p = torch.nn.Parameter(ref.clone())
    lr, kappa = 1e-2, 0.05
    opt = BalancedAdamW([p], lr=lr, direction_weight=kappa / lr, anchor=anchor, anchor_dtype=None,
                        granularity=granularity, foreach=foreach)
    with torch.no_grad():
        p.add_(0.8 * torch.randn(p.shape, generator=g, dtype=F64))
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)
    opt.step()
    after = p.detach()
    dims = 1 if granularity == "row" else (0, 1)
    n0, n1 = before.norm(dim=dims), after.norm(dim=dims)
    sin = (1 - rows_cos(before, ref, granularity) ** 2).sqrt()
    # ||θ'|| = ||θ||·sqrt(1 + κ² sin²): relative change O(κ²), no first-order term
    torch.testing.assert_close(n1 / n0, (1 + kappa**2 * sin**2).sqrt().reshape(n0.shape))
    assert ((n1 / n0 - 1).abs() <= kappa**2).all()
    ang0, ang1 = rows_cos(before, ref, granularity).acos(), rows_cos(after, ref, granularity).acos()
    assert (ang1 < ang0).all()
    torch.testing.assert_close(ang0 - ang1, kappa * sin, rtol=0.1, atol=0)  # ≈ κ·sin∠ per step


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_turn_with_full_strength_never_passes_the_reference(granularity):
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(6, 8, generator=g, dtype=F64)
    w = ref + 2.0 * torch.randn(6, 8, generator=g, dtype=F64)
    alpha, beta = turn_coefficients(w, ref, strength=1.0, granularity=granularity)
    new = alpha * w + beta * ref
    # the part of θ orthogonal to θ0 keeps its sign: the turn stops short of θ0
    if granularity == "tensor":
        w, ref, new = w.reshape(1, -1), ref.reshape(1, -1), new.reshape(1, -1)
    u0 = ref / ref.norm(dim=1, keepdim=True)
    perp_before = w - (w * u0).sum(1, keepdim=True) * u0
    perp_after = new - (new * u0).sum(1, keepdim=True) * u0
    assert ((perp_before * perp_after).sum(1) > 0).all()
    assert (rows_cos(new, ref, "row") > rows_cos(w, ref, "row")).all()


def test_turn_leaves_zero_rows_alone():
    ref = torch.randn(3, 4)
    ref[1] = 0
    w = torch.randn(3, 4)
    w[2] = 0
    alpha, beta = turn_coefficients(w, ref, strength=0.5, granularity="row")
    new = alpha * w + beta * ref
    assert torch.equal(new[1], w[1]) and torch.equal(new[2], w[2])
    assert torch.isfinite(new).all()


# --- state_dict round trip -----------------------------------------------------------------------

RESUME_ROWS = [
    dict(weight_decay=0.5, balance="scale", direction_weight=2.0),
    dict(weight_decay=2.0, balance="selective", granularity="tensor", direction_weight=2.0),
    dict(weight_decay=0.5, anchor="zero", balance="scale", direction_weight=2.0),
    dict(weight_decay=0.5, balance="none", anchor_device="cpu"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("kwargs", RESUME_ROWS)
def test_state_dict_round_trip_continues_bitwise(kwargs, foreach, dtype):
    straight = make_params(dtype)
    opt = BalancedAdamW(groups(straight, 1e-2, kwargs["weight_decay"]), foreach=foreach,
                        **{k: v for k, v in kwargs.items() if k != "weight_decay"})
    run(straight, opt, 5, seed=1)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in straight]
    # a fresh optimizer on the *current* values: its own anchors are wrong until the load
    new = BalancedAdamW(groups(resumed, 1e-2, kwargs["weight_decay"]), foreach=foreach,
                        **{k: v for k, v in kwargs.items() if k != "weight_decay"})
    buffer.seek(0)
    new.load_state_dict(torch.load(buffer, weights_only=True))
    run(straight, opt, 5, seed=2)
    run(resumed, new, 5, seed=2)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b), (a - b).abs().max()
        for key in ("anchor", "reference"):
            if key in opt.state[a]:
                assert new.state[b][key].dtype == torch.bfloat16  # not cast to the param's dtype
                assert torch.equal(new.state[b][key], opt.state[a][key])
        assert new.state[b].get("balance") == opt.state[a].get("balance")


def test_load_keeps_anchors_wider_than_the_parameter():
    p = torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16))
    opt = BalancedAdamW([p], weight_decay=0.1, anchor_dtype=F64)
    state = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    new = BalancedAdamW([q], weight_decay=0.1, anchor_dtype=F64)
    new.load_state_dict(state)
    assert new.state[q]["anchor"].dtype == F64


# --- validation ----------------------------------------------------------------------------------

INVALID = [
    (dict(lr=-1e-3), "learning rate", "-0.001"),
    (dict(lr=float("nan")), "learning rate", "nan"),
    (dict(lr="1e-3"), "learning rate", "'1e-3'"),
    (dict(lr=torch.tensor(1e-3)), "learning rate", "tensor"),
    (dict(eps=-1.0), "epsilon", "-1.0"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0", "1.0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1", "-0.1"),
    (dict(betas=(0.9,)), "betas", "(0.9,)"),
    (dict(weight_decay=-0.1), "weight_decay", "-0.1"),
    (dict(anchor="pretrained"), "anchor", "'pretrained'"),
    (dict(balance="rms"), "balance", "'rms'"),
    (dict(direction_weight=-1.0), "direction_weight", "-1.0"),
    (dict(direction_weight=None), "direction_weight", "None"),
    (dict(anchor_dtype=torch.int8), "anchor_dtype", "torch.int8"),
    (dict(anchor_dtype="bf16"), "anchor_dtype", "'bf16'"),
    (dict(granularity="column"), "granularity", "'column'"),
    (dict(anchor_device="cuda"), "anchor_device", "'cuda'"),
    (dict(foreach=True, fused=True), "foreach/fused", "both True"),
]


@pytest.mark.parametrize("kwargs,name,value", INVALID)
def test_invalid_argument_raises_naming_it(kwargs, name, value):
    with pytest.raises(ValueError, match="Invalid") as info:
        BalancedAdamW([torch.nn.Parameter(torch.ones(2, 2))], **kwargs)
    assert name in str(info.value) and value in str(info.value)


@pytest.mark.parametrize("kwargs,name,value", INVALID[:-1])
def test_invalid_option_in_a_later_group_raises(kwargs, name, value):
    opt = BalancedAdamW([torch.nn.Parameter(torch.ones(2, 2))])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], **kwargs})


def test_complex_params_and_sparse_grads_are_refused():
    with pytest.raises(ValueError, match="complex"):
        BalancedAdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    p = torch.nn.Parameter(torch.ones(3, 2))
    opt = BalancedAdamW([p])
    p.grad = torch.ones(3, 2).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_fused_without_the_kernel_module_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "dirtune.method.fused", None)  # as if the module were absent
    with pytest.raises(ValueError, match="dirtune.method.fused"):
        BalancedAdamW([torch.nn.Parameter(torch.ones(2))], fused=True)


def test_turn_without_a_stored_reference_says_how_to_fix():
    p = torch.nn.Parameter(torch.ones(2, 2))
    opt = BalancedAdamW([p], anchor="zero")
    opt.param_groups[0]["direction_weight"] = 1.0  # turned on after construction: no reference
    p.grad = torch.ones(2, 2)
    with pytest.raises(ValueError, match="at construction"):
        opt.step()


def test_later_group_takes_its_anchors_when_added():
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.full((3,), 2.0))
    opt = BalancedAdamW([first])
    with torch.no_grad():
        second.mul_(3)  # changes before the group is added belong to its anchor
    opt.add_param_group({"params": [second], "anchor": "init", "weight_decay": 0.1})
    assert torch.equal(opt.state[second]["anchor"], torch.full((3,), 6.0, dtype=torch.bfloat16))


# --- it trains -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, dict(lr=1e-2, weight_decay=0.1, direction_weight=1.0)])
def test_tiny_linear_model_loss_falls(kwargs):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 2) + 0.5
    model = torch.nn.Linear(8, 2)
    opt = BalancedAdamW(model.parameters(), **kwargs)
    losses = []
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(math.isfinite(v) for v in losses)
