#!/usr/bin/env bash
# On a GPU machine (device tool), from the repo root, with .gpu2 carried (wheels, models, data):
#   bash bench/gpu/run_benches.sh SECONDS CHAIN ...       CHAIN = NAME[+NAME...][:GPU]
# Each chain runs its benches (bench/gpu/NAME.yaml) one after the other on its GPU; chains run at
# the same time. Everything stops SECONDS after the start (a stopped bench resumes next time:
# finished runs are kept). Benches named in SEED (space-separated) start from their runs committed
# under bench/results/*-NAME/runs when the machine has none (a bench cut short in an earlier
# session, with the same bench file and source models).
# Everything but checkpoints and weights comes back as $OUT/NAME.tgz, with $OUT/NAME.log.
set -uo pipefail
LIMIT=$1; shift
DEADLINE=$((SECONDS + LIMIT))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu2/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
# The carry holds at most 64 MiB with the checkout: big files travel as X.packed.xz, unpacked here to X.
python3 -c '
import lzma, pathlib
for packed in pathlib.Path(".gpu2").rglob("*.packed.xz"):
    target = packed.with_name(packed.name[: -len(".packed.xz")])
    if not target.exists():
        target.write_bytes(lzma.decompress(packed.read_bytes()))
' || exit 1

seed_from_results() {  # NAME: copy committed finished runs in, unless the machine has runs already
  local committed
  committed=$(ls -d bench/results/*-"$1"/runs 2>/dev/null | tail -n 1)
  if [ -n "$committed" ] && [ ! -d "runs/bench/$1/runs" ]; then
    mkdir -p "runs/bench/$1" && cp -r "$committed" "runs/bench/$1/" && echo "$1: seeded from $committed"
  fi
}

run_chain() {  # NAMES GPU
  local name
  for name in ${1//+/ }; do
    local left=$((DEADLINE - SECONDS))
    [ "$left" -le 10 ] && { echo "$name: no time left" >> "$OUT/$name.log"; continue; }
    timeout "$left" python3 -m dirtune.cli bench "bench/gpu/$name.yaml" "devices=[cuda:$2]" \
      ${JOBS:+jobs=$JOBS} >> "$OUT/$name.log" 2>&1
  done
}

names=()
for spec in "$@"; do
  chain=${spec%%:*}; gpu=${spec#*:}; [ "$gpu" = "$spec" ] && gpu=0
  for name in ${chain//+/ }; do
    names+=("$name")
    [[ " ${SEED:-} " == *" $name "* ]] && seed_from_results "$name"
  done
  run_chain "$chain" "$gpu" &
done
wait
for name in "${names[@]}"; do
  [ -d "runs/bench/$name" ] && tar -C runs/bench -czf "$OUT/$name.tgz" --exclude='checkpoint-*' \
    --exclude='final' --exclude='*.safetensors' --exclude='*.pt' --exclude='tb' "$name"
done
tail -n 3 "$OUT"/*.log; ls -la "$OUT"
