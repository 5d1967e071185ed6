#!/usr/bin/env bash
# Before/after profiles of one run on the CPU (bench/gpu/README.md, "Where the time goes"):
#     bash bench/gpu/profile_cpu.sh [NAME ...]      NAME = skeleton-{lora,full}-{before,after}, smollm2-{lora,full}-{before,after}
# before = the code of main at 3ca1023 (extracted to runs/before/src), after = this checkout.
# skeleton = SmolLM2's architecture (30 layers, 9/3 heads, tied embeddings) made narrow with a
# 100-character tokenizer, so that a step's time is host work; smollm2 = the real model (made by
# a conversion of the GGUF into runs/models/smollm2-fp32) at a few steps, for the per-evaluation
# and per-run costs whose size depends on the weights (checkpoints, final/, drift meter, loading).
# Output: bench/gpu/profile-results/NAME.txt (the table; the command is its first line).
set -euo pipefail
PY=${PY:-/work/main/.venv/bin/python}
RES=bench/gpu/profile-results
mkdir -p "$RES" runs/prof
[ -d runs/before/src ] || { mkdir -p runs/before && git archive 3ca1023 src | tar -x -C runs/before; }
[ -d runs/models/smol-skeleton ] || PYTHONPATH=$PWD/src "$PY" bench/gpu/profile_run.py --skeleton runs/models/smollm2-fp32 runs/models/smol-skeleton
B=../shared/bench
SKELETON="model.path=runs/models/smol-skeleton data.template=llama2 data.train_file=$B/alpaca_en_demo.json
  data.max_length=96 data.max_samples=400 data.max_eval_samples=64 data.valid_ratio=0.1 data.test_ratio=0.05
  train.batch_size=8 train.eval_batch_size=32 train.max_steps=40 train.eval_every=10 train.drift_every=10
  train.log_every=5 train.lr_scheduler=constant train.warmup_steps=5"
SMOLLM2="model.path=runs/models/smollm2-fp32 data.template=tokenizer data.train_file=$B/identity.json
  data.max_length=128 data.max_eval_samples=8 data.valid_ratio=0.15 data.test_ratio=0.15
  train.batch_size=2 train.eval_batch_size=8 train.max_steps=6 train.eval_every=2 train.drift_every=2
  train.log_every=2 train.lr_scheduler=constant train.warmup_steps=0"
COMMON="train.save_total_limit=1 train.save_only_model=true train.report_to=[none] train.progress=false
  train.device=cpu train.overwrite=true finetune.lora_r=16 finetune.lora_alpha=32 finetune.lora_dropout=0.0"
BEFORE="data.forget_file=$B/c4_demo.jsonl"   # the old settings: best weights as checkpoint folders, final/, loss.png
AFTER="data.forget_files=[web=$B/c4_demo.jsonl] train.keep_best=memory train.save_final=false train.plot=false"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(skeleton-lora-before skeleton-lora-after skeleton-full-before skeleton-full-after
                                 smollm2-lora-before smollm2-lora-after smollm2-full-before smollm2-full-after)
for name in "${names[@]}"; do
  IFS=- read -r model kind when <<< "$name"
  [ "$model" = skeleton ] && { args=$SKELETON; at=12; } || { args=$SMOLLM2; at=3; }
  [ "$when" = before ] && { src=runs/before/src; extra=$BEFORE; } || { src=src; extra=$AFTER; }
  [ "$kind" = lora ] && lr=1e-3 || lr=1e-4
  cmd="PYTHONPATH=$src OMP_NUM_THREADS=1 $PY bench/gpu/profile_run.py --count-ops $at $(echo $args $COMMON $extra) finetune.type=$kind optimizer.lr=$lr train.output_dir=runs/prof/$name"
  echo "+ $cmd" > "$RES/$name.txt"
  echo "uptime: $(uptime)" >> "$RES/$name.txt"
  eval "$cmd" 2>&1 | grep -v -e Warning -e warnings.warn -e "Loading weights" -e "Writing model" >> "$RES/$name.txt"
  echo "uptime: $(uptime)" >> "$RES/$name.txt"
  grep -A 40 '^wall' "$RES/$name.txt" | head -n 3
done
