"""Rows of every split of every pair of a bench file, as its runs will see them, and the epochs
its budget makes (tokenisation only, no model):

    python bench/gpu/data_sizes.py bench/gpu/smollm2-lora.yaml [TOKENIZER_DIR]

TOKENIZER_DIR defaults to the model.path of the bench's first run.
"""

from __future__ import annotations

import sys

from transformers import AutoTokenizer

from dirtune.bench.config import load_bench_config, run_config
from dirtune.data import build_datasets


def main(argv: list[str]) -> int:
    bench = load_bench_config(argv[0])
    for pair in bench.pairs:
        cfg = run_config(bench, pair, bench.methods[0], bench.lrs[0], 0, "/tmp/x", "cpu")
        tok = AutoTokenizer.from_pretrained(argv[1] if len(argv) > 1 else cfg.model.path)
        data = build_datasets(cfg.data, tok)
        steps = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum
        splits = ", ".join(f"{k} {v['rows']} ({v['truncated']} cut)" for k, v in data.stats["splits"].items())
        print(f"{pair.name}: max_length {cfg.data.max_length}, {steps / len(data.train):.2f} epochs in "
              f"{cfg.train.max_steps} steps of {cfg.train.batch_size}; rows: {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
