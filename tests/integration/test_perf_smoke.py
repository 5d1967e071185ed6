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
        assert run.main(["--smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "perf.json").read_text())


def test_every_section_ran_without_error(smoke):
    _, res = smoke
    assert set(res["sections"]) == {"copy", "agree", "step-1b", "memory", "train-1b", "train-7b", "step-7b"}
    for name, sec in res["sections"].items():
        assert "error" not in sec, (name, sec.get("traceback"))
        assert "result" in sec, name


def test_step_rows_report_time_and_bytes(smoke):
    _, res = smoke
    rows = res["sections"]["step-1b"]["result"]
    assert {r["row"] for r in rows} >= {"adamw-fused", "adamw-foreach", "balanced-foreach"}
    by = {(r["set"], r["row"]): r for r in rows}
    assert all("error" not in r and r["ms"] > 0 for r in rows)
    # bf16 θ/g/m/v: AdamW moves 14 bytes per parameter, the bf16 anchor adds 2
    assert by[("1B bf16", "adamw-fused")]["bytes_per_param"] == 14
    assert by[("1B bf16", "balanced-foreach")]["bytes_per_param"] == 16
    assert by[("1B fp32", "adamw-fused")]["bytes_per_param"] == 28


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
    assert all(r["ms"] > 0 and "overhead_vs_adamw" in r for r in lora)
    md = (out / "perf.md").read_text()
    for heading in ("## Optimizer step alone", "## Memory of anchors", "## Training step", "## Goals"):
        assert heading in md
