#!/usr/bin/env bash
# On the H200 (device tool), from the repo root, with .gpu carried (wheels + data):
#   bash bench/gpu/pretrain_source.sh STEPS
# Pretrains the 22.9M-parameter Debian-prose source model with `dirtune train`, then writes it in
# bf16 as <16 MiB shards to $OUT/source (the device returns at most 64 MiB per call) and keeps a
# copy in .gpu/models/source-debian-23m for a following call on the same warm machine.
set -uo pipefail
STEPS=${1:-3000}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p .gpu/tok && cp .gpu/data/tokenizer.model .gpu/tok/
python3 -m dirtune.cli train configs/source-debian-23m.yaml \
  data.train_file=.gpu/data/source_train.jsonl.xz data.valid_file=.gpu/data/source_valid.jsonl.xz \
  model.tokenizer=.gpu/tok train.max_steps=$STEPS train.output_dir=.gpu/runs/source-debian-23m \
  train.progress=false train.log_every=50 --overwrite 2>&1 | tee $OUT/pretrain.log
python3 - <<'PY'
import json, os, shutil, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from dirtune.models.loading import load_tokenizer
run = Path(".gpu/runs/source-debian-23m")
summary = json.loads((run / "summary.json").read_text())
model = AutoModelForCausalLM.from_pretrained(summary["best_checkpoint"], dtype=torch.bfloat16)
tok = load_tokenizer(".gpu/tok")
dst = Path(".gpu/models/source-debian-23m")
model.save_pretrained(dst)
tok.save_pretrained(dst)
print(json.dumps(summary, indent=1))
PY
# The device returns at most 8 files of 16 MiB: one tar of the run's records, the model split in 15 MB parts.
tar -C .gpu/runs/source-debian-23m -czf $OUT/pretrain_run.tgz summary.json metrics.jsonl config.yaml manifest.json loss.png
tar -C .gpu/models -cf - source-debian-23m | split -b 15000000 - $OUT/source.tar.part-
ls -la $OUT
