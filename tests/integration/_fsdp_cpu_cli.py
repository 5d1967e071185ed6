"""`python -m dirtune.cli ...` with accelerate's FSDP path taken on CPU processes (tests only).

accelerate enables FSDP for accelerators only; on CPU processes (gloo) it falls back to DDP.
torch's fully_shard itself runs on CPU, so this entry point turns the CPU multi-process state
into accelerate's FSDP state (the plugin read from the FSDP_* environment, as `accelerate
launch --config_file configs/accelerate/fsdp2-2gpu.yaml` sets it) and then runs the CLI:
Trainer then prepares the model with fully_shard and swaps the optimizer's parameters, exactly
the path a GPU run takes. Run it under torchrun with train.device=cpu.
"""

from __future__ import annotations

import os
import sys

import accelerate.state as state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
        if getattr(self, "fsdp_plugin", None) is None:
            self.fsdp_plugin = FullyShardedDataParallelPlugin()


state.AcceleratorState.__init__ = _fsdp_on_cpu

from dirtune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
