"""Which path computes the direction penalty: the Triton kernels of `penalty_fused`, or the
plain-torch reference of penalty.py / lora_penalty.py. `penalty_fused` (and Triton) is imported
only when a call may take it, so that the method imports only torch on the CPU.
"""

from __future__ import annotations


def fused_module(tensors: list, fused, fn: str):
    """dirtune.method.penalty_fused when `fused` (None: every tensor on CUDA and Triton imports)
    asks for the Triton path, else None; `fused=True` where Triton cannot run is a ValueError
    naming `fn`."""
    if fused is False or (fused is None and not all(t.device.type == "cuda" for t in tensors)):
        return None
    try:
        from dirtune.method import penalty_fused
    except ImportError:
        penalty_fused = None
    if penalty_fused is None or not penalty_fused.available():
        if fused:
            raise ValueError(f"{fn}: fused=True needs Triton, which cannot be imported here; "
                             "use fused=None or False")
        return None
    return penalty_fused
