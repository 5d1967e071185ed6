"""The method inside other people's training scripts: any transformers `Trainer`, TRL's
`SFTTrainer`, or anything else built on `Trainer` (see docs/integrations.md).

    attach(trainer, penalty="coupled", direction_weight=1e3)   # before trainer.train()

`make_optimizer(model, ...)` alone builds the optimizer, for `Trainer(optimizers=(opt, None))`.
Names are imported on first use (PEP 562): `import dirtune.integrations` loads no transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["attach", "make_optimizer", "method_config"]

if TYPE_CHECKING:
    from dirtune.integrations.hf import attach, make_optimizer, method_config


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("dirtune.integrations.hf"), name)
    raise AttributeError(f"module 'dirtune.integrations' has no attribute {name!r}")
