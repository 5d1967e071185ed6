"""What dirtune knows of the LLaMA layout by name, torch-free (the config imports it)."""

from __future__ import annotations

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear projections of a decoder layer: the default LoRA targets and penalty targets."""
