#!/usr/bin/env bash
# On a machine with 2 (or 4) GPUs (device tool), from the repo root, in one call of <= 5 minutes:
#   bash bench/scaling/run.sh
# Full fine-tuning of a ~1B LLaMA-2-shaped model (random weights, fp32 master + bf16 compute,
# seq 1024, 8 rows per GPU) with the method (balanced_adamw + decoupled row turn), STEPS steps
# per stage, through `dirtune train` under `accelerate launch`: 1 GPU plain, then 2 GPUs and
# (when there are 4) 4 GPUs sharded with FSDP2 (configs/accelerate/fsdp2-Ngpu.yaml).
# Writes $OUT/scaling.json, $OUT/scaling.md and every stage's log. Each stage runs under its own
# time limit; a stage that fails or runs out of time is reported as such and the rest still run.
# Environment: STEPS (20), STAGE_LIMIT (seconds per stage, 100), TOTAL (seconds for all, 280).
set -uo pipefail
OUT=${OUT:-/tmp/scaling-out}
STEPS=${STEPS:-20}
STAGE_LIMIT=${STAGE_LIMIT:-100}
TOTAL=${TOTAL:-280}
START=$(date +%s)
mkdir -p "$OUT"

# wheels carried to the machine (datasets, ...), as bench/gpu/run_benches.sh installs them
for w in .gpu/whl .gpu2/whl; do
  if ls $w/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $w/*.whl \
      > "$OUT/pip.log" 2>&1 || echo "pip install from $w failed (see pip.log)"
    break
  fi
done
# NCCL_NVLS_ENABLE=0: the lent machines need NVLink multicast off
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false

WORK=/tmp/dirtune-scaling
rm -rf "$WORK"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "GPUs: $NGPU x $DEVICE" | tee "$OUT/stages.txt"
[ "$NGPU" -ge 1 ] || echo "no GPU visible: every stage will be skipped"
python3 bench/scaling/scaling.py prepare "$WORK" --steps "$STEPS" --max-gpus $(( NGPU > 0 ? NGPU : 1 )) \
  --device "$NGPU x $DEVICE" --command "bash bench/scaling/run.sh (STEPS=$STEPS)" > "$OUT/prepare.log" 2>&1 \
  || { echo "prepare failed:"; tail -20 "$OUT/prepare.log"; }

mkdir -p "$WORK/runs"
LAUNCH="python3 -m accelerate.commands.launch"
for n in 1 2 4; do
  [ "$n" -gt "$NGPU" ] && continue
  left=$(( TOTAL - ($(date +%s) - START) - 15 ))        # keep 15 s for the report
  limit=$(( left < STAGE_LIMIT ? left : STAGE_LIMIT ))
  if [ "$limit" -lt 30 ]; then
    echo "$n GPUs: skipped, $left s left" | tee -a "$OUT/stages.txt"; continue
  fi
  if [ "$n" = 1 ]; then
    # one process on one GPU (with more visible, Trainer would use DataParallel)
    args=(--num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
    visible=0
  else
    args=(--config_file "configs/accelerate/fsdp2-${n}gpu.yaml" --main_process_port $((29500 + n)))
    visible=$(seq -s, 0 $((n - 1)))
  fi
  t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=$visible timeout -k 10 "$limit" $LAUNCH "${args[@]}" -m dirtune.cli train \
    "$WORK/run.yaml" "train.output_dir=$WORK/runs/gpus-$n" > "$OUT/gpus-$n.log" 2>&1
  rc=$?
  echo "$rc" > "$WORK/runs/gpus-$n.rc"
  echo "$n GPUs: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$OUT/stages.txt"
  [ "$rc" != 0 ] && tail -n 30 "$OUT/gpus-$n.log"
  # the final weights are not needed here (gigabytes): keep the disk for the next stage
  rm -rf "$WORK/runs/gpus-$n/final" "$WORK/runs/gpus-$n"/checkpoint-*
  cp "$WORK/runs/gpus-$n/summary.json" "$OUT/gpus-$n.summary.json" 2>/dev/null
done

python3 bench/scaling/scaling.py report "$WORK" "$OUT" || echo "report failed"
ls -la "$OUT"
