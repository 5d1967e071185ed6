#!/usr/bin/env bash
# On a machine with 1, 2, 4 or 8 GPUs (device tool: nvidia-h200, -x2, -x4, -x8), from the repo
# root, in one call of at most 10 minutes:
#   bash bench/scaling/run.sh
#   GPUS=8 bash bench/scaling/run.sh --dry-run     # anywhere, no GPU: the stages it would run
# Full fine-tuning with the method (balanced_adamw + decoupled row turn; fp32 master weights,
# bf16 compute, seq 1024, 8 rows per GPU) through `dirtune train` under `accelerate launch`:
#   gpus-N         a ~1B LLaMA-2-shaped model (random weights) on N = 1, 2, 4, 8 GPUs (powers of two
#                  up to the GPUs present): 1 GPU plain, N > 1 FSDP2 (configs/accelerate/fsdp2-Ngpu.yaml);
#                  tokens/s and scaling efficiency against the 1-GPU stage of this call
#   big-7b-gpus-N  LLaMA-2-7B shapes sharded over every GPU present: by scaling_plan.py's memory
#                  arithmetic it does not fit on one H200; step time and every rank's peak memory
# The plan (which stages, and why one is skipped) comes from bench/scaling/scaling_plan.py.
# Every stage runs under its own time limit; one that fails or runs out of time is reported as
# such and the rest still run. Writes $OUT/scaling.json, $OUT/scaling.md and $OUT/logs.tar.gz
# (every stage's log, summary and nvidia-smi samples): the device returns at most 8 files.
# Environment: STEPS (20), BIG_STEPS (12), BIG (7b; 13b fits on 4 GPUs by the estimate),
# STAGE_LIMIT (s per ~1B stage, 100), BIG_LIMIT (s for the large stage, 300), TOTAL (s for all, 560),
# GPUS (pretend this many GPUs; for --dry-run), GPU_MEMORY_GIB, HOST_MEMORY_GIB (see scaling_plan.py),
# WORK (/tmp/dirtune-scaling: models, data, run folders; emptied first).
set -uo pipefail
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/scaling/run.sh [--dry-run]  (got: $1)" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/scaling-out}
STEPS=${STEPS:-20}
BIG_STEPS=${BIG_STEPS:-12}
BIG=${BIG:-7b}
STAGE_LIMIT=${STAGE_LIMIT:-100}
BIG_LIMIT=${BIG_LIMIT:-300}
TOTAL=${TOTAL:-560}
START=$(date +%s)
WORK=${WORK:-/tmp/dirtune-scaling}
HERE=bench/scaling

NGPU=${GPUS:-$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-$([ -n "$MEM_MIB" ] && echo $(( MEM_MIB / 1024 )) || echo 140.4)}
plan_args=(--gpus "$NGPU" --gpu-memory-gib "$GPU_MEMORY_GIB" --big "$BIG" --steps "$STEPS" --big-steps "$BIG_STEPS")
[ -n "${HOST_MEMORY_GIB:-}" ] && plan_args+=(--host-memory-gib "$HOST_MEMORY_GIB")

# The accelerate arguments of a stage on $1 GPUs of shape $2 (each stage its own port: the last
# stage's may still be held for a while after it ended).
launch_args() {
  if [ "$1" = 1 ]; then  # one process on one GPU (with more visible, Trainer would use DataParallel)
    echo "--num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no"
  else
    local port=$(( 29500 + $1 )); [ "$2" != 1b ] && port=$(( 29600 + $1 ))
    echo "--config_file configs/accelerate/fsdp2-${1}gpu.yaml --num_processes $1 --main_process_port $port"
  fi
}
stage_overrides() {  # $1 stage name, $2 shape, $3 steps
  local model="$WORK/model"
  [ "$2" != 1b ] && model="$WORK/model-$2"
  echo "model.path=$model train.output_dir=$WORK/runs/$1 train.max_steps=$3"
}

if [ "$DRY" = 1 ]; then
  python3 "$HERE/scaling_plan.py" "${plan_args[@]}" || exit 1
  echo "time: $TOTAL s in all; $STAGE_LIMIT s per ~1B stage, $BIG_LIMIT s for the large one"
  python3 "$HERE/scaling_plan.py" "${plan_args[@]}" --tsv | while IFS=$'\t' read -r name n shape steps skip; do
    [ "$skip" != - ] && continue
    echo "would run $name: CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) python3 -m accelerate.commands.launch" \
      "$(launch_args "$n" "$shape") -m dirtune.cli train $WORK/run.yaml $(stage_overrides "$name" "$shape" "$steps")"
  done
  exit 0
fi

rm -rf "$WORK" "$OUT/logs"
mkdir -p "$OUT/logs" "$WORK/runs"
LOGS=$OUT/logs
# wheels carried to the machine (datasets, ...), as bench/gpu/run_benches.sh installs them
for w in .gpu/whl .gpu2/whl; do
  if ls $w/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $w/*.whl \
      > "$LOGS/pip.log" 2>&1 || echo "pip install from $w failed (see pip.log)"
    break
  fi
done
# NVLink multicast off (the lent machines need it so): NCCL, PyTorch's symmetric memory, NVSHMEM
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

echo "GPUs: $NGPU x ${DEVICE:-none} ($GPU_MEMORY_GIB GiB)" | tee "$LOGS/stages.txt"
python3 "$HERE/scaling_plan.py" "${plan_args[@]}" --json "$WORK/plan.json" | tee -a "$LOGS/stages.txt"
python3 "$HERE/scaling.py" prepare "$WORK" --steps "$STEPS" --big-steps "$BIG_STEPS" --big "$BIG" \
  --max-gpus $(( NGPU > 0 ? NGPU : 1 )) --device "$NGPU x ${DEVICE:-no GPU}" \
  --command "bash bench/scaling/run.sh (STEPS=$STEPS BIG=$BIG BIG_STEPS=$BIG_STEPS)" > "$LOGS/prepare.log" 2>&1 \
  || { echo "prepare failed:"; tail -20 "$LOGS/prepare.log"; }

status() { echo "$2" > "$WORK/runs/$1.status"; }
LAUNCH="python3 -m accelerate.commands.launch"
while IFS=$'\t' read -r name n shape steps skip; do
  if [ "$skip" != - ]; then
    status "$name" "{\"skipped\": \"$skip\"}"; echo "$name: skipped ($skip)" | tee -a "$LOGS/stages.txt"; continue
  fi
  cap=$STAGE_LIMIT; [ "$shape" != 1b ] && cap=$BIG_LIMIT
  left=$(( TOTAL - ($(date +%s) - START) - 15 ))        # keep 15 s for the report
  limit=$(( left < cap ? left : cap ))
  if [ "$limit" -lt 30 ]; then
    status "$name" "{\"skipped\": \"$left s left of the call's $TOTAL s\"}"
    echo "$name: skipped, $left s left" | tee -a "$LOGS/stages.txt"; continue
  fi
  # every GPU's memory in use, twice a second, while the stage runs
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$WORK/runs/$name.gpumem" 2>/dev/null &
  smi=$!
  t0=$(date +%s)
  # shellcheck disable=SC2046  # launch_args and stage_overrides are word lists
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout -k 10 "$limit" $LAUNCH $(launch_args "$n" "$shape") \
    -m dirtune.cli train "$WORK/run.yaml" $(stage_overrides "$name" "$shape" "$steps") > "$LOGS/$name.log" 2>&1
  rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  took=$(( $(date +%s) - t0 ))
  status "$name" "{\"exit\": $rc, \"seconds\": $took, \"limit\": $limit}"
  echo "$name: exit $rc after $took s (limit $limit s)" | tee -a "$LOGS/stages.txt"
  [ "$rc" != 0 ] && tail -n 30 "$LOGS/$name.log"
  cp "$WORK/runs/$name/summary.json" "$LOGS/$name.summary.json" 2>/dev/null
  cp "$WORK/runs/$name.gpumem" "$LOGS/" 2>/dev/null
  rm -rf "$WORK/runs/$name"/checkpoint-* "$WORK/runs/$name/final"   # gigabytes nobody reads
done < <(python3 "$HERE/scaling_plan.py" "${plan_args[@]}" --tsv)

python3 "$HERE/scaling.py" report "$WORK" "$OUT" > "$LOGS/report.log" 2>&1 || { echo "report failed:"; cat "$LOGS/report.log"; }
cat "$OUT/scaling.md" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
ls -la "$OUT"
