"""perf.md from the results dict of bench/perf/run.py: the GPU checks, one table per measured
section (medians over interleaved rounds, with the per-round range), then the goals of issue 12
with the measured values."""

from __future__ import annotations

GOALS = dict(lora_coupled=1.03, full_coupled=1.05, full_decoupled=1.05, step_vs_adamw=1.15,
             of_copy_bw=0.75, anchor_bytes=2.0)


def _f(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def _rows(results: dict, name: str) -> list:
    sec = results["sections"].get(name, {})
    res = sec.get("result")
    return res if isinstance(res, list) else []


def _status(results: dict, name: str) -> str:
    sec = results["sections"].get(name)
    if sec is None:
        return f"`{name}`: not run"
    for key in ("skipped", "error"):
        if key in sec:
            return f"`{name}` {key}: {sec[key]}"
    return ""


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _spread(r: dict, pre: str = "") -> str:
    if pre + "ratio" not in r:
        return "–"
    return f"{r[pre + 'ratio']:.3f} [{r[pre + 'ratio_min']:.3f}, {r[pre + 'ratio_max']:.3f}]"


KIND_ORDER = ["gemm", "attention", "other", "penalty", "optimizer", "copy/memset"]


def profile_table(train: list) -> list[str]:
    """GPU kernel time of one profiled step per variant, by kind, and its difference to AdamW's."""
    rows = [(m, r) for m, r in train if "profile" in r and "error" not in r["profile"]]
    if not rows:
        return []
    base = {m: r["profile"] for m, r in rows if r["variant"].startswith("adamw")}
    out = ["### Where the GPU time goes (one profiled step per variant)",
           "Kernel ms by kind (Δ: minus AdamW's, same model); kernels: how many ran; syncs: host "
           "synchronisations the step made.", ""]
    body = []
    for m, r in rows:
        p, b = r["profile"], base.get(m)
        cells = []
        for k in KIND_ORDER:
            v = p["by_kind_ms"].get(k, 0.0)
            d = v - b["by_kind_ms"].get(k, 0.0) if b else None
            cells.append(f"{v:.2f}" + (f" ({d:+.2f})" if d is not None and abs(d) >= 0.005 else ""))
        tot = p["kernel_ms"] - b["kernel_ms"] if b else None
        body.append([m, r["variant"], f"{p['kernel_ms']:.1f}" + (f" ({tot:+.1f})" if tot is not None else ""),
                     *cells, p["kernels"], p["host_syncs"]])
    out += _table(["model", "variant", "kernel ms (Δ)", *KIND_ORDER, "kernels", "syncs"], body) + [""]
    for m, r in rows:   # the kernels that differ most from AdamW's step, by name
        b = base.get(m)
        if b is None or r["variant"].startswith("adamw") or "by_kernel" not in r["profile"]:
            continue
        mine, theirs = r["profile"]["by_kernel"], b.get("by_kernel", {})
        diff = {k: (mine.get(k, [0, 0.0])[1] - theirs.get(k, [0, 0.0])[1],
                    mine.get(k, [0, 0.0])[0] - theirs.get(k, [0, 0.0])[0]) for k in set(mine) | set(theirs)}
        top = sorted(diff.items(), key=lambda kv: -abs(kv[1][0]))[:6]
        out.append(f"- {m}, {r['variant']} − AdamW: " + "; ".join(
            f"`{k[:60]}` {d:+.2f} ms ({c:+d} launches)" for k, (d, c) in top if abs(d) >= 0.01))
    return out + [""]


def step_ratios(rows: list[dict]) -> dict:
    """(set, row) → time / time of torch's AdamW(fused=True) (per-round median when interleaved)."""
    out = {(r["set"], r["row"]): r["ratio"] for r in rows if "ratio" in r}
    base = {r["set"]: r["ms"] for r in rows if r.get("row") == "adamw-fused" and "ms" in r}
    for r in rows:
        if "ms" in r and r["set"] in base and (r["set"], r["row"]) not in out:
            out[(r["set"], r["row"])] = r["ms"] / base[r["set"]]
    return out


def markdown(results: dict) -> str:
    env = results["env"]
    copy = results["sections"].get("copy", {}).get("result") or {}
    lines = ["# bench/perf results" + (" (smoke: tiny shapes)" if results.get("smoke") else ""), "",
             f"{env.get('gpu', env['device'])}; torch {env['torch']}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}, peft {env.get('peft')}; "
             f"device copy {_f(copy.get('GBps'), '.0f')} GB/s; "
             f"{_f(results.get('elapsed_s'), '.0f')} s in all.", ""]
    if results.get("stopped"):
        lines += [f"**Stopped before timing: {results['stopped']}**", ""]

    checks = _rows(results, "check")
    lines += ["## The kernels against their references, on this GPU", _status(results, "check"), ""]
    lines += _table(["check", "shape", "metric", "value", "limit", "ok"],
                    [[r.get("check"), r.get("shape", ""), r.get("metric", r.get("skipped", r.get("error", ""))),
                      _f(r.get("value"), ".3g"), _f(r.get("limit"), ".3g"), r.get("ok")] for r in checks]) + [""]

    floor = _rows(results, "floor")
    lines += ["## The penalty alone, against its traffic floor", _status(results, "floor"), ""]
    lines += ["ms: back to back (the GPU also waits for the host's Python); GPU ms: with the host "
              "ahead (what it costs inside a step whose host runs ahead); host ms: the host's time per call.", ""]
    lines += _table(["what", "params", "ms", "GPU ms", "host ms", "B/param", "floor ms (copy bw)", "× floor (GPU ms)"],
                    [[r["what"], f"{r['params'] / 1e9:.2f}B", _f(r.get("ms")), _f(r.get("gpu_ms")), _f(r.get("host_ms")),
                      _f(r.get("bytes_per_param"), ".0f"), _f(r.get("floor_ms")),
                      _f(r.get("gpu_ms", r["ms"]) / r["floor_ms"] if r.get("floor_ms") else None, ".2f")]
                     for r in floor]) + [""]

    lines += ["## Training step (batch 1, random weights; variants interleaved)",
              "ms: median of all timed steps, back to back; × AdamW: median over rounds of (variant / AdamW "
              "in the same round), [min, max] over rounds. device ms / device × AdamW: the same steps "
              "timed with the host ahead (the GPU's own time, no waits for the host); host ms: how long "
              "the host took to issue a step (≈ ms/step: the host sets the pace).",
              _status(results, "train-1b"), _status(results, "train-7b"), ""]
    train = [("~1B full", r) for r in _rows(results, "train-1b")] + \
            [("7B LoRA r=16", r) for r in _rows(results, "train-7b")]
    lines += _table(["model", "variant", "seq", "rounds × steps", "ms/step", "round medians", "× AdamW [range]",
                     "device ms", "device × AdamW [range]", "host ms"],
                    [[m, r["variant"], r.get("seq"), f"{r.get('rounds')} × {r.get('steps', 0) // max(1, r.get('rounds') or 1)}",
                      _f(r.get("ms"), ".1f"), ", ".join(f"{x:.1f}" for x in r.get("round_ms", [])), _spread(r),
                      _f(r.get("device_ms"), ".1f"), _spread(r, "device_"), _f(r.get("host_ms"), ".1f")]
                     for m, r in train]) + [""]
    lines += profile_table(train)

    steps = _rows(results, "step-7b") + _rows(results, "step-1b")
    ratio = step_ratios(steps)
    lines += ["## Optimizer step alone",
              "Bytes per parameter: what a fused implementation must move (bf16 anchors); roofline = "
              "those bytes at the copy bandwidth. × AdamW: interleaved with AdamW(fused=True) on the "
              "same tensors, per-round ratio.", _status(results, "step-7b"), ""]
    lines += _table(["set", "optimizer", "params", "moments", "ms/step", "B/param", "GB/s", "of copy bw",
                     "roofline ms", "× AdamW fused [range]"],
                    [[r["set"], r["row"], f"{r['params'] / 1e9:.2f}B" if "params" in r else "–",
                      r.get("moments", "–"), _f(r.get("ms")), _f(r.get("bytes_per_param"), ".0f"),
                      _f(r.get("GBps"), ".0f"), _f(r.get("of_copy_bw"), ".0%"), _f(r.get("roofline_ms")),
                      (_spread(r) if "ratio" in r else _f(ratio.get((r["set"], r["row"])), ".2f"))
                      if "error" not in r else r["error"]] for r in steps]) + [""]

    for name, title in (("agree", "Fused equals foreach (older check)"), ("memory", "Memory of anchors and references")):
        if name in results["sections"]:
            lines += [f"## {title}", _status(results, name), ""]
            lines += [f"- {r}" for r in _rows(results, name)] + [""]

    lines += ["## Goals", ""] + goals(steps, ratio, train)
    return "\n".join(lines) + "\n"


def _device_view(rows: dict) -> dict:
    """The rows with their device_* ratios in place of the back-to-back ones."""
    return {v: {k[len("device_"):]: x for k, x in r.items() if k.startswith("device_ratio")}
            for v, r in rows.items() if "device_ratio" in r}


def _goal(label: str, rows: dict, variant: str, limit: float) -> str | None:
    r = rows.get(variant)
    if r is None or "ratio" not in r:
        return None
    ok = r["ratio"] <= limit
    miss = "" if ok else f" (missed by {r['ratio'] - limit:+.1%} of AdamW's step)"
    return (f"- {label} ≤ {limit:.2f}× AdamW: {r['ratio']:.3f}× (rounds {r['ratio_min']:.3f}–"
            f"{r['ratio_max']:.3f}) → {'met' if ok else 'NOT met'}{miss}")


def goals(steps, ratio, train) -> list[str]:
    out = []
    lora = {r["variant"]: r for m, r in train if m.startswith("7B")}
    full = {r["variant"]: r for m, r in train if m.startswith("~1B")}
    for label, rows, variant, limit in (
            ("7B LoRA, coupled method", lora, "coupled (penalty + balanced)", GOALS["lora_coupled"]),
            ("~1B full, coupled method", full, "coupled (penalty + balanced init/scale)", GOALS["full_coupled"]),
            ("~1B full, decoupled turn", full, "decoupled (balanced + row turn, folded)", GOALS["full_decoupled"])):
        line = _goal(label, rows, variant, limit)
        if line:
            out.append(line)
        line = _goal(label + " (device time, host ahead)", _device_view(rows), variant, limit)
        if line:
            out.append("  " + line)
    for r in steps:
        if r.get("row") == "balanced-fused" and "ms" in r:
            x = ratio.get((r["set"], r["row"]))
            bw = r.get("of_copy_bw")
            ok = x is not None and x <= GOALS["step_vs_adamw"] and bw is not None and bw >= GOALS["of_copy_bw"]
            out.append(f"- fused step, {r['set']}: {_f(x)}× AdamW(fused=True) (goal ≤ {GOALS['step_vs_adamw']}), "
                       f"{_f(bw, '.0%')} of copy bandwidth (goal ≥ {GOALS['of_copy_bw']:.0%}) → "
                       f"{'met' if ok else 'NOT met'}")
    return out or ["- (no section with a goal finished)"]
