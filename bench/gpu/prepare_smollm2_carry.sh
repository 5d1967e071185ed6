#!/usr/bin/env bash
# Run here (not on the GPU), from the repo root, once per checkout:
#     bash bench/gpu/prepare_smollm2_carry.sh [PART_MIB]
# Fills the ignored folder .gpu3/ with what the SmolLM2 benches need on the GPU machine, in
# pieces that each fit one device call beside the checkout (64 MiB per call in all):
#     .gpu3/whl/                       datasets + gguf wheels (the GPU image lacks them)
#     .gpu3/data/                      the task subsets the bench files name (~2 MB)
#     .gpu3/model/smollm2.gguf.xz.NN   the GGUF, xz-compressed, split into PART_MIB-MiB parts (default 30)
# `.gpu3/` must be ignored by git (add the line `/.gpu3/` to .git/info/exclude), or every
# call would carry all of it. bench/gpu/run_smollm2.sh says which part goes with which call.
set -euo pipefail
PART_MIB=${1:-30}
SHARED=${SHARED:-../shared}
GGUF=$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
[ -f "$GGUF" ] || { echo "prepare: $GGUF not found (set SHARED=path/to/shared)" >&2; exit 1; }
git check-ignore -q .gpu3/x || echo "prepare: warning: .gpu3/ is not ignored by git; add '/.gpu3/' to .git/info/exclude" >&2

mkdir -p .gpu3/whl .gpu3/data .gpu3/model
install -m 644 "$SHARED"/device-wheels/*.whl .gpu3/whl/

# Task subsets (bench/gpu/smollm2-*.yaml): each names what it reads from here.
B=$SHARED/bench
head -n 480 "$B/gsm8k_train.jsonl" > .gpu3/data/gsm8k_train.jsonl      # 408 train + 72 valid
head -n 200 "$B/gsm8k_test.jsonl" > .gpu3/data/gsm8k_test.jsonl        # test loss; metric on the first 100
install -m 644 "$B/alpaca_en_demo.json" "$B/identity.json" .gpu3/data/
xz -6 -c "$B/c4_demo.jsonl" > .gpu3/data/c4_demo.jsonl.xz             # forget set "web" (first 64 blocks used)
python3 - "$B/tinyshakespeare_input.txt" .gpu3/data/tinyshakespeare_370k.txt <<'EOF'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
cut = text.index("\n", 370_000) + 1          # the first 370k characters, to the end of a line
open(sys.argv[2], "w", encoding="utf-8").write(text[:cut])
EOF

# The model: sha256-checked, xz-compressed once, split into parts (each part rides one call).
# MANIFEST: the GGUF's sha256, the part size, then one line per part (name, bytes); it rides with
# every call, so the GPU side knows when it holds all parts.
if ! grep -qx "gguf_sha256 $SHA part_mib $PART_MIB" .gpu3/model/MANIFEST 2>/dev/null; then
  echo "$SHA  $GGUF" | sha256sum -c --quiet
  rm -f .gpu3/model/smollm2.gguf.xz.* .gpu3/model/MANIFEST
  xz -6 -T0 -c "$GGUF" | split -b "${PART_MIB}m" -d -a 2 - .gpu3/model/smollm2.gguf.xz.
  { echo "gguf_sha256 $SHA part_mib $PART_MIB"
    for part in .gpu3/model/smollm2.gguf.xz.*; do echo "$(basename "$part") $(stat -c %s "$part")"; done
  } > .gpu3/model/MANIFEST
fi

checkout=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {printf "%.1f", s / 1048576}')
small=$(du -sbc .gpu3/whl .gpu3/data | tail -n 1 | awk '{printf "%.1f", $1 / 1048576}')
echo "checkout (tracked files) $checkout MiB; .gpu3/whl + .gpu3/data $small MiB"
for part in .gpu3/model/smollm2.gguf.xz.*; do
  size=$(stat -c %s "$part" | awk '{printf "%.1f", $1 / 1048576}')
  total=$(awk -v a="$checkout" -v b="$small" -v c="$size" 'BEGIN {printf "%.1f", a + b + c}')
  echo "$part: $size MiB -> a call carrying it (with whl + data) holds about $total MiB of 64"
done
