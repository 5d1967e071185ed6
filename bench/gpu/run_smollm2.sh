#!/usr/bin/env bash
# The SmolLM2-135M-Instruct benches on one H200 (device tool), from the repo root, with the parts
# of .gpu3/ made here by bench/gpu/prepare_smollm2_carry.sh (bench/gpu/README.md lists the calls):
#
#   bash bench/gpu/run_smollm2.sh stash
#       keep the model part(s) this call carries in /tmp/smollm2 (the machine keeps /tmp while warm)
#   bash bench/gpu/run_smollm2.sh run SECONDS [LORA_JOBS FULL_JOBS]
#       stash, then once: join the parts, check the sha256, convert to a fp32 checkpoint
#       (dirtune convert gguf); then both benches at once on cuda:0 until SECONDS after the start.
#       Call it again to continue: finished runs are kept, cut ones start again.
#   bash bench/gpu/run_smollm2.sh check SECONDS JOBS [BENCH KEY=VALUE ...]
#       throughput check: the 42-run bench smollm2-check.yaml with JOBS concurrent runs, from
#       scratch, for at most SECONDS; prints runs/min (e.g. `check 300 14`, or `... max_steps=300`)
#
# Everything but weights and checkpoints comes back in $OUT: NAME.tgz (the bench folder), NAME.log,
# gpu.csv (utilisation and memory every 5 s), throughput.txt.
set -uo pipefail
MODE=${1:?usage: run_smollm2.sh stash | run SECONDS [LORA_JOBS FULL_JOBS] | check SECONDS JOBS}
shift
START=$SECONDS
STASH=/tmp/smollm2
MODEL=$STASH/SmolLM2-135M-Instruct
OUT=${OUT:-/tmp/smollm2-out}
mkdir -p "$STASH/parts" "$OUT"

stash() {
  local part
  for part in .gpu3/model/smollm2.gguf.xz.[0-9]* .gpu3/model/MANIFEST; do
    [ -f "$part" ] && cp -f "$part" "$STASH/parts/"
  done
  echo "stash: $(ls "$STASH/parts" 2>/dev/null | tr '\n' ' ')"
}

setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu3/whl/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  # the bench's workers share 16 cores: one thread each (its own default would be 16 // jobs)
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
}

model() {  # join, check, convert once; link it where the bench files look (.gpu3/models/)
  if [ ! -f "$MODEL/config.json" ]; then
    local manifest=$STASH/parts/MANIFEST name size sha
    [ -f "$manifest" ] || { echo "model: no MANIFEST stashed (carry .gpu3/model/MANIFEST)"; return 1; }
    while read -r name size; do
      [ "$name" = gguf_sha256 ] && continue
      [ "$(stat -c %s "$STASH/parts/$name" 2>/dev/null)" = "$size" ] || {
        echo "model: part $name missing or incomplete; carry it with a 'stash' call first"; return 1; }
    done < "$manifest"
    sha=$(head -n 1 "$manifest" | cut -d ' ' -f 2)
    grep -v gguf_sha256 "$manifest" | cut -d ' ' -f 1 | sed "s|^|$STASH/parts/|" | xargs cat \
      | python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)' \
      > "$STASH/model.gguf" || return 1
    echo "$sha  $STASH/model.gguf" | sha256sum -c - || return 1
    rm -rf "$MODEL.partial"
    python3 -m dirtune.cli convert gguf "$STASH/model.gguf" "$MODEL.partial" --dtype fp32 || return 1
    mv "$MODEL.partial" "$MODEL"
  fi
  mkdir -p .gpu3/models && ln -sfn "$MODEL" .gpu3/models/SmolLM2-135M-Instruct
  echo "model: $(du -sh "$MODEL" | cut -f 1) at $MODEL"
}

sample_gpu() {
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 >> "$OUT/gpu.csv" 2>/dev/null &
  GPU_SAMPLER=$!
}

throughput() {  # runs finished during this call, from their summary.json files
  python3 - "$START_EPOCH" "$@" <<'EOF' | tee -a "$OUT/throughput.txt"
import json, pathlib, statistics, sys, time
since, folders = float(sys.argv[1]), sys.argv[2:]
elapsed = time.time() - since
for folder in folders:
    done = [p for p in pathlib.Path(folder).glob("runs/*/*/*/summary.json") if p.stat().st_mtime >= since]
    total = len(list(pathlib.Path(folder).glob("runs/*/*/*/summary.json")))
    walls = [json.loads(p.read_text())["wall_time_s"] for p in done]
    steps = [t for p in done for t in json.loads(p.read_text()).get("step_times_s", [])[5:]]
    peaks = [json.loads(p.read_text()).get("peak_gpu_memory_gib") or 0 for p in done]
    print(f"{folder}: {len(done)} runs in {elapsed:.0f} s = {60 * len(done) / elapsed:.1f} runs/min "
          f"({total} finished in all); run wall median {statistics.median(walls) if walls else 0:.1f} s, "
          f"step median {1e3 * statistics.median(steps) if steps else 0:.0f} ms, peak GPU memory max {max(peaks, default=0):.1f} GiB")
EOF
}

pack() {
  local name
  for name in "$@"; do
    [ -d "runs/bench/$name" ] && tar -C runs/bench -czf "$OUT/$name.tgz" --exclude='checkpoint-*' \
      --exclude='final' --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude='tb' "$name"
  done
  df -h . /tmp | tail -n +2
  ls -la "$OUT"
}

children() {  # PID: its child processes, from /proc (the image may have no pkill)
  local status
  for status in /proc/[0-9]*/status; do
    awk -v p="$1" '$1 == "PPid:" && $2 == p {found = 1} END {exit !found}' "$status" 2>/dev/null \
      && basename "$(dirname "$status")"
  done
}

stop() {  # PID: the bench process and its workers, at once (a run cut short starts again next call)
  kill -STOP "$1" 2>/dev/null                       # first, so that it cannot start new workers
  kill -KILL $(children "$1") 2>/dev/null           # its pool workers (timeout alone leaves them)
  kill -KILL "$1" 2>/dev/null
}

bench() {  # NAME JOBS SECONDS [KEY=VALUE ...]: one bench, stopped at the deadline
  local name=$1 jobs=$2 left=$3 pid watcher rc
  shift 3
  python3 -m dirtune.cli bench "bench/gpu/$name.yaml" "jobs=$jobs" "$@" >> "$OUT/$name.log" 2>&1 &
  pid=$!
  ( sleep "$left"; echo "$name: deadline, stopping" >> "$OUT/$name.log"; stop "$pid" ) &
  watcher=$!
  wait "$pid"; rc=$?
  kill $(children "$watcher") "$watcher" 2>/dev/null
  echo "$name: exit $rc after $((SECONDS - START)) s" | tee -a "$OUT/$name.log"
}

START_EPOCH=$(date +%s)
case "$MODE" in
  stash)
    stash ;;
  run)
    LIMIT=${1:?run SECONDS}; LORA_JOBS=${2:-9}; FULL_JOBS=${3:-6}   # LoRA runs need ~1.6x the GPU time
    stash && setup && model || exit 1
    sample_gpu
    left=$((LIMIT - (SECONDS - START) - 30))   # 30 s to pack what came out
    bench smollm2-lora "$LORA_JOBS" "$left" & lora=$!
    bench smollm2-full "$FULL_JOBS" "$left" & full=$!
    wait "$lora" "$full"
    kill "$GPU_SAMPLER" 2>/dev/null
    throughput runs/bench/smollm2-lora runs/bench/smollm2-full
    pack smollm2-lora smollm2-full ;;
  check)
    LIMIT=${1:?check SECONDS JOBS}; JOBS=${2:?check SECONDS JOBS}; shift 2
    stash && setup && model || exit 1
    rm -rf runs/bench/smollm2-check
    sample_gpu
    bench smollm2-check "$JOBS" "$((LIMIT - (SECONDS - START) - 20))" "$@"
    kill "$GPU_SAMPLER" 2>/dev/null
    throughput runs/bench/smollm2-check
    pack smollm2-check ;;
  *)
    echo "unknown mode $MODE; use stash, run or check"; exit 2 ;;
esac
