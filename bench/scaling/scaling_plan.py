"""Which stages bench/scaling/run.sh runs on a machine, and the memory arithmetic that decides
whether a model fits. Pure Python (no torch), so the plan can be printed on a CPU-only machine:

    python bench/scaling/scaling_plan.py --gpus 8                 # the stages for nvidia-h200-x8
    python bench/scaling/scaling_plan.py --gpus 4 --big 13b --tsv # what run.sh reads

Stages: the ~1B model on 1, 2, 4, 8 GPUs (powers of two up to the GPUs present; 1 GPU plain,
more FSDP2), whose tokens/s give the scaling efficiency against the 1-GPU stage of the same
call, then one large model (`--big`, LLaMA-2-7B shapes by default) sharded over all GPUs present,
which the estimate below says does not fit on one GPU.

Memory per GPU of full fine-tuning with the method, fp32 master weights and bf16 compute, for P
parameters, N GPUs, t = rows·seq tokens per GPU, L layers of width h, vocabulary V:

    states       18 P / N   fp32 weight 4 + fp32 grad 4 + Adam m, v 8 + bf16 anchor 2 bytes
                            (the turn's reference θ0 is the anchor when anchor = init)
    bf16 copies  2 P        N = 1: autocast keeps a bf16 cast of every weight until backward
                 8 U + 4 E  N > 1: the gathered fp32 units in flight (two decoder layers of U
                            parameters, prefetch included) and the root unit (embeddings, head)
    activations  34 t L h   bf16, no recomputation, SDPA (no seq² term): Korthikanti et al. 2022
    logits       12 t V     bf16 logits, their fp32 upcast, its gradient, the bf16 gradient

It fits when the sum is at most FIT (90%) of the GPU's memory: the rest is the CUDA context, NCCL
buffers and allocator fragmentation, which torch's peak does not count. Checked against the
2026-11-28 run of the 1B model: estimate 29.0 / 20.2 GiB, measured (rank 0) 29.7 / 20.1 GiB on
1 / 2 GPUs. Host memory: before sharding every process holds the whole model in fp32 and its
bf16 anchors (6 P bytes); the lent machines' memory grows as it is used, so MemTotal cannot be
read and the lent sizes below stand in (HOST_GIB).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

GIB = 2**30
FIT = 0.9               # share of a GPU's memory an estimate may fill
H200_GIB = 140.4        # nvidia-smi: 143771 MiB
# host memory of the lent machines by GPU count (device README: 128 / 256 / 512 / 560 GiB)
HOST_GIB = {1: 128, 2: 256, 4: 512, 8: 560}

# LLaMA-2 shapes (untied head, vocabulary 32000). 1b: hidden 2048, 16 layers, MLP 5504.
SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
               intermediate_size=5504, vocab_size=32000),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                intermediate_size=13824, vocab_size=32000),
    "70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, vocab_size=32000),
}


def layer_parameters(s: dict) -> int:
    h, kv = s["hidden_size"], s["num_key_value_heads"] * s["hidden_size"] // s["num_attention_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * s["intermediate_size"] + 2 * h   # q o, k v, MLP, 2 norms


def parameters(s: dict) -> int:
    h = s["hidden_size"]
    return s["num_hidden_layers"] * layer_parameters(s) + 2 * s["vocab_size"] * h + h


def gpu_bytes(s: dict, gpus: int, rows: int, seq: int) -> dict:
    """The estimate above, per GPU, by term (bytes)."""
    p, tokens = parameters(s), rows * seq
    if gpus == 1:
        copies = 2 * p
    else:
        copies = 8 * layer_parameters(s) + 4 * (2 * s["vocab_size"] * s["hidden_size"])
    terms = {"states": 18 * p / gpus, "compute_copies": copies,
             "activations": 34 * tokens * s["num_hidden_layers"] * s["hidden_size"],
             "logits": 12 * tokens * s["vocab_size"]}
    terms["total"] = sum(terms.values())
    return terms


@dataclass
class Stage:
    name: str           # run folder: gpus-N (the 1B model) or big-7b-gpus-N
    shape: str          # key of SHAPES
    gpus: int
    steps: int
    estimate_gib: float  # per GPU
    skip: str = ""      # why it is not run ("" = run)

    @property
    def scaling(self) -> bool:
        """Part of the efficiency series (the ~1B model)."""
        return not self.name.startswith("big-")


def fits(s: dict, gpus: int, rows: int, seq: int, gpu_gib: float, host_gib: float) -> tuple[float, str]:
    """(estimated GiB per GPU, '' or why the model does not fit on `gpus` GPUs)."""
    est = gpu_bytes(s, gpus, rows, seq)["total"] / GIB
    if est > FIT * gpu_gib:
        return est, f"estimated {est:.0f} GiB per GPU > {FIT:.0%} of {gpu_gib:.0f} GiB"
    host = gpus * 6 * parameters(s) / GIB
    if host > FIT * host_gib:
        return est, f"estimated {host:.0f} GiB of host memory before sharding > {FIT:.0%} of {host_gib:.0f} GiB"
    return est, ""


def plan(gpus: int, *, gpu_gib: float = H200_GIB, host_gib: float | None = None, big: str = "7b",
         rows: int = 8, seq: int = 1024, steps: int = 20, big_steps: int = 12) -> list[Stage]:
    """The stages for a machine with `gpus` GPUs (0: none; every stage is then skipped)."""
    if gpus < 0:
        raise ValueError(f"gpus must be >= 0, got {gpus}")
    if big not in SHAPES:
        raise ValueError(f"unknown model shape {big!r}; expected one of {sorted(SHAPES)}")
    host_gib = host_gib if host_gib is not None else HOST_GIB.get(gpus, HOST_GIB[8])
    stages = []
    for n in (1, 2, 4, 8):
        if n > max(gpus, 1):
            break
        est, why = fits(SHAPES["1b"], n, rows, seq, gpu_gib, host_gib)
        stages.append(Stage(f"gpus-{n}", "1b", n, steps, est, "no GPU" if gpus == 0 else why))
    # the large model on every GPU present (the lent machines have 1, 2, 4 or 8)
    n = max(gpus, 1)
    est, why = fits(SHAPES[big], n, rows, seq, gpu_gib, host_gib)
    if gpus == 0:
        why = "no GPU"
    elif gpus == 1 and not why:
        why = "fits on one GPU by the estimate: not a sharded-only stage; pick a larger --big"
    stages.append(Stage(f"big-{big}-gpus-{n}", big, n, big_steps, est, why))
    return stages


def largest_fitting(gpus: int, *, gpu_gib: float = H200_GIB, host_gib: float | None = None,
                    rows: int = 8, seq: int = 1024) -> str | None:
    """The largest of SHAPES whose full fine-tune fits on `gpus` GPUs by the estimate."""
    host_gib = host_gib if host_gib is not None else HOST_GIB.get(gpus, HOST_GIB[8])
    ok = [k for k, s in SHAPES.items() if not fits(s, gpus, rows, seq, gpu_gib, host_gib)[1]]
    return max(ok, key=lambda k: parameters(SHAPES[k]), default=None)


def describe(stages: list[Stage], gpus: int, gpu_gib: float, host_gib: float | None) -> str:
    lines = [f"plan for {gpus} GPU(s) of {gpu_gib:.0f} GiB:"]
    for st in stages:
        how = "plain" if st.gpus == 1 else f"FSDP2, configs/accelerate/fsdp2-{st.gpus}gpu.yaml"
        p = parameters(SHAPES[st.shape]) / 1e9
        state = f"skip ({st.skip})" if st.skip else "run"
        lines.append(f"  {st.name:<18} {p:5.2f}B parameters on {st.gpus} GPU(s) ({how}), {st.steps} steps, "
                     f"estimated {st.estimate_gib:.0f} GiB per GPU: {state}")
    for n in sorted({1, max(gpus, 1)}):
        lines.append(f"  largest LLaMA-2 shape that fits on {n} GPU(s) by the estimate: "
                     f"{largest_fitting(n, gpu_gib=gpu_gib, host_gib=host_gib)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, required=True, help="GPUs on the machine (0: none)")
    p.add_argument("--gpu-memory-gib", type=float, default=H200_GIB)
    p.add_argument("--host-memory-gib", type=float, default=None,
                   help="default: the lent machine's with that many GPUs")
    p.add_argument("--big", default="7b", help=f"the sharded-only model: one of {sorted(SHAPES)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--big-steps", type=int, default=12)
    p.add_argument("--tsv", action="store_true", help="one line per stage: name, GPUs, shape, steps, skip")
    p.add_argument("--json", default=None, help="also write the plan here")
    a = p.parse_args(argv)
    try:
        stages = plan(a.gpus, gpu_gib=a.gpu_memory_gib, host_gib=a.host_memory_gib, big=a.big,
                      steps=a.steps, big_steps=a.big_steps)
    except ValueError as e:
        p.error(str(e))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(vars(st), scaling=st.scaling) for st in stages], f, indent=2)
    if a.tsv:
        for st in stages:
            print("\t".join([st.name, str(st.gpus), st.shape, str(st.steps), st.skip or "-"]))
    else:
        print(describe(stages, a.gpus, a.gpu_memory_gib, a.host_memory_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
