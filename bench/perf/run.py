"""What the method costs on a GPU: one script, one call, a few minutes.

    python bench/perf/run.py --out "$OUT"            # the H200 run (about 3-4 minutes)
    python bench/perf/run.py --smoke --out /tmp/p    # tiny shapes on the CPU, seconds

Sections, in this order; perf.json and perf.md are rewritten into --out after every section,
so a run cut short still leaves its results:

  copy       device-to-device copy bandwidth (the roofline every step is compared with)
  check      every Triton kernel and fused path against its float64 / foreach reference on this
             GPU at LLaMA shapes (perf_check.py); a failed check stops the run (exit 2) before
             anything is timed
  floor      the penalty alone (dense over ~1B's projections, LoRA over 7B's bases) against the
             bytes it must move at the copy bandwidth, and its plain-torch reference
  train-1b   full fine-tuning step of the ~1B model (seq 2048, batch 1), variants interleaved over
             8 short rounds, each step also timed with the host ahead (device ms, host ms); one
             profiled step per variant (GPU time by kernel kind, host syncs)
  train-7b   LLaMA-2-7B + LoRA r=16 on every projection (seq 2048, batch 1, checkpointing), 5 rounds
  step-7b    optimizer step alone on LLaMA-2-7B's parameter set (32 layers bf16; 16 layers
             fp32), the fused rows interleaved with AdamW(fused=True)

and, only when named in --only: agree (the older fused-vs-foreach check), step-1b (every
optimizer row on ~1B), memory (bytes per parameter of anchors and references).
--budget stops starting sections once that many seconds have passed. Weights are random:
these are timings, not training runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import dirtune  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(HERE.parents[1] / "src"))

import torch  # noqa: E402
from perf_check import gpu_checks  # noqa: E402
from perf_floor import dense_floor, lora_floor  # noqa: E402
from perf_measure import (  # noqa: E402
    LLAMA_1B,
    LLAMA_7B,
    SMOKE_1B,
    SMOKE_7B,
    anchor_memory,
    copy_bandwidth,
    fused_agreement,
    optimizer_step,
    optimizer_step_rounds,
)
from perf_report import markdown  # noqa: E402
from perf_train import training_step  # noqa: E402

SECTIONS = ["copy", "check", "floor", "train-1b", "train-7b", "step-7b", "agree", "step-1b", "memory"]
DEFAULT = ["copy", "check", "floor", "train-1b", "train-7b", "step-7b"]


def plan(smoke: bool, device: torch.device, copy_bw) -> dict:
    """Section name → (callable, seconds it needs at least to be worth starting)."""
    big7, big1 = (SMOKE_7B, SMOKE_1B) if smoke else (LLAMA_7B, LLAMA_1B)
    seq = 32 if smoke else 2048
    reps = dict(warmup=1, reps=2) if smoke else dict(warmup=3, reps=10)
    bf16, fp32 = torch.bfloat16, torch.float32
    rounds = dict(warmup=1, reps=2, rounds=3) if smoke else dict(warmup=2, reps=8, rounds=3)
    return {
        "copy": (lambda: copy_bandwidth(device, (1 << 20) if smoke else (2 << 30)), 5),
        "check": (lambda: gpu_checks(device), 30),
        "floor": (lambda: dense_floor(big1, device, copy_bw(), **reps) + lora_floor(big7, device, copy_bw(), **reps), 20),
        # 1B: many short rounds (the A/B is judged per round); host-ahead device times; one
        # profiled step per variant. ~30 s on an H200. 7B: fewer, longer steps; ~60-70 s.
        "train-1b": (lambda: training_step(big1, device, lora=False, seq=seq, checkpointing=False,
                                           warmup=1, reps=2 if smoke else 3, rounds=3 if smoke else 8,
                                           min_rounds=3 if smoke else 5, deadline=time.time() + 45,
                                           split=True, profile=True), 30),
        "train-7b": (lambda: training_step(big7, device, lora=True, seq=seq, checkpointing=True,
                                           warmup=1, reps=2, rounds=3 if smoke else 5, min_rounds=3,
                                           deadline=time.time() + 60, split=True), 60),
        "step-7b": (lambda: optimizer_step_rounds(big7, bf16, device, label="7B bf16", copy_GBps=copy_bw(), **rounds)
                    + optimizer_step_rounds(big7, fp32, device, label="7B (16 of 32 layers) fp32",
                                            layers=None if smoke else 16, copy_GBps=copy_bw(),
                                            **rounds), 30),
        "agree": (lambda: fused_agreement(device), 20),
        "step-1b": (lambda: optimizer_step(big1, bf16, device, label="1B bf16", copy_GBps=copy_bw(),
                                           with_cpu_anchor=True, **reps)
                    + optimizer_step(big1, fp32, device, label="1B fp32", copy_GBps=copy_bw(), **reps), 20),
        "memory": (lambda: anchor_memory(big1, device), 10),
    }


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_GiB"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    for name in ("transformers", "peft"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on the CPU in seconds)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results" / "latest"),
                    help="folder for perf.json and perf.md (default: $OUT)")
    ap.add_argument("--only", default=",".join(DEFAULT), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--budget", type=float, default=270.0,
                    help="seconds after which no further section is started")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown sections {unknown}; accepted: {SECTIONS}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only spin, worse on a shared machine
    try:
        return _run(args, only, out_dir, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, only: list[str], out_dir: Path, device: torch.device) -> int:
    t0 = time.time()
    results = {"smoke": args.smoke, "env": environment(device), "sections": {}}

    def copy_bw():
        row = results["sections"].get("copy", {}).get("result")
        return row["GBps"] if isinstance(row, dict) else None

    def save():
        results["elapsed_s"] = time.time() - t0
        (out_dir / "perf.json").write_text(json.dumps(results, indent=1, default=str))
        (out_dir / "perf.md").write_text(markdown(results))

    print(f"device {device}, {results['env']}", flush=True)
    for name, (fn, needs) in plan(args.smoke, device, copy_bw).items():
        if name not in only:
            continue
        left = args.budget - (time.time() - t0)
        if left < needs and not args.smoke:
            results["sections"][name] = {"skipped": f"{left:.0f} s left of the budget, needs ~{needs} s"}
            print(f"[{name}] skipped: out of time", flush=True)
            continue
        print(f"[{name}] {time.time() - t0:6.1f} s", flush=True)
        start = time.time()
        try:
            results["sections"][name] = {"result": fn()}
        except Exception as e:  # keep going: the other sections still measure something
            results["sections"][name] = {"error": f"{type(e).__name__}: {e}",
                                         "traceback": traceback.format_exc()[-2000:]}
            print(f"[{name}] FAILED {type(e).__name__}: {e}", flush=True)
        results["sections"][name]["seconds"] = time.time() - start
        if name == "check":
            bad = [r for r in results["sections"][name].get("result", [{"check": "check", "ok": False}])
                   if not r.get("ok")]
            if "error" in results["sections"][name] or bad:
                what = "; ".join(f"{r.get('check')}: {r.get('error') or r.get('metric')} = {r.get('value')} "
                                 f"(limit {r.get('limit')})" for r in bad) or results["sections"][name]["error"]
                results["stopped"] = f"a kernel disagrees with its reference: {what}"
                save()
                print(f"STOPPED: {results['stopped']}", flush=True)
                return 2
            print(f"[check] all {len(results['sections'][name]['result'])} checks passed", flush=True)
        save()
    save()
    print(markdown(results), flush=True)
    print(f"wrote {out_dir / 'perf.json'} and {out_dir / 'perf.md'} in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
