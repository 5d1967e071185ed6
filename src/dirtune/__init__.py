"""dirtune: fine-tuning that keeps the direction of the pretrained weights.

The public API is these four names. They are imported on first use (PEP 562) so that
`import dirtune` stays cheap for the CLI and for tools that need only one of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["BalancedAdamW", "DirectionPenalty", "direction_penalty", "lora_direction_penalty"]
__version__ = "0.1.0"

_HOME = {
    "BalancedAdamW": "dirtune.method.balanced_adamw",
    "direction_penalty": "dirtune.method.penalty",
    "lora_direction_penalty": "dirtune.method.penalty",
    "DirectionPenalty": "dirtune.models.direction",
}

if TYPE_CHECKING:
    from dirtune.method.balanced_adamw import BalancedAdamW
    from dirtune.method.penalty import direction_penalty, lora_direction_penalty
    from dirtune.models.direction import DirectionPenalty


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'dirtune' has no attribute {name!r}")
