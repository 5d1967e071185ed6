"""The measurements of bench/perf/run.py: copy bandwidth, fused-vs-foreach agreement, the
optimizer step alone, the memory of anchors and references, and full training steps.

Each function returns plain dicts (JSON rows); run.py orders them, guards each with
try/except and writes the report. Shapes are LLaMA-2's; weights are random (timing only).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from dirtune.method.balanced_adamw import BalancedAdamW
from dirtune.method.update_rules import _multi_tensor_balanced_adamw

LLAMA_7B = dict(hidden=4096, inter=11008, layers=32, heads=32, vocab=32000)
LLAMA_1B = dict(hidden=2048, inter=5504, layers=16, heads=16, vocab=32000)   # ~0.94B params
SMOKE_7B = dict(hidden=64, inter=172, layers=2, heads=4, vocab=256)
SMOKE_1B = dict(hidden=32, inter=88, layers=2, heads=4, vocab=128)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timings(fn, device: torch.device, reps: int) -> list[float]:
    """Milliseconds of each of reps back-to-back fn() calls (CUDA events on a GPU, the clock elsewhere)."""
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return times
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() over reps after warmup calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timings(fn, device, reps))


_CYCLES_PER_MS: list[float] = []


def gpu_busy(ms: float) -> None:
    """Keep the current CUDA stream busy for about `ms` (torch.cuda._sleep, calibrated once)."""
    if not _CYCLES_PER_MS:
        for _ in range(2):   # the first call also loads the kernel
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(2_000_000)
            end.record()
            end.synchronize()
        _CYCLES_PER_MS.append(2_000_000 / max(start.elapsed_time(end), 1e-3))
    torch.cuda._sleep(int(ms * _CYCLES_PER_MS[0]))


def host_ahead(fn, device: torch.device, lead_ms: float) -> tuple[float, float]:
    """One call of fn timed two ways: (device ms, host ms). The stream is kept busy for `lead_ms`
    before the start event, so the host enqueues all of fn's work while the device is still busy
    and the events then time the device's work alone, without gaps where it waited for the host.
    The host ms is how long fn took to return. host ms ≥ lead_ms means fn waited for the device
    (a host sync): the device time then has gaps again, and says so (see `blocked`)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        ms = 1e3 * (time.perf_counter() - t0)
        return ms, ms
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu_busy(lead_ms)
    start.record()
    t0 = time.perf_counter()
    fn()
    host = 1e3 * (time.perf_counter() - t0)
    end.record()
    end.synchronize()
    return start.elapsed_time(end), host


def timed_split(fn, device: torch.device, warmup: int, reps: int) -> dict:
    """`timed` (ms: back to back, as a caller sees it) and, per call with the host ahead
    (`host_ahead`), the device's own time (gpu_ms) and the host's (host_ms): medians.
    ms ≫ gpu_ms means the host, not the device, sets the pace of fn alone."""
    ms = timed(fn, device, warmup, reps)
    t0 = time.perf_counter()
    fn()
    lead = 1.5 * 1e3 * (time.perf_counter() - t0) + 2.0
    got = [host_ahead(fn, device, lead) for _ in range(reps)]
    return {"ms": ms, "gpu_ms": statistics.median(g for g, _ in got),
            "host_ms": statistics.median(h for _, h in got),
            "blocked": sum(h >= lead for _, h in got) if device.type == "cuda" else 0}


# --- device copy bandwidth -------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int) -> dict:
    """dst.copy_(src) of nbytes: reads and writes nbytes each, so 2·nbytes per copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device, warmup=3, reps=20)
    del src, dst
    free()
    return {"bytes": nbytes, "ms": ms, "GBps": 2 * nbytes / ms / 1e6}


# --- parameter sets --------------------------------------------------------------------------


def llama_shapes(spec: dict, layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every LLaMA-2 parameter (untied embeddings, no biases)."""
    h, f, v = spec["hidden"], spec["inter"], spec["vocab"]
    out = [("embed_tokens", (v, h))]
    for i in range(layers or spec["layers"]):
        out += [(f"{i}.{n}", (h, h)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(f"{i}.gate_proj", (f, h)), (f"{i}.up_proj", (f, h)), (f"{i}.down_proj", (h, f))]
        out += [(f"{i}.input_layernorm", (h,)), (f"{i}.post_attention_layernorm", (h,))]
    return out + [("norm", (h,)), ("lm_head", (v, h))]


def make_param_set(spec: dict, dtype: torch.dtype, device: torch.device, layers: int | None = None):
    """Parameters (N(0, 0.02²)) with gradients (N(0, 1e-3²)), as the optimizer sees a model."""
    params = []
    for _, shape in llama_shapes(spec, layers):
        p = torch.nn.Parameter(0.02 * torch.randn(shape, device=device, dtype=dtype))
        p.grad = 1e-3 * torch.randn(shape, device=device, dtype=dtype)
        params.append(p)
    return params


def groups_of(params: list, direction_weight: float = 0.0) -> list[dict]:
    """Matrices decay (and turn, when asked); 1-D tensors do not, as in the trainer."""
    mats = [p for p in params if p.ndim == 2]
    vecs = [p for p in params if p.ndim < 2]
    return [{"params": mats, "weight_decay": 0.1, "direction_weight": direction_weight},
            {"params": vecs, "weight_decay": 0.0, "direction_weight": 0.0}]


def _adamw(params, **kw):
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "direction_weight"}
                              for g in groups_of(params)], lr=1e-4, **kw)


def _balanced(params, direction_weight=0.0, moments=None, **kw):
    opt = BalancedAdamW(groups_of(params, direction_weight), lr=1e-4, **kw)
    if moments is not None:  # state made here, wider than the parameters (e.g. fp32 for bf16)
        for p in params:
            opt.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, dtype=moments),
                                exp_avg_sq=torch.zeros_like(p, dtype=moments))
    return opt


def step_rows(dtype: torch.dtype, cuda: bool, with_cpu_anchor: bool) -> list[tuple[str, dict, object]]:
    """(row name, what it moves, factory(params) -> optimizer) for the optimizer-step bench."""
    fused = dict(fused=True) if cuda else {}
    rows = [
        ("adamw-fused", dict(anchor=False), lambda ps: _adamw(ps, fused=True)),
        ("adamw-foreach", dict(anchor=False), lambda ps: _adamw(ps, foreach=True)),
        ("balanced-foreach", dict(anchor=True), lambda ps: _balanced(ps, foreach=True)),
    ]
    if cuda:
        rows += [
            ("balanced-fused", dict(anchor=True), lambda ps: _balanced(ps, **fused)),
            ("balanced-fused zero/none (AdamW's bytes)", dict(anchor=False),
             lambda ps: _balanced(ps, anchor="zero", balance="none", **fused)),
            ("balanced-fused selective", dict(anchor=True, selective=True),
             lambda ps: _balanced(ps, balance="selective", **fused)),
            ("balanced-fused + row turn", dict(anchor=True, turn=True),
             lambda ps: _balanced(ps, direction_weight=1.0, **fused)),
        ]
        if dtype != torch.float32:
            rows.append(("balanced-fused fp32 moments", dict(anchor=True),
                         lambda ps: _balanced(ps, moments=torch.float32, **fused)))
        if with_cpu_anchor:
            rows.append(("balanced-fused anchors on CPU", dict(anchor=True, pcie=True),
                         lambda ps: _balanced(ps, anchor_device="cpu", **fused)))
    return rows


def bytes_per_param(p_dtype, m_dtype, anchor: bool, selective=False, turn=False, pcie=False) -> float:
    """DRAM bytes per element a fused implementation must move (anchors bf16): read θ, g, m, v
    (and a), write θ, m, v; selective re-reads θ, g, a; the row turn reads θ, θ0, writes θ."""
    P, M, A = SIZE[p_dtype], SIZE[m_dtype], 2
    total = 2 * P + P + 4 * M + (A if anchor else 0)
    total += (P + P + A) if selective else 0
    total += (P + A + P) if turn else 0
    return float(total)


def optimizer_step(spec: dict, dtype: torch.dtype, device: torch.device, *, label: str, layers=None,
                   copy_GBps=None, warmup=3, reps=10, with_cpu_anchor=False) -> list[dict]:
    """Time per step of each row on one parameter set; bytes and bandwidth per row."""
    params = make_param_set(spec, dtype, device, layers)
    n = sum(p.numel() for p in params)
    print(f"  {label}: {n / 1e9:.2f}B parameters", flush=True)
    out = []
    for name, moves, factory in step_rows(dtype, device.type == "cuda", with_cpu_anchor):
        row = {"set": label, "row": name, "params": n, "param_dtype": str(dtype).split(".")[-1]}
        try:
            opt = factory(params)
            ms = timed(opt.step, device, warmup, reps)
            m_dtype = opt.state[params[0]]["exp_avg"].dtype
            b = bytes_per_param(dtype, m_dtype, **moves)
            row.update(ms=ms, moments=str(m_dtype).split(".")[-1], bytes_per_param=b,
                       GBps=b * n / ms / 1e6)
            if copy_GBps:
                row.update(of_copy_bw=row["GBps"] / copy_GBps, roofline_ms=b * n / copy_GBps / 1e6)
        except Exception as e:  # one row's failure (e.g. out of memory) keeps the others
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        opt = None
        free()
        out.append(row)
        print(f"    {name:42s} {row.get('ms', float('nan')):9.2f} ms  {row.get('error', '')}", flush=True)
    for p in params:
        p.grad = None
    del params
    free()
    return out


# --- fused equals foreach on this device ------------------------------------------------------


CHECK_MODES = [
    dict(weight_decay=0.5, anchor="init", balance="scale"),
    dict(weight_decay=2.0, anchor="init", balance="selective"),
    dict(weight_decay=0.5, anchor="zero", balance="none"),
    dict(weight_decay=0.5, anchor="init", balance="scale", direction_weight=3.0),
    dict(weight_decay=0.5, anchor="zero", balance="scale", direction_weight=3.0, granularity="tensor"),
]


def _ulps(a, b, *scales):
    info = torch.finfo(a.dtype)
    mag = torch.maximum(a.double().abs(), b.double().abs())
    for s in scales:
        mag = torch.maximum(mag, s.double().abs())
    mag = mag.clamp_min(info.tiny)
    return float(((a.double() - b.double()).abs() / (info.eps * torch.exp2(torch.floor(torch.log2(mag))))).max())


def fused_agreement(device: torch.device) -> list[dict]:
    """fused vs foreach on odd-sized tensors: fp32 after 3 fused steps (max relative error),
    bf16 after 2 shared foreach steps and 1 fused step (max ulps at the operands' size)."""
    if device.type != "cuda":
        return [{"skipped": "the fused kernels need CUDA (the CPU tests use Triton's interpreter)"}]
    shapes = [(257, 129), (1000,), (64, 4096), (1376, 512), (3, 5)]
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for kw in CHECK_MODES:
            g = torch.Generator(device="cpu").manual_seed(0)
            base = [torch.randn(s, generator=g) for s in shapes]
            ref = [torch.nn.Parameter(b.to(device, dtype)) for b in base]
            fus = [torch.nn.Parameter(b.to(device, dtype)) for b in base]
            o_ref = BalancedAdamW(ref, lr=1e-2, foreach=True, **kw)
            o_fus = BalancedAdamW(fus, lr=1e-2, fused=True, **kw)
            with torch.no_grad():
                for a, b, c in zip(ref, fus, base):
                    d = (0.05 * torch.randn(c.shape, generator=g)).to(device, dtype)
                    a.add_(d)
                    b.add_(d)
            shared = 2 if dtype == torch.bfloat16 else 0
            worst_p = worst_m = 0.0
            for t in range(3):
                o_fus.param_groups[0]["fused"] = t >= shared
                before = [(p.detach().clone(), o_ref.state[p].get("exp_avg")) for p in ref]
                before = [(p0, None if m is None else m.clone()) for p0, m in before]
                for a, b, c in zip(ref, fus, base):
                    gr = torch.randn(c.shape, generator=g).to(device, dtype)
                    a.grad, b.grad = gr, gr.clone()
                o_ref.step()
                o_fus.step()
            for (p0, m0), a, b in zip(before, ref, fus):
                ma, mb = o_ref.state[a]["exp_avg"], o_fus.state[b]["exp_avg"]
                if dtype == torch.bfloat16:
                    worst_p = max(worst_p, _ulps(a.detach(), b.detach(), p0))
                    worst_m = max(worst_m, _ulps(ma, mb, m0, a.grad))
                else:
                    scale = float(a.detach().abs().max())
                    worst_p = max(worst_p, float((a.detach() - b.detach()).abs().max()) / scale)
                    worst_m = max(worst_m, float((ma - mb).abs().max()) / float(ma.abs().max()))
            # bf16: the reference rounds θ up to 3 times a step (decay, Adam, turn), the kernels
            # twice (step, turn): at most 2.5 units in the last place apart; 4 leaves a margin
            limit = 4.0 if dtype == torch.bfloat16 else 1e-5
            out.append({"dtype": str(dtype).split(".")[-1], "mode": kw,
                        "metric": "ulps" if dtype == torch.bfloat16 else "max rel err",
                        "param": worst_p, "exp_avg": worst_m, "ok": worst_p <= limit and worst_m <= limit})
    # bf16 params with fp32 moments against the same step in fp64
    g = torch.Generator(device="cpu").manual_seed(1)
    p, gr, a = (torch.randn(513, 77, generator=g) for _ in range(3))
    m, v = 0.1 * torch.randn(513, 77, generator=g), 0.01 * torch.rand(513, 77, generator=g)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5, anchor="init",
              balance="none", direction_weight=0.0, granularity="row")
    p16, g16, a16 = (x.to(device, torch.bfloat16) for x in (p, gr, p + 0.01 * a))
    want = [x.double() for x in (p16, g16, m.to(device), v.to(device))]
    _multi_tensor_balanced_adamw(*([w] for w in want), [torch.tensor(4.0)], [a16.double()], [None],
                                 [1.0], **kw)
    from dirtune.method.fused import _fused_balanced_adamw
    got = [p16.clone(), g16, m.to(device), v.to(device)]
    _fused_balanced_adamw(*([x] for x in got), [torch.tensor(4.0)], [a16], [None], [1.0], **kw)
    ulp_p = _ulps(got[0], want[0].to(torch.bfloat16))
    rel_m = float((got[2].double() - want[2]).abs().max() / want[2].abs().max())
    out.append({"dtype": "bfloat16 params, float32 moments", "mode": "vs fp64", "metric": "ulps / rel",
                "param": ulp_p, "exp_avg": rel_m, "ok": ulp_p <= 1 and rel_m <= 1e-5})
    return out


# --- memory of anchors and references ---------------------------------------------------------


def anchor_memory(spec: dict, device: torch.device, layers=None) -> list[dict]:
    """Bytes per parameter of what each option stores beyond AdamW, by dtype and placement:
    summed over the optimizer's anchor/reference state (and the penalty's references), and the
    accelerator memory it took (torch.cuda.memory_allocated before and after)."""
    from dirtune.models.direction import DirectionPenalty

    params = make_param_set(spec, torch.bfloat16, device, layers)
    n = sum(p.numel() for p in params)
    cases = [
        ("anchor init, bf16, beside", dict(anchor="init", anchor_dtype=torch.bfloat16)),
        ("anchor init, fp32, beside", dict(anchor="init", anchor_dtype=torch.float32)),
        ("anchor init, bf16, CPU (pinned)", dict(anchor="init", anchor_device="cpu")),
        ("anchor init + turn (reference = anchor)", dict(anchor="init", direction_weight=1.0)),
        ("anchor zero + turn, bf16 reference", dict(anchor="zero", direction_weight=1.0)),
        ("anchor zero + turn, reference on CPU", dict(anchor="zero", direction_weight=1.0,
                                                      anchor_device="cpu")),
        ("anchor zero, no turn", dict(anchor="zero")),
    ]
    out = []
    for name, kw in cases:
        dw = kw.pop("direction_weight", 0.0)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        opt = BalancedAdamW(groups_of(params, dw), lr=1e-4, **kw)
        after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        stored = {}
        for s in opt.state.values():
            for key in ("anchor", "reference"):
                if key in s:
                    t = s[key]
                    k = f"{key} {str(t.dtype).split('.')[-1]} on {t.device.type}"
                    stored[k] = stored.get(k, 0) + t.numel() * t.element_size()
        out.append({"case": name, "params": n, "stored_bytes_per_param": {k: v / n for k, v in stored.items()},
                    "device_bytes_per_param": (after - before) / n})
        del opt
        free()
    # the coupled penalty's references (full fine-tuning): modules named like LLaMA's holding
    # the projection weights of the set
    holder = torch.nn.ModuleList()
    by_name = dict(zip((name for name, _ in llama_shapes(spec, layers)), params))
    for i in range(layers or spec["layers"]):
        layer = torch.nn.ModuleDict()
        for proj in LORA_TARGETS:
            layer[proj] = torch.nn.Linear(1, 1, bias=False, device="meta")
            layer[proj].weight = by_name[f"{i}.{proj}"]
        holder.append(layer)
    for ref_dtype, ref_device in ((torch.bfloat16, None), (torch.bfloat16, "cpu")):
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        pen = DirectionPenalty(holder, 1.0, reference_dtype=ref_dtype, reference_device=ref_device)
        after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        covered = sum(m.weight.numel() for layer in holder for m in layer.values())
        out.append({"case": f"coupled penalty references, bf16, {ref_device or 'beside'}",
                    "params": n, "stored_bytes_per_param": {"reference (per covered param)":
                                                            pen.reference_bytes / covered},
                    "device_bytes_per_param": (after - before) / n})
        del pen
        free()
    for p in params:
        p.grad = None
    del params, holder
    free()
    return out


# --- the optimizer step's goals, interleaved ----------------------------------------------------


def goal_rows(cuda: bool) -> list[list[tuple[str, dict, object]]]:
    """Row sets timed together (their states alive at once): AdamW against each fused row."""
    rows = {name: (name, moves, factory) for name, moves, factory in step_rows(torch.bfloat16, cuda, False)}
    if not cuda:
        return [[rows["adamw-fused"], rows["balanced-foreach"]]]
    return [[rows["adamw-fused"], rows["balanced-fused"]],
            [rows["adamw-fused"], rows["balanced-fused + row turn"]]]


def optimizer_step_rounds(spec: dict, dtype: torch.dtype, device: torch.device, *, label: str, layers=None,
                          copy_GBps=None, warmup=2, reps=8, rounds=3, sets=None) -> list[dict]:
    """The step's goal rows, interleaved with AdamW(fused=True) on the same parameters: the
    median ms over all rounds, and the ratio to AdamW per round (median and range)."""
    from perf_train import interleaved, summarise

    params = make_param_set(spec, dtype, device, layers)
    n = sum(p.numel() for p in params)
    print(f"  {label}: {n / 1e9:.2f}B parameters", flush=True)
    out = []
    for rowset in sets or goal_rows(device.type == "cuda"):
        opts, moves = {}, {}
        try:
            for name, mv, factory in rowset:
                opts[name], moves[name] = factory(params), mv
            times = interleaved([(name, o.step) for name, o in opts.items()], device, rounds=rounds,
                                warmup=warmup, reps=reps)
            for row in summarise(times, rowset[0][0]):
                name = row.pop("variant")
                if out and name == rowset[0][0] and any(r["row"] == name for r in out):
                    continue  # AdamW once per set is enough in the table
                m_dtype = opts[name].state[params[0]]["exp_avg"].dtype
                b = bytes_per_param(dtype, m_dtype, **moves[name])
                row.update(set=label, row=name, params=n, param_dtype=str(dtype).split(".")[-1],
                           moments=str(m_dtype).split(".")[-1], bytes_per_param=b, GBps=b * n / row["ms"] / 1e6)
                if copy_GBps:
                    row.update(of_copy_bw=row["GBps"] / copy_GBps, roofline_ms=b * n / copy_GBps / 1e6)
                out.append(row)
                print(f"    {name:42s} {row['ms']:9.2f} ms  ×{row.get('ratio', 1):.2f}", flush=True)
        except Exception as e:  # one set's failure (e.g. out of memory) keeps the others
            out.append({"set": label, "row": "/".join(r[0] for r in rowset), "error": f"{type(e).__name__}: {e}"[:300]})
        opts = None
        free()
    for p in params:
        p.grad = None
    del params
    free()
    return out
