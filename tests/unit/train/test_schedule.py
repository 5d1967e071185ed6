"""schedule.py: the strength factor, and the callback that applies it to the coupled penalty's
weight and to the optimizer groups (full values kept in the groups, so a resumed run continues)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dirtune.train.schedule import StrengthSchedule, strength_factor


@pytest.mark.parametrize("kind, expected", [("constant", [1, 1, 1, 1]), ("decay", [1, 0.75, 0.5, 0]),
                                            ("warmup", [0, 0.25, 0.5, 1])])
def test_factor_over_a_run(kind, expected):
    assert [strength_factor(kind, t, 8) for t in (0, 2, 4, 8)] == pytest.approx(expected)
    assert strength_factor(kind, 12, 8) == expected[-1]  # past the end: held at the final value


def test_unknown_schedule_is_refused_when_built():
    with pytest.raises(ValueError, match="method.schedule: 'cosine' is not valid; expected one of constant, decay, warmup"):
        StrengthSchedule("cosine")


def _optimizer():
    p, q = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p], "weight_decay": 2.0, "direction_weight": 10.0},
                           {"params": [q], "weight_decay": 0.0, "direction_weight": 0.0}], lr=0.1)
    return opt


def test_callback_scales_penalty_and_groups_from_their_full_values():
    opt, penalty, sink = _optimizer(), SimpleNamespace(weight=100.0), {}
    cb = StrengthSchedule("decay", penalty, decay=True, sink=sink)
    for step, f in ((0, 1.0), (5, 0.5), (10, 0.0), (4, 0.6)):  # any order: always from the full values
        cb.on_step_begin(None, SimpleNamespace(global_step=step, max_steps=10), None, optimizer=opt)
        g = opt.param_groups[0]
        assert (penalty.weight, g["direction_weight"], g["weight_decay"], sink["strength"]) == \
            pytest.approx((100 * f, 10 * f, 2 * f, f))
        assert opt.param_groups[1]["direction_weight"] == 0.0
    # a restored optimizer carries its full values: a new callback (a resumed run) uses them
    state = opt.state_dict()
    again = _optimizer()
    again.load_state_dict(state)
    StrengthSchedule("decay", decay=True).on_step_begin(
        None, SimpleNamespace(global_step=2, max_steps=10), None, optimizer=again)
    assert again.param_groups[0]["direction_weight"] == pytest.approx(8.0)


def test_plain_adamw_decay_is_left_alone():
    opt = _optimizer()
    StrengthSchedule("warmup", decay=False).on_step_begin(
        None, SimpleNamespace(global_step=0, max_steps=10), None, optimizer=opt)
    assert opt.param_groups[0]["weight_decay"] == 2.0 and opt.param_groups[0]["direction_weight"] == 0.0
