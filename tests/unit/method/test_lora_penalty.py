"""lora_penalty.py's fast path for bf16 bases: the three-way bf16 split of the fp32 side, the
split GEMM (emulated on the CPU: bf16 x bf16 products are exact in fp32, as in the GPU's GEMM
with fp32 accumulation), and the precomputed base norms. The value against the plain formula is
in test_penalty.py."""

from __future__ import annotations

import pytest
import torch

from dirtune.method import lora_penalty
from dirtune.method.lora_penalty import _split3, _split_matmul, base_row_norms, lora_direction_penalty


def emulated_mm(a, b):
    assert a.dtype == b.dtype == torch.bfloat16  # the GEMM only ever sees bf16 inputs
    return a.double().mm(b.double()).float()     # exact products, accumulation finer than the GPU's


def test_split3_holds_an_fp32_tensor_to_its_last_bits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=g) * torch.logspace(-20, 20, 33)
    parts = _split3(x).view(3, 64, 33)
    assert parts.dtype == torch.bfloat16
    back = (parts[2].double() + parts[1].double()) + parts[0].double()
    assert ((back - x.double()).abs() <= x.double().abs() * 2.0**-24).all()


@pytest.mark.parametrize("split_first", [False, True])
def test_split_matmul_equals_the_fp32_product(split_first):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(48, 40, generator=g).bfloat16()
    if split_first:  # backward: grad_Cᵀ (r, d) @ W0 (d, k)
        other = torch.randn(5, 48, generator=g)
        got = _split_matmul(other, base, split_first=True, mm=emulated_mm)
        truth = other.double() @ base.double()
    else:            # forward: W0 (d, k) @ Aᵀ (k, r)
        other = torch.randn(40, 5, generator=g)
        got = _split_matmul(base, other, split_first=False, mm=emulated_mm)
        truth = base.double() @ other.double()
    assert got.dtype == torch.float32 and got.shape == truth.shape
    scale = truth.abs().max()
    assert (got.double() - truth).abs().max() <= 1e-6 * scale
    # what a plain bf16 GEMM would give (A rounded to bf16) is far coarser: the split matters
    rounded = (other.bfloat16().double() @ base.double()) if split_first else (base.double() @ other.bfloat16().double())
    assert (rounded - truth).abs().max() > 100 * (got.double() - truth).abs().max()


def test_fast_path_penalty_and_gradients_match_the_fp32_path(monkeypatch):
    g = torch.Generator().manual_seed(2)
    bases = [torch.randn(32, 24, generator=g).bfloat16() for _ in range(3)]
    As = [(0.1 * torch.randn(4, 24, generator=g)).requires_grad_() for _ in range(3)]
    Bs = [(0.1 * torch.randn(32, 4, generator=g)).requires_grad_() for _ in range(3)]

    def run():
        for t in (*As, *Bs):
            t.grad = None
        value = lora_direction_penalty(bases, As, Bs, 2.0)
        value.backward()
        return value.detach(), [t.grad.clone() for t in (*As, *Bs)]

    slow, slow_grads = run()
    monkeypatch.setattr(lora_penalty, "_fast_path", lambda base, compute: True)
    monkeypatch.setattr(lora_penalty, "_mm_fp32_out", emulated_mm)
    fast, fast_grads = run()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_fast_path_falls_back_where_the_gemm_is_missing(monkeypatch):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 8, generator=g).bfloat16()
    A, B = 0.1 * torch.randn(2, 8, generator=g), 0.1 * torch.randn(16, 2, generator=g)
    expected = lora_direction_penalty(base, A, B, 1.0)

    def missing(a, b):
        raise RuntimeError("Could not run 'aten::mm.dtype' with arguments from the 'CPU' backend")

    monkeypatch.setattr(lora_penalty, "_SPLIT_OK", {})
    monkeypatch.setattr(lora_penalty, "_fast_path",
                        lambda base, compute: lora_penalty._SPLIT_OK.get(base.device.type, True))
    monkeypatch.setattr(lora_penalty, "_mm_fp32_out", missing)
    assert lora_direction_penalty(base, A, B, 1.0).item() == expected.item()
    assert lora_penalty._SPLIT_OK == {"cpu": False}  # tried once, then not again


def test_given_base_norms_are_used_and_checked():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(16, 8, generator=g)
    A, B = torch.randn(2, 8, generator=g), torch.randn(16, 2, generator=g)
    n0 = base_row_norms(base)
    torch.testing.assert_close(n0, (base.double() ** 2).sum(1).float())
    assert lora_direction_penalty(base, A, B, 1.0, base_sq_norms=[n0]).item() == pytest.approx(
        lora_direction_penalty(base, A, B, 1.0).item(), rel=1e-6)
    # the given norms are what the penalty reads: doubling them changes the value
    assert lora_direction_penalty(base, A, B, 1.0, base_sq_norms=[4 * n0]).item() != pytest.approx(
        lora_direction_penalty(base, A, B, 1.0).item(), rel=1e-3)
    with pytest.raises(ValueError, match=r"base_sq_norms\[0\] has shape \(15,\); the base has 16 rows"):
        lora_direction_penalty(base, A, B, 1.0, base_sq_norms=[n0[:15]])
    with pytest.raises(ValueError, match="got 2 base_sq_norms for 1 layers"):
        lora_direction_penalty(base, A, B, 1.0, base_sq_norms=[n0, n0])
