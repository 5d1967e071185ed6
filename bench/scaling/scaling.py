"""Scaling of full fine-tuning with the method over 1, 2, 4 and 8 GPUs, and one large model
that fits only sharded: the files a run needs, and the report. bench/scaling/run.sh calls both
around the `dirtune train` runs; the stages come from scaling_plan.py.

    python bench/scaling/scaling.py prepare WORK [--steps 20 --batch 8 --seq 1024 --max-gpus 4 --big 7b]
    python bench/scaling/scaling.py report WORK OUT
    python bench/scaling/scaling.py prepare WORK --tiny      # small shapes, for a CPU check

prepare writes WORK/model (config.json of a ~1B LLaMA-2-shaped model, initialised at random by
`model.from_scratch`, and a character tokenizer: 100 of the 32000 ids are used), WORK/model-BIG
(the large model's config.json), WORK/tokens.txt (random characters: one token each, blocked into
`seq`-token rows) and WORK/run.yaml (the method: balanced_adamw, anchor init, balance scale,
decoupled row turn; bf16 anchors).
report reads WORK/plan.json (scaling_plan.py --json), and for each stage WORK/runs/STAGE/
(summary.json: per-step wall times, rank 0's peak memory), WORK/runs/STAGE.status (what run.sh
saw: exit status, seconds, limit, or why it was skipped) and WORK/runs/STAGE.gpumem (nvidia-smi
samples: every GPU's memory in use), and writes OUT/scaling.json and OUT/scaling.md: tokens/s over
the steps after the warm-up, peak memory of every rank, and the scaling efficiency of the ~1B
stages, tps(N) / (N · tps(1)) against the 1-GPU stage of the same call.

Weak scaling: each GPU takes `batch` rows of `seq` tokens per step, so N GPUs step N times as
many tokens; the efficiency is 1 when N GPUs process N times the tokens per second.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from dirtune.train.run_folder import read_metrics

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))          # scaling_plan, beside this file
try:
    import dirtune  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(HERE.parents[1] / "src"))

from scaling_plan import SHAPES, parameters  # noqa: E402

COMMON = dict(max_position_embeddings=4096, rms_norm_eps=1e-5)
MODEL_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=172, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5)
WARMUP = 5  # steps left out of the throughput (allocator growth, autotuning, first all-gathers)
TIMED_OUT = (124, 137)  # timeout(1): the limit ran out; 137 when it had to kill


def _write_model(folder: Path, shape: dict, tok) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config.save_pretrained(folder)
    tok.save_pretrained(folder)


def prepare(work: Path, steps: int, batch: int, seq: int, max_gpus: int, tiny: bool, big: str = "7b",
            big_steps: int = 12) -> None:
    from dirtune.data.synthetic import _ALPHABET, char_tokenizer

    if big not in SHAPES:
        raise SystemExit(f"--big {big!r}: expected one of {sorted(SHAPES)}")
    work.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer()
    _write_model(work / "model", MODEL_TINY if tiny else {**SHAPES["1b"], **COMMON}, tok)
    _write_model(work / f"model-{big}", MODEL_TINY if tiny else {**SHAPES[big], **COMMON}, tok)
    # rows of `seq` tokens for every step of the largest stage, and 20% to spare
    rng = random.Random(0)
    letters = [c for c in _ALPHABET if c != "\n"]
    chars = int(1.2 * max(steps, big_steps) * batch * seq * max_gpus)
    (work / "tokens.txt").write_text("".join(rng.choices(letters, k=chars)), encoding="utf-8")
    (work / "run.yaml").write_text(RUN_YAML.format(work=work, steps=steps, batch=batch, seq=seq))
    print(f"prepared {work}: {'tiny' if tiny else '~1B and ' + big} models, {chars:,} tokens, {steps} "
          f"steps ({big_steps} for {big}) of {batch} x {seq} tokens per GPU")


RUN_YAML = """\
# written by bench/scaling/scaling.py prepare; run through bench/scaling/run.sh
model:
  path: {work}/model
  from_scratch: true        # random weights from config.json: a timing run, not a training run
  dtype: fp32               # fp32 master weights; bf16 compute comes from accelerate's mixed_precision
finetune:
  type: full
data:
  train_file: {work}/tokens.txt
  format: text
  max_length: {seq}
  valid_ratio: 0            # no validation: every step is a training step
method:
  penalty: decoupled        # the direction turn, applied by the optimizer
  direction_weight: 0.1
  granularity: row
  reference_dtype: bf16
optimizer:
  name: balanced_adamw
  lr: 1.0e-4
  weight_decay: 0.1
  anchor: init
  balance: scale
  anchor_dtype: bf16
train:
  seed: 0
  max_steps: {steps}
  batch_size: {batch}       # per GPU
  grad_accum: 1
  lr_scheduler: constant
  max_grad_norm: 1.0
  eval_every: 100000        # never: no checkpoints either
  log_every: 1
  drift_every: 0
  report_to: [none]
  progress: false
  save_final: false          # the weights are not read: no gigabytes to gather and write
"""


def _status(runs: Path, name: str) -> tuple[str, dict]:
    """('ok' | 'skipped: …' | 'timed out after L s' | 'exit N' | 'not run', run.sh's record)."""
    f = runs / f"{name}.status"
    if not f.exists():
        return "not run: run.sh recorded nothing (the call ended before this stage?)", {}
    rec = json.loads(f.read_text())
    if rec.get("skipped"):
        return f"skipped: {rec['skipped']}", rec
    if rec.get("exit") in TIMED_OUT:
        return f"timed out after {rec.get('seconds')} s (limit {rec.get('limit')} s)", rec
    if rec.get("exit") != 0:
        return f"exit {rec.get('exit')} (see {name}.log)", rec
    return "ok", rec


def _gpu_peaks(samples: Path, gpus: int) -> list[float] | None:
    """Peak memory in use on GPUs 0..gpus-1 (GiB) from nvidia-smi lines 'index, MiB'."""
    if not samples.exists():
        return None
    peak = [0.0] * gpus
    for line in samples.read_text().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].replace(".", "", 1).isdigit():
            i = int(parts[0])
            if i < gpus:
                peak[i] = max(peak[i], float(parts[1]) / 1024)
    return peak if any(peak) else None


def _stage(runs: Path, st: dict, batch: int, seq: int) -> dict:
    """One stage's numbers from its run folder and run.sh's records."""
    name, run = st["name"], runs / st["name"]
    status, rec = _status(runs, name)
    row: dict = {"stage": name, "model": st["shape"], "gpus": st["gpus"], "scaling": st["scaling"],
                 "estimate_gib_per_gpu": st["estimate_gib"], "status": status,
                 "seconds": rec.get("seconds"), "limit_s": rec.get("limit"),
                 "parameters": parameters(SHAPES[st["shape"]]),
                 "peak_used_gib_per_gpu": _gpu_peaks(runs / f"{name}.gpumem", st["gpus"])}
    summary_file = run / "summary.json"
    if not summary_file.exists():
        if status == "ok":
            row["status"] = f"no summary.json: the run ended without one (see {name}.log)"
        return row
    s = json.loads(summary_file.read_text())
    times = s.get("step_times_s") or []
    timed = times[WARMUP:] if len(times) > WARMUP + 2 else times[1:]
    world = s.get("world_size", st["gpus"])
    tokens = batch * seq * world
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    step = statistics.median(timed) if timed else None
    row.update(world_size=world, steps=len(times), steps_timed=len(timed), step_s_median=step,
               step_s_min=min(timed) if timed else None, tokens_per_step=tokens,
               tokens_per_s=tokens / step if step else None,
               peak_gpu_memory_gib_rank0=s.get("peak_gpu_memory_gib"),
               loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
               wall_time_s=s.get("wall_time_s"), versions=manifest.get("versions"))
    if manifest.get("parameters"):
        row["parameters"] = manifest["parameters"]
    return row


def efficiencies(rows: list[dict]) -> None:
    """scaling_efficiency = tps(N) / (N · tps(1)) for the ~1B stages, against the 1-GPU stage of
    the same call; None (and a note) where that stage has no throughput."""
    base = next((r for r in rows if r["scaling"] and r["gpus"] == 1 and r.get("tokens_per_s")), None)
    for r in rows:
        if not r["scaling"]:
            continue
        if base is None:
            r["scaling_efficiency"] = None
            r["note"] = "no 1-GPU throughput in this call: no efficiency"
        elif r.get("tokens_per_s"):
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * base["tokens_per_s"])


def report(work: Path, out: Path) -> dict:
    spec = json.loads((work / "spec.json").read_text()) if (work / "spec.json").exists() else {}
    if not (work / "plan.json").exists():
        raise SystemExit(f"{work / 'plan.json'} is missing: run.sh writes it (scaling_plan.py --json)")
    stages = json.loads((work / "plan.json").read_text())
    batch, seq = spec.get("batch", 8), spec.get("seq", 1024)
    rows = [_stage(work / "runs", st, batch, seq) for st in stages]
    efficiencies(rows)
    result = {"spec": spec, "warmup_steps_left_out": WARMUP, "stages": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    (out / "scaling.md").write_text(markdown(result))
    print(markdown(result))
    return result


def _fmt(v, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def _peaks(r: dict) -> str:
    per_gpu = r.get("peak_used_gib_per_gpu")
    return "—" if not per_gpu else " / ".join(f"{x:.1f}" for x in per_gpu)


def markdown(result: dict) -> str:
    spec = result["spec"]
    lines = [
        "# Scaling: full fine-tuning with the method over several GPUs",
        "",
        f"Models: LLaMA-2-shaped, random weights; seq {spec.get('seq')}, {spec.get('batch')} rows per "
        "GPU per step; fp32 master weights, bf16 compute. Method: BalancedAdamW (anchor init, balance "
        "scale, bf16 anchors, λ = 0.1) with the decoupled row turn (λ_dir = 0.1). 1 GPU: plain; "
        "N > 1: FSDP2 through accelerate (configs/accelerate/fsdp2-Ngpu.yaml). Throughput over the "
        f"steps after the first {result['warmup_steps_left_out']} (median step time); weak scaling "
        "(tokens per step grow with N); efficiency = tps(N) / (N · tps(1)) for the ~1B stages, "
        "against the 1-GPU stage of this call. Peak memory: torch's peak on rank 0, and every GPU's "
        "peak in use as nvidia-smi saw it (context, NCCL and allocator cache included), rank 0 first.",
        f"Device: {spec.get('device', '?')}; command: `{spec.get('command', 'bash bench/scaling/run.sh')}`.",
        "",
        "| stage | parameters | GPUs | tokens/step | step (s) | tokens/s | scaling efficiency "
        "| peak GiB, rank 0 (torch) | peak GiB in use per rank (nvidia-smi) | estimate GiB/GPU "
        "| loss first → last | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in result["stages"]:
        lines.append(
            f"| {r['stage']} | {r['parameters'] / 1e9:.2f}B | {r['gpus']} | {_fmt(r.get('tokens_per_step'), ',')} "
            f"| {_fmt(r.get('step_s_median'), '.3f')} | {_fmt(r.get('tokens_per_s'), ',.0f')} "
            f"| {_fmt(r.get('scaling_efficiency'), '.2f')} | {_fmt(r.get('peak_gpu_memory_gib_rank0'), '.1f')} "
            f"| {_peaks(r)} | {_fmt(r.get('estimate_gib_per_gpu'), '.0f')} "
            f"| {_fmt(r.get('loss_first'), '.3f')} → {_fmt(r.get('loss_last'), '.3f')} | {r['status']} |")
    notes = sorted({r["note"] for r in result["stages"] if r.get("note")})
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("work", type=Path)
    pr.add_argument("--steps", type=int, default=20)
    pr.add_argument("--big-steps", type=int, default=12)
    pr.add_argument("--batch", type=int, default=8)
    pr.add_argument("--seq", type=int, default=1024)
    pr.add_argument("--max-gpus", type=int, default=4)
    pr.add_argument("--big", default="7b", help=f"the sharded-only model: one of {sorted(SHAPES)}")
    pr.add_argument("--tiny", action="store_true", help="small shapes, for a CPU check")
    pr.add_argument("--device", default="", help="recorded in the report")
    pr.add_argument("--command", default="bash bench/scaling/run.sh", help="recorded in the report")
    rp = sub.add_parser("report")
    rp.add_argument("work", type=Path)
    rp.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.work, a.steps, a.batch, a.seq, a.max_gpus, a.tiny, a.big, a.big_steps)
        spec = {"steps": a.steps, "big_steps": a.big_steps, "batch": a.batch, "seq": a.seq,
                "device": a.device, "command": a.command, "big": a.big, "tiny": a.tiny}
        (a.work / "spec.json").write_text(json.dumps(spec, indent=2))
    else:
        report(a.work, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
