"""How many aten operations one optimizer step dispatches, by kind of run (about one GPU kernel
launch per non-view operation; views only cost host time).

    python bench/gpu/op_census.py MODEL [lora|full] [train key=value ...]

One forward + backward + gradient clipping + optimizer step (and one drift/angle measurement)
on 8 alpaca examples, counted with a TorchDispatchMode after a first, uncounted step. Run it on
the CPU with optimizer.foreach=true: a GPU run takes the foreach path by default, a CPU run the
per-tensor loop (421 more operations for LoRA). MODEL: any checkpoint; the skeleton of
profile_run.py --skeleton keeps it fast.
"""

from __future__ import annotations

import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dirtune.data.cache import build_datasets_cached
from dirtune.data.tokenize import collate
from dirtune.train import runner
from dirtune.train.config import load_config
from dirtune.train.trainer import build_optimizer


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))


def main(argv: list[str]) -> int:
    model_path, kind, *extra = argv
    cfg = load_config(None, [f"model.path={model_path}", f"finetune.type={kind}", "finetune.lora_dropout=0.0",
                             "data.train_file=../shared/bench/alpaca_en_demo.json", "data.template=llama2",
                             "data.max_length=96", "data.max_samples=16", *extra])
    model, tok = runner.build_model(cfg)
    data = build_datasets_cached(cfg.data, tok)
    batch = collate([data.train[i] for i in range(8)], data.pad_id)
    opt = build_optimizer(model, cfg)
    penalty = runner.build_penalty(model, cfg)

    def step():
        loss = model(**batch).loss
        if cfg.method.penalty == "coupled":
            loss = loss + penalty()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    step()
    with Count() as c:
        step()
    total = sum(c.ops.values())
    line = f"{kind} {' '.join(extra)}: {total} ops per step, {total - c.views} not views"
    if penalty is not None:
        with Count() as d:
            penalty.angles()
        line += f"; drift/angle measurement: {sum(d.ops.values())} ops, {sum(d.ops.values()) - d.views} not views"
    print(line)
    print("  most frequent:", ", ".join(f"{k} {v}" for k, v in c.ops.most_common(8)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
