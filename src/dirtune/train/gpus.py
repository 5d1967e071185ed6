"""Which GPUs a process sees, decided before CUDA starts (torch-free: the bench's workers call
it before they import torch)."""

from __future__ import annotations

import os


def narrow_visible_gpus(index: int) -> None:
    """Make GPU `index` of those this process may see (CUDA_VISIBLE_DEVICES, else all) the only
    one it sees, as "cuda"; CUDA reads the variable once, at its start."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
