"""callbacks.py: the eval line with every forget set, and the best weights kept in memory."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from dirtune.train.callbacks import BestInMemory, DriftMeter, EvalRecorder, FaultGuard
from dirtune.train.nonfinite import NonFiniteError


class ListLog:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def read(self):
        return list(self.records)


def _state(step):
    return SimpleNamespace(global_step=step)


def test_one_line_carries_every_forget_set():
    log = ListLog()
    rec = EvalRecorder(log, target_loss=None)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    rec.on_evaluate(None, _state(10), control, metrics={"eval_forget_loss": 3.0, "eval_forget_runtime": 1.0})
    rec.on_evaluate(None, _state(10), control, metrics={"eval_forget_web_loss": 2.5})
    rec.on_evaluate(None, _state(10), control, metrics={"eval_forget_in_struct_loss": 1.5})
    assert log.records == []  # nothing until the validation loss arrives
    rec.on_evaluate(None, _state(10), control, metrics={"eval_valid_loss": 1.0})
    assert log.records == [{"kind": "eval", "step": 10, "eval_loss": 1.0, "forget_loss": 3.0,
                            "forget_web_loss": 2.5, "forget_in_struct_loss": 1.5}]
    rec.on_evaluate(None, _state(20), control, metrics={"eval_valid_loss": 0.9})
    assert log.records[-1] == {"kind": "eval", "step": 20, "eval_loss": 0.9}


@pytest.mark.parametrize("save", [True, False])
def test_target_stop_asks_for_a_checkpoint_only_when_told(save):
    log = ListLog()
    rec = EvalRecorder(log, target_loss=1.0, save_at_target=save)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    rec.on_evaluate(None, _state(30), control, metrics={"eval_valid_loss": 0.99})
    assert rec.target_step == 30 and control.should_training_stop and control.should_save is save


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # frozen: never copied
    return model


def _bump(model, by):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_best_weights_are_the_lowest_loss_ones_and_come_back():
    model = _model()
    frozen = model[0].weight.clone()
    best = BestInMemory()
    for step, loss in [(0, 3.0), (10, 2.0), (20, 2.0), (30, 2.5), (40, float("nan"))]:
        if step:
            _bump(model, 1.0)
        if step == 10:
            at_best = [p.clone() for p in model.parameters()]
        best.on_evaluate(None, _state(step), None, metrics={"eval_valid_loss": loss}, model=model)
    assert (best.best, best.best_step) == (2.0, 10)  # a tie does not replace the earlier best
    assert len(best._copy) == 3  # the trainable tensors only
    assert best.restore(global_step=40)
    for p, q in zip(model.parameters(), at_best):
        if p.requires_grad:
            assert torch.equal(p, q)
    assert torch.allclose(model[0].weight, frozen + 4.0)  # the frozen one was left as it is
    assert best._copy is None and not best.restore(global_step=40)  # freed after use


def test_restore_is_a_no_op_when_the_last_weights_are_the_best():
    model = _model()
    best = BestInMemory()
    best.on_evaluate(None, _state(0), None, metrics={"eval_valid_loss": 3.0}, model=model)
    _bump(model, 1.0)
    best.on_evaluate(None, _state(10), None, metrics={"eval_valid_loss": 1.0}, model=model)
    now = [p.clone() for p in model.parameters()]
    assert not best.restore(global_step=10)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), now))


def test_no_finite_loss_keeps_nothing():
    best = BestInMemory()
    best.on_evaluate(None, _state(0), None, metrics={"eval_valid_loss": math.inf}, model=_model())
    best.on_evaluate(None, _state(0), None, metrics={"eval_forget_loss": 1.0}, model=_model())
    assert best.best is None and not best.restore(global_step=0)


def test_forget_summary_reads_start_end_and_the_best_step():
    from dirtune.train.runner import forget_summary

    records = [{"kind": "eval", "step": 0, "eval_loss": 3.0, "forget_web_loss": 2.0},
               {"kind": "train", "step": 5, "loss": 1.0},
               {"kind": "eval", "step": 10, "eval_loss": 1.0, "forget_web_loss": 2.5, "forget_i_loss": 9.0},
               {"kind": "eval", "step": 20, "eval_loss": 2.0, "forget_web_loss": 3.0, "forget_i_loss": "nan"}]
    out = forget_summary(records, best_step=10, names=["web", "i", "never"])
    assert out["web"] == {"start": 2.0, "end": 3.0, "at_best": 2.5}
    assert out["i"] == {"start": 9.0, "end": 9.0, "at_best": 9.0}  # a NaN (written as text) is no value
    assert out["never"] == {"start": None, "end": None, "at_best": None}


def test_drift_meter_measures_at_start_and_every_k_steps():
    calls, sink = [], {}

    def measure():
        calls.append(1)
        return {"q_proj": {"angle_deg": 1.0, "drift": 0.1}, "v_proj": {"angle_deg": 3.0, "drift": 0.3}}

    meter = DriftMeter(measure, every=5, sink=sink)
    meter.on_train_begin(None, _state(0), None)
    assert sink["angle/mean"] == pytest.approx(2.0) and sink["drift/mean"] == pytest.approx(0.2)
    meter.on_train_begin(None, _state(10), None)      # a resumed run: no measure at its start
    for step in range(1, 11):
        meter.on_step_end(None, _state(step), None)
    assert len(calls) == 3                            # steps 0, 5 and 10


class Model(torch.nn.Module):
    def __init__(self, grad):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.w.grad = grad


def _control():
    return SimpleNamespace(should_save=False, should_training_stop=False)


def test_fault_guard_skips_a_bad_step_and_counts_it():
    log = ListLog()
    guard = FaultGuard("skip", log, lambda: torch.tensor(1.0))
    model = Model(torch.tensor([1.0, float("nan"), 0.0]))
    guard.on_pre_optimizer_step(None, _state(4), _control(), model=model)
    assert model.w.grad is None and guard.skipped == 1
    assert log.records[-1] == {"kind": "event", "step": 5, "event": "non-finite gradient: step skipped"}
    model.w.grad = torch.ones(3)                      # a good step resets the run of skips
    guard.on_pre_optimizer_step(None, _state(5), _control(), model=model)
    assert guard._in_a_row == 0 and model.w.grad is not None


def test_fault_guard_stops_on_a_bad_loss_or_too_many_skips():
    with pytest.raises(NonFiniteError, match="the loss is NaN"):
        FaultGuard("stop", ListLog(), lambda: torch.tensor(float("inf"))).on_pre_optimizer_step(
            None, _state(0), _control(), model=Model(torch.ones(3)))
    guard = FaultGuard("skip", ListLog(), lambda: torch.tensor(float("nan")))
    with pytest.raises(NonFiniteError, match="steps in a row"):
        for step in range(FaultGuard.MAX_SKIPS_IN_A_ROW):
            guard.on_pre_optimizer_step(None, _state(step), _control(), model=Model(torch.ones(3)))
    assert guard.skipped == FaultGuard.MAX_SKIPS_IN_A_ROW - 1


def test_fault_guard_stops_on_a_nan_evaluation_and_resumes_its_skip_count():
    log = ListLog()
    log.write({"kind": "event", "step": 3, "event": "non-finite loss: step skipped"})
    guard = FaultGuard("skip", log, lambda: None)
    assert guard.skipped == 1                         # counted from the log of a resumed run
    guard.on_evaluate(None, _state(8), _control(), metrics={"eval_valid_loss": 1.0})
    with pytest.raises(NonFiniteError, match="forget_loss"):
        guard.on_evaluate(None, _state(9), _control(),
                          metrics={"eval_valid_loss": 1.0, "eval_forget_loss": float("nan")})


def test_fault_guard_saves_and_stops_after_a_signal():
    log = ListLog()
    guard = FaultGuard("stop", log, lambda: None)
    guard.interrupted = "SIGTERM"
    control = _control()
    guard.on_step_end(None, _state(7), control)
    assert control.should_save and control.should_training_stop
    assert log.records[-1]["event"] == "SIGTERM: checkpoint saved, stopping"


def test_a_signal_saves_and_stops_and_a_second_one_stops_at_once(tmp_path, capsys):
    import signal

    from transformers import TrainerControl, TrainerState

    from dirtune.train.callbacks import FaultGuard
    from dirtune.train.run_folder import MetricsLog, read_metrics

    guard = FaultGuard("stop", MetricsLog(tmp_path / "metrics.jsonl"), lambda: None)
    before = signal.getsignal(signal.SIGINT)
    guard.on_train_begin(None, None, None)
    try:
        signal.raise_signal(signal.SIGINT)
        assert guard.interrupted == "SIGINT"
        control = TrainerControl()
        guard.on_step_end(None, TrainerState(global_step=5), control)
        assert control.should_save and control.should_training_stop
        assert read_metrics(tmp_path / "metrics.jsonl") == [
            {"kind": "event", "step": 5, "event": "SIGINT: checkpoint saved, stopping"}]
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C is Python's own again
            signal.raise_signal(signal.SIGINT)
    finally:
        guard.release_signals()
    assert signal.getsignal(signal.SIGINT) is before
    err = capsys.readouterr().err
    assert "SIGINT: saving a checkpoint after this step" in err and "second SIGINT: stopping without saving" in err


def test_a_resumed_run_counts_what_happened_before_its_checkpoint(tmp_path):
    """skipped_steps and target_step came from memory only: a resumed run reported 0 and None."""
    from dirtune.train.callbacks import EvalRecorder, FaultGuard
    from dirtune.train.run_folder import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "event", "step": 3, "event": "non-finite loss: step skipped"},
        {"kind": "eval", "step": 4, "eval_loss": 2.0},
        {"kind": "event", "step": 5, "event": "non-finite gradient: step skipped"},
        {"kind": "eval", "step": 6, "eval_loss": 1.2},
        {"kind": "eval", "step": 8, "eval_loss": 1.1}]))
    log = MetricsLog(path, resume_step=8)
    assert FaultGuard("skip", log, lambda: None).skipped == 2
    assert EvalRecorder(log, 1.5).target_step == 6 and EvalRecorder(log, 1.0).target_step is None
