"""The penalty's Triton path (dirtune.method.penalty_fused) against the plain-torch reference,
in Triton's interpreter on CPU tensors (skipped without Triton, as in test_fused.py), and the
kernels' lowering to sm_90 PTX (no GPU needed)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from dirtune.method.lora_penalty import lora_angle_and_drift, lora_direction_penalty
from dirtune.method.penalty import angle_and_drift, angles_and_drifts, direction_penalty
from dirtune.models.direction import DirectionPenalty

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16

if "triton" not in sys.modules:   # the interpreter must be on before Triton's first import
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def pf(monkeypatch):
    pytest.importorskip("triton")
    mod = importlib.import_module("dirtune.method.penalty_fused")
    if not mod.interpreted():
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 could be set; run this file alone")
    monkeypatch.setattr(mod, "ROW_TILE", 64)      # several column tiles and row blocks per tensor
    monkeypatch.setattr(mod, "MAX_COLS", 16)
    monkeypatch.setattr(mod, "LORA_BM", 16)
    monkeypatch.setattr(mod, "LORA_BK", 16)
    monkeypatch.setattr(mod, "LORA_GRAD_BK", 16)
    monkeypatch.setattr(mod, "LORA_BD", 16)
    return mod


def _pairs(dtype, seed=0):
    """Weights and references of three shapes (two tensors share one), a zero row in a weight and
    in a reference, a 1-D tensor, and a reference that is a rescaled copy (penalty 0)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 45), (37, 45), (20, 7), (9,), (5, 33)]
    ws = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    rs = [w + 0.02 * torch.randn(w.shape, generator=g, dtype=F64) for w in ws]
    ws[1][5] = 0
    rs[2][3] = 0
    rs[4] = 3 * ws[4]
    return [w.to(dtype) for w in ws], [r.to(dtype) for r in rs]


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (F32, 2e-6), (BF16, 2e-6)])
def test_dense_value_and_gradient_match_the_reference(pf, dtype, tol):
    ws, rs = _pairs(dtype)
    got_w = [w.clone().requires_grad_() for w in ws]
    val = direction_penalty(got_w, rs, fused=True)
    val.backward()
    # the reference in float64 from the same (rounded) inputs
    ref_w = [w.double().requires_grad_() for w in ws]
    ref = direction_penalty(ref_w, [r.double() for r in rs], fused=False)
    ref.backward()
    assert val.dtype == (F64 if dtype == F64 else F32)
    assert float(val.detach()) == pytest.approx(float(ref.detach()), rel=tol)
    scale = max(float(b.grad.abs().max()) for b in ref_w)
    for a, b in zip(got_w, ref_w):
        assert a.grad.dtype == dtype
        # the gradient is rounded once to the weight's dtype
        grad_tol = tol if dtype != BF16 else 2 ** -8
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=grad_tol, atol=grad_tol * scale)


def test_dense_fused_is_zero_at_the_reference_and_scale_invariant(pf):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=g)
    assert float(direction_penalty([w], [w.clone()], fused=True)) == 0.0
    r = w + 0.05 * torch.randn(24, 40, generator=g)
    a = float(direction_penalty([w], [r], fused=True))
    rows = torch.rand(24, 1, generator=g) + 0.5
    assert float(direction_penalty([w * rows], [r], fused=True)) == pytest.approx(a, rel=1e-5)


def test_dense_fused_passes_gradcheck_in_float64(pf):
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(6, 9, generator=g, dtype=F64, requires_grad=True),
          torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)]
    rs = [w.detach() + 0.3 * torch.randn(w.shape, generator=g, dtype=F64) for w in ws]
    assert torch.autograd.gradcheck(lambda *x: direction_penalty(list(x), rs, fused=True), ws)


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(16, 24, bias=False))
    model.add_module("up_proj", torch.nn.Linear(24, 16, bias=False))
    return model


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_direction_penalty_adds_its_gradient_into_grad_at_the_end_of_backward(pf, micro_batches):
    """The fused path in one process writes λ∇R into `.grad` after the model's own gradient:
    the same `.grad` as the reference path, also accumulated over micro-batches."""
    grads = {}
    for fused in (False, True):
        model = _model()
        pen = DirectionPenalty(model, 10.0, targets=["q_proj", "up_proj"], reference_dtype=F32,
                               fused=fused)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
        for _ in range(micro_batches):
            (model(x).square().mean() + pen()).backward()
        grads[fused] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cached_tables_follow_new_tensors(pf):
    """The address tables are cached by content: a second call on the same tensors uploads
    nothing new, and new tensors (other addresses) get their own tables, so values stay right."""
    ws, rs = _pairs(F32, seed=8)
    first = float(direction_penalty(ws, rs, fused=True))
    n = len(pf._UPLOADS)
    assert float(direction_penalty(ws, rs, fused=True)) == first and len(pf._UPLOADS) == n
    ws2 = [w.flip(0).contiguous() for w in ws]
    rs2 = [r.flip(0).contiguous() for r in rs]
    got = float(direction_penalty(ws2, rs2, fused=True))
    want = float(direction_penalty([w.double() for w in ws2], [r.double() for r in rs2], fused=False))
    assert got == pytest.approx(want, rel=2e-6) and len(pf._UPLOADS) > n


def test_autograd_grad_still_returns_the_penalty_gradient(pf):
    """torch.autograd.grad accumulates into no .grad: the fused path hands the gradient back."""
    model = _model()
    pen = DirectionPenalty(model, 1.0, targets=["q_proj"], reference_dtype=F32, fused=True)
    w = model.q_proj.weight
    with torch.no_grad():
        w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(7)))
    (got,) = torch.autograd.grad(pen(), [w])
    (want,) = torch.autograd.grad(direction_penalty([w], pen._refs(), fused=False), [w])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert w.grad is None


@pytest.mark.parametrize("base_dtype", [F32, BF16])
@pytest.mark.parametrize("r", [5, 16])
def test_lora_projection_matches_the_reference(pf, base_dtype, r):
    g = torch.Generator().manual_seed(5)
    shapes = [(40, 70), (40, 70), (70, 40)]
    bases = [torch.randn(s, generator=g).to(base_dtype) for s in shapes]
    As = [(0.1 * torch.randn(r, s[1], generator=g)).requires_grad_() for s in shapes]
    Bs = [(0.1 * torch.randn(s[0], r, generator=g)).requires_grad_() for s in shapes]
    val = lora_direction_penalty(bases, As, Bs, 2.0, fused=True)
    val.backward()
    A64 = [a.detach().double().requires_grad_() for a in As]
    B64 = [b.detach().double().requires_grad_() for b in Bs]
    ref = lora_direction_penalty([w.double() for w in bases], A64, B64, 2.0, fused=False)
    ref.backward()
    # fp32 accuracy also for bf16 bases: A and ∇C are split in three bf16 parts
    assert float(val.detach()) == pytest.approx(float(ref.detach()), rel=2e-6)
    for got, want in [*zip(As, A64), *zip(Bs, B64)]:
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-6 * want.grad.abs().max())
    angle, drift = lora_angle_and_drift(bases, As, Bs, 2.0, fused=True)
    angle_ref, drift_ref = lora_angle_and_drift(bases, As, Bs, 2.0, fused=False)
    torch.testing.assert_close(angle, angle_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(drift, drift_ref, rtol=1e-5, atol=1e-8)


def test_dense_angles_and_drifts_match_angle_and_drift(pf):
    ws, rs = _pairs(F32, seed=6)
    angle, drift = angles_and_drifts(ws, rs, fused=True)
    for i, (w, r) in enumerate(zip(ws, rs)):
        a, d = angle_and_drift(w, r)
        # 1 − cos is exact to ~ε·||θ − θ0||²/(||θ||·||θ0||): thousandths of a degree at a few
        # percent of drift, a few hundredths for θ = θ0/3 (tensor 4, whose angle is 0)
        assert float(angle[i]) == pytest.approx(float(a), rel=1e-4, abs=1e-3 if i != 4 else 0.05)
        assert float(drift[i]) == pytest.approx(float(d), rel=1e-5, abs=1e-9)


_COMPILE = r'''
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dirtune.method import penalty_kernels as P

def build(fn, args, cx, div=()):
    sig = {**{n: t for n, t in args}, **{k: "constexpr" for k in cx}}
    names = [n for n, _ in args]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in args if t.startswith("*") or n in div}
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    opts = {"num_warps": 4, "num_stages": 3}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

rows = [("p_addr", "*i64"), ("r_addr", "*i64")]
for stats in (True, False):
    ptx = build(P._row_sums_kernel, rows + [("out", "*fp32"), ("eps_ptr", "*fp32"), ("rows", "i32"), ("cols", "i32")],
                dict(P_TY=tl.bfloat16, R_TY=tl.bfloat16, ACC=tl.float32, F64=False, STATS=stats, ALIGNED=True,
                     ROWS=4, COLS=1024), ("cols",))
    assert "ld.global.v4" in ptx, "row sums do not vectorise"
    assert "sqrt.approx" not in ptx and "div.approx" not in ptx and "div.full" not in ptx, "IEEE sqrt/div"
ptx = build(P._row_grad_kernel, rows + [("g_addr", "*i64"), ("stats", "*fp32"), ("k_ptr", "*fp32"), ("rows", "i32"),
                                        ("cols", "i32")],
            dict(P_TY=tl.bfloat16, R_TY=tl.bfloat16, G_TY=tl.bfloat16, ACC=tl.float32, F64=False, ACCUMULATE=True,
                 ALIGNED=True, ROWS=4, COLS=1024), ("cols",))
assert "ld.global.v4" in ptx and "st.global.v4" in ptx, "row gradient does not vectorise"
for w, parts, ieee in ((tl.bfloat16, 3, False), (tl.float32, 1, True)):
    side = "*bf16" if parts == 3 else "*fp32"
    cx = dict(W_TY=w, NPARTS=parts, IEEE=ieee, UPCAST=False, ALIGNED=True, BR=16)
    ptx = build(P._lora_proj_kernel, [("w_addr", "*i64"), ("a_parts", side), ("c_out", "*fp32"), ("d", "i32"),
                                      ("k", "i32"), ("n_layers", "i32")], dict(BM=128, BK=64, **cx), ("d", "k"))
    assert ("wgmma" in ptx) == (parts == 3), "bf16 bases must use the tensor cores"
    ptx = build(P._lora_proj_grad_kernel, [("w_addr", "*i64"), ("gc_parts", side), ("ga_out", "*fp32"),
                                           ("d", "i32"), ("k", "i32"), ("n_layers", "i32")],
                dict(BK=128, BD=64, **cx), ("d", "k"))
    assert ("wgmma" in ptx) == (parts == 3), "bf16 bases must use the tensor cores"
print("compiled")
'''


def test_penalty_kernels_compile_for_sm90(compile_offline):
    compile_offline(_COMPILE, timeout=600)
