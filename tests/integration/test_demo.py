"""`run_demo(quick=True)` end to end on the CPU: data, source pretraining, two fine-tunes, report."""

import contextlib
import io
import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from dirtune.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    printed, bars = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(bars):
        result = run_demo(out_dir=out, seed=0, quick=True)
    return out, result, printed.getvalue(), bars.getvalue()


def test_writes_plot_and_json(demo):
    out, result, *_ = demo
    png = out / "demo_loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "demo_result.json").read_text())
    assert saved["target"] == pytest.approx(result["target"])
    for key in ("adamw", "method"):
        r = saved[key]
        assert r["steps_to_target"] is None or isinstance(r["steps_to_target"], int)
        assert r["curve"] and all(len(p) == 2 for p in r["curve"])
        assert isinstance(r["forgetting"], float)
    # AdamW reaches its own best: the target is defined by it
    assert saved["adamw"]["steps_to_target"] == saved["adamw"]["best_step"]
    assert saved["verdict"]


def test_both_runs_match_in_budget_and_evaluations(demo):
    _, result, *_ = demo
    a, m = result["adamw"], result["method"]
    assert a["final_step"] == m["final_step"]
    assert [s for s, _ in a["curve"]] == [s for s, _ in m["curve"]]
    assert a["curve"][0][1] == pytest.approx(m["curve"][0][1])  # same model, same data at step 0


def test_source_model_learned(demo):
    _, result, *_ = demo
    src = result["source"]
    # the untrained model is near uniform over ~100 characters (ln 100 = 4.6); pretraining must
    # take the source-prose loss well below that
    assert src["untrained_valid_loss"] > 4.0
    assert src["valid_loss"] < src["untrained_valid_loss"] - 1.0


def test_prints_the_table_and_verdict(demo):
    _, result, printed, _ = demo
    assert "steps to target" in printed and "AdamW" in printed
    assert result["verdict"] in printed and result["forgetting_verdict"] in printed
    assert "not a tuned comparison" in printed


def test_every_phase_shows_progress(demo):
    _, result, printed, bars = demo
    sizes = result["sizes"]
    # one bar per run, each finishing with its step count, a loss and an ETA/rate
    done = [f"{n}/{n}" for n in (sizes["source_steps"], sizes["task_steps"], sizes["task_steps"])]
    assert [b for b in done if b in bars] == done, bars[-2000:]
    assert "loss=" in bars and "val=" in bars and ("step/s" in bars or "s/step" in bars)
    assert "[1/3] pretraining" in printed and "[3/3] fine-tuning" in printed and "writing a world" in printed


def test_an_interrupted_run_stops_the_demo(tmp_path, monkeypatch):
    import dirtune.train.runner as runner
    from dirtune.demo import run_demo

    calls = []

    def interrupted(cfg):
        calls.append(cfg.train.output_dir)
        return {"interrupted": "SIGINT"}

    monkeypatch.setattr(runner, "run_training", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(out_dir=tmp_path, quick=True)
    assert len(calls) == 1  # the source run only: no fine-tune started after the interrupt


def test_plot_explains_its_lines_and_panels():
    from dirtune.demo import _figure

    res = {"target": 0.5, "adamw": {"label": "AdamW", "curve": [(0, 2.0), (10, 0.5)], "forget_curve": [(0, 1.0), (10, 1.5)],
                                    "steps_to_target": 10},
           "method": {"label": "the method", "curve": [(0, 2.0), (10, 0.6)], "forget_curve": [(0, 1.0), (10, 1.2)],
                      "steps_to_target": None}}
    fig = _figure(res)
    left, right = fig.axes
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert "AdamW first at the target (step 10)" in labels and "target = AdamW's best, 0.500" in labels
    assert not any("the method first" in label for label in labels)  # it never got there
    assert "forgetting" in right.get_title() and "source-prose loss" in right.get_title()
