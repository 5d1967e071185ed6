"""How the demo's two learning rates were chosen: each method fine-tuned at every rate of a grid
from the demo's own source model, one seed; the rate with the lowest best validation loss wins.

    dirtune demo --out OUT                        # data, source model (and the two demo runs)
    python docs/demo/lr_grid.py OUT > docs/demo/lr_grid.txt

It reuses OUT/data and OUT/source (so the source model is the demo's) and writes OUT/grid/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dirtune.demo import FULL, METHODS, _train, task_overrides
from dirtune.train.config import load_config

GRID = (3e-4, 1e-3, 3e-3, 1e-2)


def main(out: Path) -> None:
    files = {name: out / "data" / f"{name}.{'txt' if name.startswith('source') else 'jsonl'}"
             for name in ("source_train", "source_valid", "task_train", "task_valid", "task_test")}
    source = json.loads((out / "source" / "summary.json").read_text())["best_checkpoint"]
    rows = []
    for key, spec in METHODS.items():
        base = [o for o in spec["overrides"] if not o.startswith("optimizer.lr=")]
        for lr in GRID:
            run = out / "grid" / f"{key}-lr{lr:g}"
            cfg = load_config(None, task_overrides(run, files, source, FULL, 0) + base + [f"optimizer.lr={lr}"])
            s = _train(cfg)
            rows.append((spec["label"], lr, s["best_eval_loss"], s["best_step"], s["final_eval_loss"],
                         s["forget_loss_end"] - s["forget_loss_start"]))
            print(f"# done: {spec['label']} lr {lr:g}", file=sys.stderr, flush=True)
    print(f"source model: {source}; fine-tuning {FULL.task_steps} steps, evaluation every {FULL.task_eval_every}")
    print(f"{'method':34} {'lr':>7} {'best val loss':>13} {'at step':>7} {'final val loss':>14} {'forgetting':>10}")
    for label, lr, best, step, final, forget in rows:
        print(f"{label:34} {lr:7g} {best:13.4f} {step:7d} {final:14.4f} {forget:+10.4f}")
    for label in dict.fromkeys(r[0] for r in rows):
        best = min((r for r in rows if r[0] == label), key=lambda r: r[2])
        print(f"chosen for {label}: lr {best[1]:g} (best validation loss {best[2]:.4f})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
