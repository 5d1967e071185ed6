"""One axolotl training run with the dirtune plugin, for tests/integration/test_integrations_axolotl.py.

Run as `python _axolotl_run.py CONFIG.yml OUT.json` (its own process: axolotl patches transformers
as it loads a model). After training, on one batch in training mode, it compares the loss the
axolotl trainer computes with the model's own loss plus λ·R, R computed here from the LoRA
factors (1 − cos per row, float64), and writes what the test asserts on to OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_row_penalty(model) -> float:
    terms = []
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJ and hasattr(m, "base_layer"):
            w0 = m.base_layer.weight.double()
            w = w0 + sum(m.scaling[a] * (m.lora_B[a].weight.double() @ m.lora_A[a].weight.double())
                         for a in m.active_adapters)
            terms.append((1 - F.cosine_similarity(w, w0, dim=1)).mean())
    return float(torch.stack(terms).mean())


def main(config: str, out: str) -> None:
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train

    cfg = load_cfg(config)
    model, _, trainer = train(cfg=cfg, dataset_meta=load_datasets(cfg=cfg, cli_args=TrainerCliArgs()))
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)   # accelerate's wrapper

    model = trainer.model
    model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        total = float(trainer.compute_loss(model, dict(batch)))
        task = float(model(**batch).loss)
        pen = cfg.dirtune["direction_weight"] * lora_row_penalty(model)
    result = {
        "trainer": [c.__name__ for c in type(trainer).__mro__[:3]],
        "optimizer": type(opt).__name__,
        "groups": [{k: g[k] for k in ("name", "anchor", "weight_decay", "lr")} for g in opt.param_groups],
        "logs": [r for r in trainer.state.log_history if "loss" in r],
        "total": total, "task": task, "penalty": pen,
        "lora_B_abs": float(sum(p.abs().sum() for n, p in model.named_parameters() if "lora_B" in n)),
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":   # axolotl's dataset workers may re-import this module (spawn)
    main(sys.argv[1], sys.argv[2])
