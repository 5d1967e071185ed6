"""bench/perf/run.py --smoke end to end on the CPU: every section runs on tiny shapes and the
JSON and markdown reports are written (the GPU numbers come from the same code)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUN = Path(__file__).resolve().parents[2] / "bench" / "perf" / "run.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("perf_run", RUN)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    out = tmp_path_factory.mktemp("perf")
    with contextlib.redirect_stdout(io.StringIO()):
        assert run.main(["--smoke", "--out", str(out), "--only", ",".join(run.DEFAULT + ["memory"])]) == 0
    return out, json.loads((out / "perf.json").read_text())


def test_every_section_ran_without_error(smoke):
    _, res = smoke
    assert set(res["sections"]) == {"copy", "check", "floor", "train-1b", "train-7b", "step-7b", "memory"}
    for name, sec in res["sections"].items():
        assert "error" not in sec, (name, sec.get("traceback"))
        assert "result" in sec, name


def test_step_rows_report_time_bytes_and_interleaved_ratios(smoke):
    _, res = smoke
    rows = res["sections"]["step-7b"]["result"]
    by = {(r["set"], r["row"]): r for r in rows}
    assert all("error" not in r and r["ms"] > 0 and r["rounds"] == 3 for r in rows)
    # bf16 θ/g/m/v: AdamW moves 14 bytes per parameter, the bf16 anchor adds 2
    assert by[("7B bf16", "adamw-fused")]["bytes_per_param"] == 14
    assert by[("7B bf16", "balanced-foreach")]["bytes_per_param"] == 16
    assert by[("7B (16 of 32 layers) fp32", "adamw-fused")]["bytes_per_param"] == 28
    # ratios are per round against AdamW in the same round
    assert by[("7B bf16", "adamw-fused")]["ratio"] == 1.0
    r = by[("7B bf16", "balanced-foreach")]
    assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and len(r["round_ms"]) == 3


def test_check_section_needs_cuda_and_does_not_stop_the_smoke_run(smoke):
    _, res = smoke
    assert res["sections"]["check"]["result"][0]["ok"] and "stopped" not in res


def test_memory_rows_show_two_bytes_per_bf16_anchor(smoke):
    _, res = smoke
    rows = {r["case"]: r for r in res["sections"]["memory"]["result"]}
    assert rows["anchor init, bf16, beside"]["stored_bytes_per_param"] == {"anchor bfloat16 on cpu": 2.0}
    assert rows["anchor init, fp32, beside"]["stored_bytes_per_param"] == {"anchor float32 on cpu": 4.0}
    assert rows["anchor zero, no turn"]["stored_bytes_per_param"] == {}


def test_training_rows_and_markdown(smoke):
    out, res = smoke
    lora = res["sections"]["train-7b"]["result"]
    assert [r["variant"] for r in lora][0].startswith("adamw")
    assert {"coupled (penalty + balanced)", "coupled, lazy every 4"} <= {r["variant"] for r in lora}
    assert all(r["ms"] > 0 and "overhead_vs_adamw" in r and r["rounds"] == 3 for r in lora)
    full_rows = res["sections"]["train-1b"]["result"]
    full = {r["variant"] for r in full_rows}
    assert {"adamw (torch, fused)", "balanced init/scale alone", "coupled (penalty + balanced init/scale)",
            "decoupled (balanced + row turn, folded)"} <= full
    # every step also timed with the host ahead, and one profiled step per variant (1B)
    for r in full_rows + lora:
        assert r["device_ms"] > 0 and r["host_ms"] > 0 and len(r["device_round_ms"]) == r["rounds"]
        assert r["device_ratio_min"] <= r["device_ratio"] <= r["device_ratio_max"]
    assert all("error" not in r["profile"] and r["profile"]["kernels"] >= 0 for r in full_rows)
    md = (out / "perf.md").read_text()
    for heading in ("## The kernels against", "## The penalty alone", "## Optimizer step alone", "## Training step",
                    "## Goals"):
        assert heading in md
    assert "7B LoRA, coupled method ≤ 1.03× AdamW" in md
    assert "(device time, host ahead)" in md and "### Where the GPU time goes" in md
    floor = res["sections"]["floor"]["result"]
    assert all(r["gpu_ms"] > 0 and r["host_ms"] > 0 for r in floor)


def test_a_failed_check_stops_before_timing(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("perf_run_stop", RUN)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    monkeypatch.setattr(run, "gpu_checks", lambda device: [
        {"check": "dense penalty value", "metric": "rel. err vs fp64", "value": 0.5, "limit": 1e-5, "ok": False}])
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert run.main(["--smoke", "--out", str(tmp_path), "--only", "check,train-1b"]) == 2
    res = json.loads((tmp_path / "perf.json").read_text())
    assert "train-1b" not in res["sections"] and "dense penalty value" in res["stopped"]
    assert "STOPPED" in printed.getvalue() and "Stopped before timing" in (tmp_path / "perf.md").read_text()
