#!/usr/bin/env bash
# The first hour of a new user, as commands and their real output: writes docs/first-hour.md.
#   bash docs/first-hour.sh > docs/first-hour.md        (needs `dirtune` on the PATH, or DIRTUNE=...)
# It makes a tiny random LLaMA and the demo's synthetic data in a temporary folder; every
# command runs on the CPU in seconds. Times are what `time` printed on the machine it ran on.
set -uo pipefail
DIRTUNE=${DIRTUNE:-dirtune}
PY=${PY:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

show() {  # print a command and its output (stdout and stderr; a progress bar as it ended)
    echo '```'
    echo "\$ $*"
    eval "$@" 2>&1 | sed 's/.*\r//'
    echo '```'
    echo
}

$PY - <<'EOF' >/dev/null 2>&1
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from dirtune.data.synthetic import char_tokenizer, write_demo_data
tok = char_tokenizer()
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained("tiny")
tok.save_pretrained("tiny")
write_demo_data("data", seed=0, n_people=12, n_source_train=40, n_source_valid=8)
# the same task with a user's own field names, as JSON Lines and as parquet
import json, pyarrow as pa, pyarrow.parquet as pq
rows = [json.loads(l) for l in open("data/task_train.jsonl")]
mine = [{"question": r["instruction"], "context": r["input"], "reply": r["output"]} for r in rows]
open("mine.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in mine[:60]))
pq.write_table(pa.Table.from_pylist(mine[60:]), "mine.parquet")
EOF
cat > run.yaml <<'EOF'
model: {path: tiny}
finetune: {type: lora, lora_r: 4}
data: {train_file: data/task_train.jsonl, max_length: 96, max_eval_samples: 16}
train: {output_dir: runs/first, max_steps: 6, eval_every: 3, batch_size: 4, device: cpu, report_to: [none]}
EOF

cat <<EOF
# The first hour, as a new user meets it

Made by \`bash docs/first-hour.sh > docs/first-hour.md\` (commit $(git -C "$OLDPWD" rev-parse --short HEAD 2>/dev/null || echo unknown),
$(nproc) CPU cores, load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)). A tiny random LLaMA
(\`tiny/\`) and the demo's synthetic data (\`data/\`) stand in for a real model and task. Times are
\`time\`'s, on that machine as it was then (other work was running on it when this copy was made).

## Help and startup: no torch until a command needs it

EOF
show "time $DIRTUNE --help"
show "$DIRTUNE merge --help"
show "time $DIRTUNE train missing.yaml"
show "$DIRTUNE train data"
show "echo '{}' > empty.yaml; $DIRTUNE train empty.yaml"
show "time $DIRTUNE train run.yaml train.max_step=5"
show "$DIRTUNE train run.yaml data.train_file=data"
show "$DIRTUNE train run.yaml data.train_file=[data/task_train.jsonl,data/nothing.jsonl]"
show "$PY -c \"import sys; from dirtune.cli import main; main(['train', 'missing.yaml']); print('torch imported:', 'torch' in sys.modules)\""

cat <<'EOF'
## Training: one progress bar, no library warnings; resuming says from where

EOF
show "$DIRTUNE train run.yaml"
show "$DIRTUNE train run.yaml train.max_steps=9 --resume"

cat <<'EOF'
## Data: several files, mixing weights, parquet, your own field names

`mine.jsonl` (60 records) and `mine.parquet` (the other records) name their fields `question`,
`context`, `reply`; `data.columns` maps ours to theirs, and `data.train_weights` draws 3/4 of the
training records from the first file (repeated) and 1/4 from the second (subsampled).

EOF
show "head -c 200 mine.jsonl"
show "$DIRTUNE train run.yaml 'data.train_file=[mine.jsonl,mine.parquet]' 'data.train_weights=[3,1]' 'data.columns={instruction: question, input: context, output: reply}' train.output_dir=runs/mix train.max_steps=3 train.progress=false"
show "$DIRTUNE train run.yaml data.train_file=mine.jsonl train.output_dir=runs/x"
show "$DIRTUNE train run.yaml data.train_file=mine.jsonl 'data.columns={instruction: question, outptu: reply}'"
show "$DIRTUNE train run.yaml 'data.train_file=[mine.jsonl,mine.parquet]' 'data.train_weights=[3]'"

cat <<'EOF'
## Eval and merge: quiet, and merge never clobbers

EOF
show "$DIRTUNE eval runs/first data/task_valid.jsonl"
show "$DIRTUNE eval runs/first/final data/task_valid.jsonl --max-length 96"
show "mkdir merged && echo mine > merged/notes.txt; $DIRTUNE merge runs/first/final merged"
show "$DIRTUNE merge tiny merged2"
show "$DIRTUNE merge runs/first/final merged --overwrite && ls merged"
