"""perf.md from the results dict of bench/perf/run.py: one table per section, then the goals
of the issue ("the method at near-zero cost on a GPU") with the measured values."""

from __future__ import annotations

GOALS = dict(lora_overhead=0.03, step_vs_adamw=1.15, of_copy_bw=0.75, anchor_bytes=2.0)


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


def step_ratios(rows: list[dict]) -> dict:
    """(set, row) → time / time of torch's AdamW(fused=True) on the same set."""
    base = {r["set"]: r["ms"] for r in rows if r.get("row") == "adamw-fused" and "ms" in r}
    return {(r["set"], r["row"]): r["ms"] / base[r["set"]]
            for r in rows if "ms" in r and r["set"] in base}


def markdown(results: dict) -> str:
    env = results["env"]
    copy = results["sections"].get("copy", {}).get("result") or {}
    lines = ["# bench/perf results" + (" (smoke: tiny shapes)" if results.get("smoke") else ""), "",
             f"{env.get('gpu', env['device'])}; torch {env['torch']}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}, peft {env.get('peft')}; "
             f"device copy {_f(copy.get('GBps'), '.0f')} GB/s; "
             f"{_f(results.get('elapsed_s'), '.0f')} s in all.", ""]

    lines += ["## Fused equals foreach on this device", _status(results, "agree"), ""]
    agree = [r for r in _rows(results, "agree") if "param" in r]
    lines += _table(["dtype", "mode", "metric", "θ", "exp_avg", "ok"],
                    [[r["dtype"], r["mode"], r["metric"], _f(r["param"], ".3g"), _f(r["exp_avg"], ".3g"),
                      r["ok"]] for r in agree]) + [""]

    steps = _rows(results, "step-1b") + _rows(results, "step-7b")
    ratio = step_ratios(steps)
    lines += ["## Optimizer step alone",
              "Bytes per parameter: what a fused implementation must move (bf16 anchors); foreach "
              "rows move more, so their GB/s is 'effective'. Roofline = those bytes at the copy "
              "bandwidth.", _status(results, "step-1b"), _status(results, "step-7b"), ""]
    lines += _table(["set", "optimizer", "params", "moments", "ms/step", "B/param", "GB/s",
                     "of copy bw", "roofline ms", "× AdamW fused"],
                    [[r["set"], r["row"], f"{r['params'] / 1e9:.2f}B", r.get("moments", "–"),
                      _f(r.get("ms")), _f(r.get("bytes_per_param"), ".0f"), _f(r.get("GBps"), ".0f"),
                      _f(r.get("of_copy_bw"), ".0%"), _f(r.get("roofline_ms")),
                      _f(ratio.get((r["set"], r["row"])), ".2f") if "error" not in r else r["error"]]
                     for r in steps]) + [""]

    mem = _rows(results, "memory")
    lines += ["## Memory of anchors and references (bytes per parameter)", _status(results, "memory"), ""]
    lines += _table(["case", "stored", "accelerator"],
                    [[r["case"], ", ".join(f"{k}: {v:.2f}" for k, v in r["stored_bytes_per_param"].items()) or "0",
                      _f(r["device_bytes_per_param"])] for r in mem]) + [""]

    lines += ["## Training step (batch 1, random weights)", _status(results, "train-1b"),
              _status(results, "train-7b"), ""]
    train = [("~1B full", r) for r in _rows(results, "train-1b")] + \
            [("7B LoRA r=16", r) for r in _rows(results, "train-7b")]
    lines += _table(["model", "variant", "seq", "ms/step", "vs AdamW", "peak GiB"],
                    [[m, r["variant"], r["seq"], _f(r.get("ms"), ".1f"),
                      _f(r.get("overhead_vs_adamw"), "+.1%"), _f(r.get("peak_GiB"), ".1f")]
                     if "error" not in r else [m, r["variant"], r["seq"], r["error"], "", ""]
                     for m, r in train]) + [""]

    lines += ["## Goals", ""] + goals(results, steps, ratio, mem, train)
    return "\n".join(lines) + "\n"


def goals(results, steps, ratio, mem, train) -> list[str]:
    out = []
    lora = {r["variant"]: r for m, r in train if m.startswith("7B")}
    coupled = lora.get("method coupled (penalty + balanced)", {})
    if "overhead_vs_adamw" in coupled:
        v = coupled["overhead_vs_adamw"]
        out.append(f"- LoRA step overhead of the full method ≤ {GOALS['lora_overhead']:.0%}: "
                   f"{v:+.1%} → {'met' if v <= GOALS['lora_overhead'] else 'NOT met'}")
    for r in steps:
        if r.get("row") == "balanced-fused" and "ms" in r:
            x = ratio.get((r["set"], r["row"]))
            bw = r.get("of_copy_bw")
            ok = x is not None and x <= GOALS["step_vs_adamw"] and bw is not None and bw >= GOALS["of_copy_bw"]
            out.append(f"- fused step, {r['set']}: {_f(x)}× AdamW(fused=True) (goal ≤ {GOALS['step_vs_adamw']}), "
                       f"{_f(bw, '.0%')} of copy bandwidth (goal ≥ {GOALS['of_copy_bw']:.0%}) → "
                       f"{'met' if ok else 'NOT met'}")
    for r in mem:
        if r["case"] in ("anchor init, bf16, beside", "anchor init, bf16, CPU (pinned)"):
            stored = sum(r["stored_bytes_per_param"].values())
            out.append(f"- {r['case']}: {stored:.2f} B/param stored, {r['device_bytes_per_param']:.2f} "
                       f"B/param on the accelerator (goal ≤ {GOALS['anchor_bytes']:.0f}; CPU → 0)")
    return out or ["- (no section with a goal finished)"]
