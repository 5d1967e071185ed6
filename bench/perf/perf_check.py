"""The GPU kernels against their references, on the GPU, at LLaMA shapes, before anything is timed.

Every check returns a row {check, shape, metric, value, limit, ok}; run.py stops (exit 2) when
one fails, so no timing is ever reported for a kernel that computes something else.

    step       fused BalancedAdamW step vs the same step in float64 (bf16: units in the last place at
               the operands' size, fused and foreach both), fp32 vs foreach (relative)
    fold       the folded row turn vs the two-pass kernels (bf16 ulps: FMA contraction only)
    dense      the penalty's row kernels: value vs float64, gradient vs the float64 gradient
               rounded to bf16; DirectionPenalty's `.grad` (added at the end of backward) vs the
               reference path's
    lora       the grouped bf16-split GEMMs: value and ∇A, ∇B vs float64, 7B shapes, r = 16
    angles     factored LoRA angle/drift and one-pass dense ones vs the reference functions
"""

from __future__ import annotations

import torch

from dirtune.method import fused as fused_mod
from dirtune.method.balanced_adamw import BalancedAdamW
from dirtune.method.lora_penalty import lora_angle_and_drift, lora_direction_penalty
from dirtune.method.penalty import angle_and_drift, angles_and_drifts, direction_penalty
from dirtune.models.direction import DirectionPenalty

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
# LLaMA shapes per check (a CPU dry run in Triton's interpreter swaps in small ones)
SHAPES = dict(step=[(4096, 4096), (11008, 4096), (4096,), (257, 129)],
              fold=[(4096, 4096), (11008, 4096), (4096, 11008)],
              dense=[(2048, 2048), (5504, 2048), (2048, 5504), (2048, 2048)],
              model=(2048, 5504, 64),
              lora=[(4096, 4096), (4096, 4096), (11008, 4096), (4096, 11008)])


def _row(check, shape, metric, value, limit):
    return {"check": check, "shape": shape, "metric": metric, "value": float(value), "limit": limit,
            "ok": bool(value <= limit)}


def _ulps_at(x, exact, *operands):
    """max |x − exact| in bf16 ulps at max(|exact|, |operands|) (an update that cancels to far
    below its operands is judged at their size)."""
    info = torch.finfo(BF16)
    mag = exact.abs()
    for t in operands:
        mag = torch.maximum(mag, t.double().abs())
    unit = info.eps * torch.exp2(torch.floor(torch.log2(mag.clamp_min(info.tiny))))
    return float(((x.double() - exact).abs() / unit).max())


def _params(shapes, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]


STEP_MODES = [
    ("scale", dict(weight_decay=0.5, anchor="init", balance="scale")),
    ("selective", dict(weight_decay=2.0, anchor="init", balance="selective")),
    ("zero/none", dict(weight_decay=0.5, anchor="zero", balance="none")),
    ("scale + row turn", dict(weight_decay=0.5, anchor="init", balance="scale", direction_weight=3.0)),
    ("zero + tensor turn", dict(weight_decay=0.5, anchor="zero", balance="scale", direction_weight=3.0,
                                granularity="tensor")),
]


def _stepped(base, grads, state_from, dtype, flags, kw, device):
    """One step of BalancedAdamW(**flags) from the given values and state, in `dtype`."""
    ps = [torch.nn.Parameter(b.to(dtype, copy=True)) for b in base]
    opt = BalancedAdamW(ps, lr=1e-2, anchor_dtype=F64 if dtype == F64 else BF16, **flags, **kw)
    for p, s, g in zip(ps, state_from, grads):
        opt.state[p] = {k: (v.to(dtype if k != "step" else v.dtype, copy=True) if torch.is_tensor(v) else v)
                        for k, v in s.items()}
        p.grad = g.to(dtype, copy=True)
    opt.step()
    return ps, opt


def _two_steps(shapes, device, path: dict, kw: dict):
    """bf16 parameters moved off their anchors and two BalancedAdamW steps taken along `path`
    (foreach or fused): realistic moments to check one more step from."""
    ps = [torch.nn.Parameter(t) for t in _params(shapes, BF16, device, 0)]
    opt = BalancedAdamW(ps, lr=1e-2, **path, **kw)
    with torch.no_grad():
        for p, d in zip(ps, _params(shapes, BF16, device, 1)):
            p.add_(0.05 * d)
    for t in range(2):
        for p, g in zip(ps, _params(shapes, BF16, device, 2 + t)):
            p.grad = g
        opt.step()
    return ps, opt


def check_step(device) -> list[dict]:
    shapes = SHAPES["step"]
    out = []
    for name, kw in STEP_MODES:
        # two foreach steps in bf16 to get realistic moments, then one step three ways
        ps, opt = _two_steps(shapes, device, dict(foreach=True), kw)
        grads = _params(shapes, BF16, device, 9)
        state = [opt.state[p] for p in ps]
        base = [p.detach() for p in ps]
        exact, _ = _stepped(base, grads, state, F64, dict(foreach=True), kw, device)
        fused, _ = _stepped(base, grads, state, BF16, dict(fused=True), kw, device)
        fore, _ = _stepped(base, grads, state, BF16, dict(foreach=True), kw, device)
        refs = [s.get("anchor", s.get("reference", b)) for s, b in zip(state, base)]
        uf = max(_ulps_at(f.detach(), e.detach(), b, r) for f, e, b, r in zip(fused, exact, base, refs))
        ur = max(_ulps_at(f.detach(), e.detach(), b, r) for f, e, b, r in zip(fore, exact, base, refs))
        # bound: one rounding (0.5 ulp) per stored value, a second one after the turn, and FMA
        # contraction on the GPU; foreach is reported beside it (it rounds every op)
        limit = 2.0 if kw.get("direction_weight") else 1.0
        out.append(_row("step bf16 " + name, "7B rows", "ulps vs fp64 (foreach: %.2f)" % ur, uf, limit))
        # fp32: fused vs foreach after one step from the same state
        f32, _ = _stepped(base, grads, state, F32, dict(fused=True), kw, device)
        r32, _ = _stepped(base, grads, state, F32, dict(foreach=True), kw, device)
        rel = max(float((a.detach() - b.detach()).abs().max() / b.detach().abs().max()) for a, b in zip(f32, r32))
        out.append(_row("step fp32 " + name, "7B rows", "max rel. diff vs foreach", rel, 1e-5))
        del ps, opt, exact, fused, fore, f32, r32
        torch.cuda.empty_cache()
    return out


def check_fold(device) -> list[dict]:
    shapes = SHAPES["fold"]
    kw = dict(weight_decay=0.5, anchor="init", balance="scale", direction_weight=3.0)
    got = []
    for fold in (False, True):
        fused_mod.FOLD_TURN = fold
        ps, opt = _two_steps(shapes, device, dict(fused=True), kw)
        got.append([p.detach().clone() for p in ps])
        del ps, opt
    fused_mod.FOLD_TURN = True
    u = max(_ulps_at(a, b.double(), b) for a, b in zip(got[1], got[0]))
    return [_row("row turn folded into the step", "7B shapes", "ulps vs two-pass kernels", u, 1.0)]


def check_dense(device) -> list[dict]:
    shapes = SHAPES["dense"]
    ws = _params(shapes, BF16, device, 3)
    rs = [(w.double() + 0.01 * d.double()).to(BF16) for w, d in zip(ws, _params(shapes, BF16, device, 4))]
    wq = [w.clone().requires_grad_() for w in ws]
    val = direction_penalty(wq, rs, fused=True)
    val.backward()
    w64 = [w.double().requires_grad_() for w in ws]
    ref = direction_penalty(w64, [r.double() for r in rs], fused=False)
    ref.backward()
    out = [_row("dense penalty value", "1B shapes, bf16", "rel. err vs fp64",
                abs(float(val) - float(ref)) / float(ref), 1e-5)]
    # the gradient (a difference of two nearly equal row scalings of θ and θ0) is rounded once
    # to bf16: within bf16's relative precision at the gradient's own scale
    rel = max(float((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()) for a, b in zip(wq, w64))
    out.append(_row("dense penalty gradient", "1B shapes, bf16", "max err / max |∇| vs fp64", rel, 2 ** -7))
    # DirectionPenalty adds its gradient to .grad at the end of backward: same .grad as the reference
    grads = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential()
        h, f, batch = SHAPES["model"]
        model.add_module("q_proj", torch.nn.Linear(h, h, bias=False, device=device))
        model.add_module("up_proj", torch.nn.Linear(h, f, bias=False, device=device))
        pen = DirectionPenalty(model, 100.0, targets=["q_proj", "up_proj"], reference_dtype=F32, fused=fused)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, device=device, generator=torch.Generator(device).manual_seed(5)))
        x = torch.randn(batch, h, device=device, generator=torch.Generator(device).manual_seed(6))
        for _ in range(2):   # accumulated over two micro-batches
            (model(x).square().mean() + pen()).backward()
        grads[fused] = [p.grad.clone() for p in model.parameters()]
    rel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads[True], grads[False]))
    out.append(_row("DirectionPenalty .grad (into .grad)", "2 fp32 layers", "max rel. diff vs reference", rel, 1e-5))
    return out


def check_lora(device) -> list[dict]:
    shapes = SHAPES["lora"]
    g = torch.Generator(device="cpu").manual_seed(7)
    bases = [torch.randn(s, generator=g).to(device, BF16) for s in shapes]
    As = [(0.01 * torch.randn(16, s[1], generator=g)).to(device).requires_grad_() for s in shapes]
    Bs = [(0.01 * torch.randn(s[0], 16, generator=g)).to(device).requires_grad_() for s in shapes]
    val = lora_direction_penalty(bases, As, Bs, 2.0, fused=True)
    val.backward()
    A64 = [a.detach().double().requires_grad_() for a in As]
    B64 = [b.detach().double().requires_grad_() for b in Bs]
    ref = lora_direction_penalty([w.double() for w in bases], A64, B64, 2.0, fused=False)
    ref.backward()
    out = [_row("LoRA penalty value", "7B shapes, r=16, bf16 bases", "rel. err vs fp64",
                abs(float(val) - float(ref)) / float(ref), 1e-5)]
    for name, got, want in (("∇A", As, A64), ("∇B", Bs, B64)):
        rel = max(float((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()) for a, b in zip(got, want))
        out.append(_row(f"LoRA penalty {name}", "7B shapes, r=16, bf16 bases", "max rel. err vs fp64", rel, 1e-4))
    angle, drift = lora_angle_and_drift(bases, As, Bs, 2.0, fused=True)
    worst_a = worst_d = 0.0
    for i, (w, a, b) in enumerate(zip(bases, As, Bs)):
        ra, rd = angle_and_drift(w.double() + 2.0 * b.detach().double() @ a.detach().double(), w.double())
        worst_a = max(worst_a, abs(float(angle[i]) - float(ra)))
        worst_d = max(worst_d, abs(float(drift[i]) - float(rd)) / float(rd))
    out.append(_row("LoRA angle (factored)", "7B shapes", "abs. err vs dense fp64, degrees", worst_a, 1e-3))
    out.append(_row("LoRA drift (factored)", "7B shapes", "rel. err vs dense fp64", worst_d, 1e-5))
    ws = bases[:2]
    rs = [(w.float() * 1.01 + 0.02 * torch.randn(w.shape, device=device)).to(BF16) for w in ws]
    ang, dr = angles_and_drifts(ws, rs, fused=True)
    errs = [abs(float(ang[i]) - float(angle_and_drift(w.double(), r.double())[0])) for i, (w, r) in enumerate(zip(ws, rs))]
    out.append(_row("dense angle (one pass)", "4096², bf16", "abs. err vs fp64, degrees", max(errs), 1e-3))
    return out


def gpu_checks(device: torch.device) -> list[dict]:
    """All checks; rows with ok=False make run.py stop before timing."""
    if device.type != "cuda":
        return [{"check": "all", "skipped": "the kernels need CUDA (the CPU tests use Triton's interpreter)",
                 "ok": True}]
    rows = []
    for fn in (check_step, check_fold, check_dense, check_lora):
        try:
            rows += fn(device)
        except Exception as e:   # a kernel that does not run at all fails its check
            rows.append({"check": fn.__name__, "error": f"{type(e).__name__}: {e}"[:400], "ok": False})
        torch.cuda.empty_cache()
    return rows
