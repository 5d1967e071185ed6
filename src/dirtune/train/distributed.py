"""What `run_training` needs to run as several processes (`accelerate launch`, `torchrun`).

Every process trains (FSDP2 or DDP, as accelerate's config or environment says); the main
process alone writes the run folder. These helpers keep that apart from the runner's flow:

    processes(cfg)          (is_main, world_size); starts the process group early under a launcher
    on_main(fn, is_main)    fn() on the main process, its result (or its error) on every process
    any_process(flags)      each flag OR-ed over the processes (decisions all must take alike)
    finish(world)           wait for every process, then close the process group
    Unlogged                MetricsLog's interface, writing nothing (the other processes)
    StepClock               wall time of each optimizer step, for throughput (bench/scaling)
    timing_summary(...)     the summary fields of the above
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch
from transformers import TrainerCallback


def processes(cfg) -> tuple[bool, int]:
    """(is_main, world_size). Under a launcher (WORLD_SIZE > 1) the process group is started
    now, through accelerate as Trainer would start it later, so that the main process can
    check and claim the run folder before any process writes anything."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True, 1
    from accelerate import PartialState

    state = PartialState(cpu=cfg.train.device == "cpu")
    return state.is_main_process, state.num_processes


def on_main(fn: Callable[[], Any], is_main: bool, world: int) -> Any:
    """fn() on the main process; every process returns its result, or raises its exception
    (so that no process is left waiting for a run that stopped)."""
    if world == 1:
        return fn()
    answer: list = [None]
    if is_main:
        try:
            answer = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - handed to every process, then raised
            answer = [("error", e)]
    torch.distributed.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise value
    return value


def any_process(flags: list[bool], device: torch.device | str = "cpu") -> list[bool]:
    """Each flag, true if it is true on any process (one all-reduce; no-op for one process).
    `device` must suit the process group's backend (a CUDA device under NCCL)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def finish(world: int) -> None:
    """The end of a run on several processes: wait for all (the main one writes last), then
    close the process group, which a process must not leave open at exit (its communication
    threads would abort it, and the launcher would report the run as failed)."""
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class Unlogged:
    """MetricsLog's interface for the processes that do not write the run folder."""

    def write(self, record: dict) -> None:
        pass

    def read(self) -> list[dict]:
        return []


class StepClock(TrainerCallback):
    """Wall time of every optimizer step. CUDA is synchronised at each step end, so a step's
    time is its own (costs nothing measurable: the optimizer step ends with host work anyway)."""

    def __init__(self):
        self.times: list[float] = []
        self._last: float | None = None

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def timing_summary(clock: StepClock, world: int) -> dict:
    """world_size, step_times_s (each optimizer step; the first ones include warm-up) and this
    process's peak GPU memory (GiB, None without CUDA)."""
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"world_size": world, "step_times_s": [round(t, 6) for t in clock.times],
            "peak_gpu_memory_gib": peak}
