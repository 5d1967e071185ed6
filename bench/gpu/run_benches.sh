#!/usr/bin/env bash
# On a GPU machine (device tool), from the repo root, with .gpu2 carried (wheels, models, data):
#   bash bench/gpu/run_benches.sh SECONDS NAME[:GPU] ...
# Runs each named bench (bench/gpu/NAME.yaml) on its GPU, all at once, each stopped after SECONDS
# (a stopped bench resumes next time: finished runs are kept). Everything but checkpoints comes
# back as $OUT/NAME.tgz.
set -uo pipefail
LIMIT=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu2/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
for spec in "$@"; do
  name=${spec%%:*}; gpu=${spec#*:}; [ "$gpu" = "$spec" ] && gpu=0
  timeout "$LIMIT" python3 -m dirtune.cli bench bench/gpu/$name.yaml "devices=[cuda:$gpu]" ${JOBS:+jobs=$JOBS} > $OUT/$name.log 2>&1 &
done
wait
for spec in "$@"; do
  name=${spec%%:*}
  tar -C runs/bench -czf $OUT/$name.tgz --exclude='checkpoint-*' $name
done
tail -n 3 $OUT/*.log; ls -la $OUT
