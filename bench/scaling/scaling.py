"""Scaling of full fine-tuning with the method over 1, 2 (and 4) GPUs: the files a run needs,
and the report. bench/scaling/run.sh calls both around the `dirtune train` runs.

    python bench/scaling/scaling.py prepare WORK [--steps 20 --batch 8 --seq 1024 --max-gpus 4]
    python bench/scaling/scaling.py report WORK OUT
    python bench/scaling/scaling.py prepare WORK --tiny      # small shapes, for a CPU check

prepare writes WORK/model (config.json of a ~1B LLaMA-2-shaped model, initialised at random by
`model.from_scratch`, and a character tokenizer: 100 of the 32000 ids are used), WORK/tokens.txt
(random characters: one token each, blocked into `seq`-token rows) and WORK/run.yaml (the
method: balanced_adamw, anchor init, balance scale, decoupled row turn; bf16 anchors).
report reads WORK/runs/gpus-N/summary.json (per-step wall times, peak memory) and writes
OUT/scaling.json and OUT/scaling.md: tokens/s over the steps after the warm-up, peak GPU
memory of process 0, and scaling efficiency tps(N) / (N · tps(1)).

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
try:
    import dirtune  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(HERE.parents[1] / "src"))

# LLaMA-2 shapes at ~1B: hidden 2048, 16 layers of 16 heads, MLP 5504 (0.94B parameters)
MODEL_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                intermediate_size=5504, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
MODEL_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=172, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5)
WARMUP = 5  # steps left out of the throughput (allocator growth, autotuning, first all-gathers)


def prepare(work: Path, steps: int, batch: int, seq: int, max_gpus: int, tiny: bool) -> None:
    from transformers import LlamaConfig

    from dirtune.data.synthetic import _ALPHABET, char_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer()
    config = LlamaConfig(**(MODEL_TINY if tiny else MODEL_1B), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    config.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    # rows of `seq` tokens for every step of the largest stage, and 20% to spare
    rng = random.Random(0)
    letters = [c for c in _ALPHABET if c != "\n"]
    chars = int(1.2 * steps * batch * seq * max_gpus)
    (work / "tokens.txt").write_text("".join(rng.choices(letters, k=chars)), encoding="utf-8")
    (work / "run.yaml").write_text(RUN_YAML.format(work=work, steps=steps, batch=batch, seq=seq))
    print(f"prepared {work}: {'tiny' if tiny else '~1B'} model, {chars:,} tokens, {steps} steps "
          f"of {batch} x {seq} tokens per GPU")


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
"""


def _stage(run: Path, batch: int, seq: int) -> dict:
    """One stage's numbers from its run folder (and its exit status, written by run.sh)."""
    n = int(run.name.split("-")[-1])
    rc_file = run.with_suffix(".rc")
    row: dict = {"gpus": n, "exit_status": int(rc_file.read_text()) if rc_file.exists() else None}
    summary_file = run / "summary.json"
    if not summary_file.exists():
        row["error"] = "no summary.json: the run failed or was stopped (see gpus-%d.log)" % n
        return row
    s = json.loads(summary_file.read_text())
    times = s.get("step_times_s") or []
    timed = times[WARMUP:] if len(times) > WARMUP + 2 else times[1:]
    world = s.get("world_size", n)
    tokens = batch * seq * world
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    row.update(world_size=world, steps=len(times), steps_timed=len(timed),
               step_s_median=statistics.median(timed) if timed else None,
               step_s_min=min(timed) if timed else None, tokens_per_step=tokens,
               tokens_per_s=tokens / statistics.median(timed) if timed else None,
               peak_gpu_memory_gib=s.get("peak_gpu_memory_gib"),
               loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
               wall_time_s=s.get("wall_time_s"), parameters=manifest.get("parameters"),
               versions=manifest.get("versions"))
    return row


def report(work: Path, out: Path) -> dict:
    spec = json.loads((work / "spec.json").read_text()) if (work / "spec.json").exists() else {}
    batch, seq = spec.get("batch", 8), spec.get("seq", 1024)
    runs = sorted((p for p in (work / "runs").glob("gpus-*") if p.is_dir()),
                  key=lambda p: int(p.name.split("-")[-1]))
    rows = [_stage(r, batch, seq) for r in runs]
    base = next((r for r in rows if r["gpus"] == 1 and r.get("tokens_per_s")), None)
    for r in rows:
        if base and r.get("tokens_per_s"):
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * base["tokens_per_s"])
    result = {"spec": spec, "warmup_steps_left_out": WARMUP, "stages": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    (out / "scaling.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


def _fmt(v, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def _markdown(result: dict) -> str:
    spec = result["spec"]
    lines = [
        "# Scaling: full fine-tuning with the method over several GPUs",
        "",
        f"Model: LLaMA-2-shaped, {spec.get('model', '?')}, random weights; seq {spec.get('seq')}, "
        f"{spec.get('batch')} rows per GPU per step, {spec.get('steps')} steps; fp32 master weights, "
        "bf16 compute. Method: BalancedAdamW (anchor init, balance scale, bf16 anchors, λ = 0.1) "
        "with the decoupled row turn (λ_dir = 0.1). 1 GPU: plain; N > 1: FSDP2 through accelerate "
        "(configs/accelerate/fsdp2-Ngpu.yaml). Throughput over the steps after the first "
        f"{result['warmup_steps_left_out']} (median step time); weak scaling (tokens per step grow "
        "with N); efficiency = tps(N) / (N · tps(1)).",
        f"Device: {spec.get('device', '?')}; command: `{spec.get('command', 'bash bench/scaling/run.sh')}`.",
        "",
        "| GPUs | tokens/step | step (s) | tokens/s | scaling efficiency | peak GPU memory (GiB, rank 0) | loss first → last | status |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["stages"]:
        status = r.get("error") or ("ok" if r.get("exit_status") in (0, None) else f"exit {r['exit_status']}")
        lines.append(
            f"| {r['gpus']} | {_fmt(r.get('tokens_per_step'), ',')} | {_fmt(r.get('step_s_median'), '.3f')} "
            f"| {_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('scaling_efficiency'), '.2f')} "
            f"| {_fmt(r.get('peak_gpu_memory_gib'), '.1f')} "
            f"| {_fmt(r.get('loss_first'), '.3f')} → {_fmt(r.get('loss_last'), '.3f')} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("work", type=Path)
    pr.add_argument("--steps", type=int, default=20)
    pr.add_argument("--batch", type=int, default=8)
    pr.add_argument("--seq", type=int, default=1024)
    pr.add_argument("--max-gpus", type=int, default=4)
    pr.add_argument("--tiny", action="store_true", help="small shapes, for a CPU check")
    pr.add_argument("--device", default="", help="recorded in the report")
    pr.add_argument("--command", default="bash bench/scaling/run.sh", help="recorded in the report")
    rp = sub.add_parser("report")
    rp.add_argument("work", type=Path)
    rp.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.work, a.steps, a.batch, a.seq, a.max_gpus, a.tiny)
        spec = {"steps": a.steps, "batch": a.batch, "seq": a.seq, "device": a.device,
                "command": a.command, "model": "tiny" if a.tiny else
                "hidden 2048, 16 layers, 16 heads, MLP 5504, vocab 32000 (0.94B parameters)"}
        (a.work / "spec.json").write_text(json.dumps(spec, indent=2))
    else:
        report(a.work, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
