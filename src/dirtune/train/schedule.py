"""Schedules of the method's strengths over training (method.md §4: "strong early, released
later, or the reverse"): `method.schedule` scales λ_dir (coupled penalty and decoupled turn) and,
with BalancedAdamW, the anchored decay λ, by a factor of the optimizer step:

    constant   f = 1
    decay      f = 1 − t/T     full strength at the first step, released linearly toward 0
    warmup     f = t/T         nothing at the first step, full strength at the end

t = optimizer steps already taken, T = the run's total steps. The factor depends on the step alone,
so a resumed run continues the same schedule. The learning rate's own schedule is separate.
"""

from __future__ import annotations

from transformers import TrainerCallback

SCHEDULES = ("constant", "decay", "warmup")


def strength_factor(kind: str, step: int, total: int) -> float:
    """The factor of the strengths for the update after `step` steps of `total`."""
    if kind not in SCHEDULES:
        raise ValueError(f"method.schedule: {kind!r} is not valid; expected one of {', '.join(SCHEDULES)}")
    if kind == "constant" or total <= 0:
        return 1.0
    x = min(max(step / total, 0.0), 1.0)
    return 1.0 - x if kind == "decay" else x


class StrengthSchedule(TrainerCallback):
    """Before every optimizer step, sets the scheduled strengths: `penalty.weight` (the coupled
    penalty's λ_dir) and, in each optimizer group, `direction_weight` and (when `decay` is true,
    i.e. BalancedAdamW's anchored decay) `weight_decay`. The full values are read once, at the
    first step, and kept in the group (`full_direction_weight`, `full_weight_decay`), so a group
    restored from a checkpoint keeps them too. The factor goes to `sink["strength"]` for the log."""

    def __init__(self, kind: str, penalty=None, decay: bool = False, sink: dict | None = None):
        strength_factor(kind, 0, 1)  # check the name now, not at the first step
        self.kind, self.penalty, self.decay, self.sink = kind, penalty, decay, sink
        self.full_penalty = None if penalty is None else float(penalty.weight)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        f = strength_factor(self.kind, state.global_step, state.max_steps)
        if self.penalty is not None:
            self.penalty.weight = self.full_penalty * f
        for group in (optimizer.param_groups if optimizer is not None else []):
            keys = ["direction_weight"] + (["weight_decay"] if self.decay else [])
            for key in keys:
                if key in group:
                    full = group.setdefault(f"full_{key}", group[key])
                    group[key] = full * f
        if self.sink is not None:
            self.sink["strength"] = f
