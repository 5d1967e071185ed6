"""The method as an axolotl plugin (axolotl ≥ 0.21, which needs Python ≥ 3.12).

    plugins:
      - dirtune.integrations.axolotl.DirtunePlugin
    dirtune:                  # the options of dirtune.integrations.attach
      penalty: coupled
      direction_weight: 100

axolotl builds its trainer (a transformers Trainer subclass) and then calls every plugin's
`post_trainer_create(cfg, trainer)`: that is where `attach` puts BalancedAdamW and the coupled
penalty on it. (axolotl 0.21 declares a `create_optimizer` plugin hook but never calls it.)
`weight_decay`, `learning_rate` and the schedule come from axolotl's own keys, as for any
Trainer; axolotl's `optimizer:` key is ignored while dirtune builds the optimizer.
"""

from __future__ import annotations

from typing import Any, Optional

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field

from dirtune.integrations.hf import attach


class DirtuneArgs(BaseModel):
    """The `dirtune:` key of an axolotl config (merged into axolotl's schema)."""

    dirtune: Optional[dict[str, Any]] = Field(
        default=None, description="options of dirtune.integrations.attach: penalty, direction_weight, "
                                  "anchor, balance, schedule, optimizer (balanced_adamw | adamw | null), …")


class DirtunePlugin(BasePlugin):
    def get_input_args(self) -> str:
        return "dirtune.integrations.axolotl.DirtuneArgs"

    def post_trainer_create(self, cfg, trainer) -> None:
        options = dict(cfg.get("dirtune") or {})
        if options:
            trainer.dirtune_penalty = attach(trainer, **options)
