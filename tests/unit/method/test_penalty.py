"""direction_penalty / lora_direction_penalty / angle_and_drift against the plain formulas."""

from __future__ import annotations

import math

import pytest
import torch

from dirtune.method.penalty import angle_and_drift, direction_penalty, lora_direction_penalty

F64 = torch.float64
SHAPES = [(5, 7), (1, 9), (9,), (3, 4, 5), (16, 3)]


def plain(weights, refs, granularity):
    """1 − <a,b>/(|a||b|) by autograd, the textbook way (float64 ground truth)."""
    terms = []
    for w, r in zip(weights, refs):
        if granularity == "row" and w.dim() >= 2:
            a, b = w.reshape(w.shape[0], -1), r.reshape(r.shape[0], -1)
        else:
            a, b = w.reshape(1, -1), r.reshape(1, -1)
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        terms.append((1 - cos).mean())
    return torch.stack(terms).mean()


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# --- dense --------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_dense_value_and_grad_equal_plain_formula_float64(granularity):
    g = torch.Generator().manual_seed(0)
    refs = [torch.randn(s, generator=g, dtype=F64) for s in SHAPES]
    ws = [leaf(r + 0.7 * torch.randn(r.shape, generator=g, dtype=F64)) for r in refs]
    ws2 = [leaf(w) for w in ws]
    value = direction_penalty(ws, refs, granularity)
    truth = plain(ws2, refs, granularity)
    value.backward()
    truth.backward()
    assert value.dtype == F64
    assert value.item() == pytest.approx(truth.item(), rel=1e-12)
    for w, w2 in zip(ws, ws2):
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_dense_gradcheck(granularity):
    g = torch.Generator().manual_seed(1)
    r1, r2 = torch.randn(4, 6, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    w1 = leaf(r1 + torch.randn(4, 6, generator=g, dtype=F64))
    w2 = leaf(r2 + torch.randn(5, generator=g, dtype=F64))
    assert torch.autograd.gradcheck(
        lambda a, b: direction_penalty([a, b], [r1, r2], granularity), (w1, w2))


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_dense_zero_value_and_grad_at_reference(granularity):
    ref = torch.randn(8, 12)
    w = leaf(ref)
    value = direction_penalty(w, ref, granularity)
    value.backward()
    assert value.item() == 0.0
    assert torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_dense_scale_invariant_and_grad_orthogonal(granularity):
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(6, 10, generator=g, dtype=F64)
    theta = ref + 0.5 * torch.randn(6, 10, generator=g, dtype=F64)
    # a positive factor per row keeps every row's direction (and, for "tensor", use one factor)
    factor = torch.rand(6, 1, generator=g, dtype=F64) * 5 + 0.1
    if granularity == "tensor":
        factor = factor[:1]
    base = direction_penalty(theta, ref, granularity)
    scaled = direction_penalty(theta * factor, ref, granularity)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-12)
    w = leaf(theta)
    direction_penalty(w, ref, granularity).backward()
    if granularity == "row":
        dots = (w.grad * theta).sum(1) / (w.grad.norm(dim=1) * theta.norm(dim=1))
    else:
        dots = (w.grad * theta).sum() / (w.grad.norm() * theta.norm())
    assert dots.abs().max().item() < 1e-12


@pytest.mark.parametrize("target", [1e-9, 1e-8, 1e-7])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_dense_fp32_accurate_near_cos_one(target, granularity):
    g = torch.Generator().manual_seed(3)
    ref64 = torch.randn(32, 256, generator=g, dtype=F64)
    step = torch.randn(32, 256, generator=g, dtype=F64)
    step *= math.sqrt(2 * target) * ref64.norm(dim=1, keepdim=True) / step.norm(dim=1, keepdim=True)
    theta32, ref32 = (ref64 + step).float(), ref64.float()
    # truth: float64 on exactly the fp32 numbers the fp32 computation sees
    w64 = leaf(theta32.double())
    truth = plain([w64], [ref32.double()], granularity)
    truth.backward()
    assert truth.item() == pytest.approx(target, rel=0.5)        # the test sits where it claims
    w32 = leaf(theta32)
    value = direction_penalty(w32, ref32, granularity)
    value.backward()
    assert value.dtype == torch.float32
    assert abs(value.item() - truth.item()) / truth.item() < 1e-3
    grad_err = (w32.grad.double() - w64.grad).norm() / w64.grad.norm()
    assert grad_err.item() < 1e-2
    # sanity of the test: below 1e-8 the textbook formula in fp32 is off by more than 10%
    if target <= 1e-8:
        naive = plain([theta32], [ref32], granularity)
        assert abs(naive.item() - truth.item()) / truth.item() > 0.1


def test_dense_bf16_in_fp32_out():
    ref = torch.randn(8, 16).bfloat16()
    w = leaf(ref + 0.1 * torch.randn(8, 16).bfloat16())
    value = direction_penalty([w], [ref])
    value.backward()
    assert value.dtype == torch.float32
    assert w.grad.dtype == torch.bfloat16
    truth = plain([w.detach().double()], [ref.double()], "row")
    assert value.item() == pytest.approx(truth.item(), rel=1e-5)


def test_dense_zero_norm_is_finite():
    ref = torch.randn(3, 4)
    ref[1] = 0
    w = leaf(torch.randn(3, 4))
    w.data[2] = 0
    value = direction_penalty(w, ref, "row")
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(w.grad).all()
    # rows with a zero side have cos = 0 (penalty 1); row 0 is an ordinary row
    row0 = plain([w.detach()[:1]], [ref[:1]], "row")
    assert value.item() == pytest.approx((row0.item() + 2) / 3, rel=1e-5)


# --- LoRA-factored ------------------------------------------------------------------------------

LORA_SHAPES = [(6, 5, 2), (4, 3, 7), (8, 8, 1), (12, 20, 4)]       # (d, k, r), r > min(d, k) too


def dense_lora(W0, A, B, s, granularity):
    return direction_penalty([W0 + s * B @ A], [W0], granularity)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("d,k,r", LORA_SHAPES)
def test_lora_equals_dense_float64(granularity, d, k, r):
    g = torch.Generator().manual_seed(d * 100 + k * 10 + r)
    W0 = torch.randn(d, k, generator=g, dtype=F64)
    A = leaf(torch.randn(r, k, generator=g, dtype=F64))
    B = leaf(0.5 * torch.randn(d, r, generator=g, dtype=F64))
    A2, B2 = leaf(A), leaf(B)
    for s in (0.3, -2.0):
        A.grad = B.grad = A2.grad = B2.grad = None
        value = lora_direction_penalty(W0, A, B, s, granularity)
        truth = dense_lora(W0, A2, B2, s, granularity)
        value.backward()
        truth.backward()
        assert value.item() == pytest.approx(truth.item(), rel=1e-10, abs=1e-15)
        torch.testing.assert_close(A.grad, A2.grad, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(B.grad, B2.grad, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_lora_zero_at_b_zero(granularity):
    W0 = torch.randn(6, 5)
    A, B = leaf(torch.randn(3, 5)), leaf(torch.zeros(6, 3))
    value = lora_direction_penalty(W0, A, B, 2.0, granularity)
    value.backward()
    assert value.item() == 0.0
    assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_lora_fp32_accurate_near_cos_one(granularity):
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(32, 64, generator=g)
    A = torch.randn(4, 64, generator=g) / 8
    B = 1e-5 * torch.randn(32, 4, generator=g)
    value = lora_direction_penalty(W0, A, B, 2.0, granularity)
    truth = dense_lora(W0.double(), A.double(), B.double(), 2.0, granularity)
    assert 1e-12 < truth.item() < 1e-8
    assert value.dtype == torch.float32
    assert abs(value.item() - truth.item()) / truth.item() < 1e-3


def test_lora_antiparallel_and_bf16():
    W0 = torch.randn(4, 3, dtype=F64)
    A, B = leaf(torch.eye(3, dtype=F64)), leaf(-W0.clone())   # W = W0 + 2·(−W0) = −W0
    value = lora_direction_penalty(W0, A, B, 2.0, "tensor")
    value.backward()
    assert value.item() == pytest.approx(2.0) and torch.isfinite(A.grad).all()
    base = torch.randn(6, 5).bfloat16()
    a, b = leaf(torch.randn(2, 5).bfloat16()), leaf(torch.randn(6, 2).bfloat16())
    out = lora_direction_penalty(base, a, b, 0.5)
    out.backward()
    assert out.dtype == torch.float32 and b.grad.dtype == torch.bfloat16
    truth = dense_lora(base.double(), a.detach().double(), b.detach().double(), 0.5, "row")
    assert out.item() == pytest.approx(truth.item(), rel=1e-5)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_lora_batched_equals_per_layer(granularity):
    g = torch.Generator().manual_seed(6)
    shapes = [(6, 5, 2), (6, 5, 2), (4, 7, 3), (6, 5, 2), (4, 7, 3)]
    scales = [0.5, 1.5, 2.0, 0.5, 2.0]
    W0s = [torch.randn(d, k, generator=g, dtype=F64) for d, k, _ in shapes]
    As = [leaf(torch.randn(r, k, generator=g, dtype=F64)) for _, k, r in shapes]
    Bs = [leaf(torch.randn(d, r, generator=g, dtype=F64)) for d, _, r in shapes]
    As2, Bs2 = [leaf(a) for a in As], [leaf(b) for b in Bs]
    batched = lora_direction_penalty(W0s, As, Bs, scales, granularity)
    single = torch.stack([lora_direction_penalty(w, a, b, s, granularity)
                          for w, a, b, s in zip(W0s, As2, Bs2, scales)]).mean()
    batched.backward()
    single.backward()
    assert batched.item() == pytest.approx(single.item(), rel=1e-12)
    for x, y in zip(As + Bs, As2 + Bs2):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-15)
    # one scale for all layers is the same as a list of equal scales
    same = lora_direction_penalty(W0s[:2], As[:2], Bs[:2], 0.5, granularity)
    assert same.item() == pytest.approx(
        lora_direction_penalty(W0s[:2], As[:2], Bs[:2], [0.5, 0.5], granularity).item())


# --- errors -------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    w, r = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="granularity='diag'.*'row', 'tensor'"):
        direction_penalty(w, r, "diag")
    with pytest.raises(ValueError, match=r"weights\[1\] has shape \(3, 4\) but refs\[1\] has shape \(4, 3\)"):
        direction_penalty([w, w], [r, r.T], "row")
    with pytest.raises(ValueError, match="weights is empty"):
        direction_penalty([], [])
    with pytest.raises(ValueError, match="2 weights but 1 refs"):
        direction_penalty([w, w], [r])
    with pytest.raises(ValueError, match=r"weights\[0\] must be a floating-point tensor"):
        direction_penalty(torch.ones(3, dtype=torch.long), torch.ones(3))
    A, B = torch.randn(2, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match="granularity='col'"):
        lora_direction_penalty(w, A, B, 1.0, "col")
    with pytest.raises(ValueError, match=r"layer 1: base \(3, 4\), lora_A \(2, 5\)"):
        lora_direction_penalty([w, w], [A, torch.randn(2, 5)], [B, B], 1.0)
    with pytest.raises(ValueError, match="base is empty"):
        lora_direction_penalty([], [], [], 1.0)
    with pytest.raises(ValueError, match="2 scales for 1 layers"):
        lora_direction_penalty(w, A, B, [1.0, 2.0])


# --- metrics ------------------------------------------------------------------------------------


def test_angle_and_drift():
    a = math.radians(30.0)
    ref = torch.tensor([[1.0, 0.0]])
    w = 2 * torch.tensor([[math.cos(a), math.sin(a)]])
    angle, drift = angle_and_drift(w, ref)
    assert angle.item() == pytest.approx(30.0, rel=1e-5)
    assert drift.item() == pytest.approx((w - ref).norm().item(), rel=1e-6)
    # a thousandth of a degree is resolved in fp32 (acos(cos) would return 0 or ~0.02°)
    tiny = math.radians(1e-3)
    w = torch.tensor([[math.cos(tiny), math.sin(tiny)]])
    angle, drift = angle_and_drift(w, ref)
    assert angle.dtype == torch.float32
    assert angle.item() == pytest.approx(1e-3, rel=1e-3)
    assert angle_and_drift(torch.zeros(2, 2), torch.ones(2, 2))[0].item() == pytest.approx(90.0)
