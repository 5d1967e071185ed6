"""bench/scaling without GPUs: the plan for 1-8 GPUs and its memory arithmetic, the report from
fabricated stage logs (efficiency, per-rank memory, failed, timed-out and skipped stages), the
accelerate configs of every N, and `run.sh --dry-run` for 8 GPUs. Pure Python and bash: fast."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "bench" / "scaling"


def _load(name: str, as_name: str):
    """bench/scaling/NAME.py as module `as_name` (registered: dataclasses and scaling.py's own
    `from scaling_plan import …` look it up in sys.modules)."""
    spec = importlib.util.spec_from_file_location(as_name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = module
    spec.loader.exec_module(module)
    return module


plan_mod = _load("scaling_plan", "scaling_plan")
scaling = _load("scaling", "bench_scaling")


# --- the plan and its arithmetic ----------------------------------------------------------------


def test_parameter_counts_are_llama2s():
    counts = {k: plan_mod.parameters(s) for k, s in plan_mod.SHAPES.items()}
    # transformers' LlamaForCausalLM of these configs (num_parameters())
    assert counts == {"1b": 940_640_256, "7b": 6_738_415_616, "13b": 13_015_864_320,
                      "70b": 68_976_648_192}


def test_estimate_matches_the_measured_1b_run():
    """2026-11-28 (bench/results/2026-11-28-scaling): rank 0's peak 29.7 GiB on 1 GPU, 20.1 on 2."""
    for gpus, measured in ((1, 29.7), (2, 20.1)):
        est = plan_mod.gpu_bytes(plan_mod.SHAPES["1b"], gpus, 8, 1024)["total"] / plan_mod.GIB
        assert abs(est - measured) / measured < 0.05, (gpus, est)


@pytest.mark.parametrize("gpus, names", [
    (0, ["gpus-1", "big-7b-gpus-1"]),
    (1, ["gpus-1", "big-7b-gpus-1"]),
    (2, ["gpus-1", "gpus-2", "big-7b-gpus-2"]),
    (4, ["gpus-1", "gpus-2", "gpus-4", "big-7b-gpus-4"]),
    (8, ["gpus-1", "gpus-2", "gpus-4", "gpus-8", "big-7b-gpus-8"]),
])
def test_plan_has_powers_of_two_and_the_big_model_on_every_gpu(gpus, names):
    stages = plan_mod.plan(gpus)
    assert [s.name for s in stages] == names
    assert [s.scaling for s in stages] == [True] * (len(names) - 1) + [False]
    runs = [s.name for s in stages if not s.skip]
    if gpus == 0:
        assert runs == [] and {s.skip for s in stages} == {"no GPU"}
    elif gpus == 1:   # 7B does not fit one H200: the sharded-only stage is skipped, with the reason
        assert runs == ["gpus-1"]
        assert "162 GiB per GPU > 90% of 140 GiB" in stages[-1].skip
    else:
        assert runs == names


def test_big_stage_is_sharded_only():
    for gpus in (2, 4, 8):
        one = plan_mod.fits(plan_mod.SHAPES["7b"], 1, 8, 1024, plan_mod.H200_GIB, 128)
        many = plan_mod.fits(plan_mod.SHAPES["7b"], gpus, 8, 1024, plan_mod.H200_GIB,
                             plan_mod.HOST_GIB[gpus])
        assert one[1] and not many[1] and many[0] < one[0] / 1.5


def test_largest_model_that_fits():
    assert plan_mod.largest_fitting(1) == "1b"
    assert plan_mod.largest_fitting(2) == "7b"
    assert plan_mod.largest_fitting(4) == "13b"
    # 8 processes would each hold 13B in fp32 with its anchors before sharding: 582 GiB of host memory
    assert plan_mod.largest_fitting(8) == "7b"
    assert plan_mod.largest_fitting(8, host_gib=2048) == "13b"
    assert "13b" in plan_mod.plan(4, big="13b")[-1].name and not plan_mod.plan(4, big="13b")[-1].skip


def test_plan_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown model shape '3b'.*'13b'"):
        plan_mod.plan(4, big="3b")
    with pytest.raises(ValueError, match="gpus must be >= 0"):
        plan_mod.plan(-1)


# --- the report, from fabricated stage logs -----------------------------------------------------


def _stage_files(runs: Path, name: str, gpus: int, step_s: float | None, status: dict,
                 used_mib: list[float] | None = None) -> None:
    """What run.sh and `dirtune train` leave for a stage: 5 slow warm-up steps, then 10 of step_s."""
    (runs / f"{name}.status").write_text(json.dumps(status))
    if used_mib:
        samples = [f"{i}, {m / 2:.0f}" for i, m in enumerate(used_mib)] + \
                  [f"{i}, {m:.0f}" for i, m in enumerate(used_mib)] + ["junk line", "9, 99999"]
        (runs / f"{name}.gpumem").write_text("\n".join(samples) + "\n")
    if step_s is None:
        return
    run = runs / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "world_size": gpus, "step_times_s": [3.0] * 5 + [step_s] * 10, "peak_gpu_memory_gib": 30.0 / gpus}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"kind": "train", "step": i, "loss": 10.0 - i})
                                                 for i in range(1, 16)) + "\n")


@pytest.fixture
def work(tmp_path):
    w = tmp_path / "work"
    (w / "runs").mkdir(parents=True)
    (w / "spec.json").write_text(json.dumps({"steps": 15, "batch": 8, "seq": 1024, "device": "8 x H200"}))
    (w / "plan.json").write_text(json.dumps([dict(vars(s), scaling=s.scaling) for s in plan_mod.plan(8)]))
    return w


def _report(work: Path, out: Path) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return scaling.report(work, out)


def test_report_of_1_2_4_8_gpus_and_the_big_model(work, tmp_path):
    runs = work / "runs"
    _stage_files(runs, "gpus-1", 1, 0.2, {"exit": 0, "seconds": 40, "limit": 100}, [30 * 1024])
    _stage_files(runs, "gpus-2", 2, 0.25, {"exit": 0, "seconds": 50, "limit": 100}, [20 * 1024, 21 * 1024])
    _stage_files(runs, "gpus-4", 4, 0.4, {"exit": 0, "seconds": 60, "limit": 100}, [16 * 1024] * 4)
    _stage_files(runs, "gpus-8", 8, None, {"exit": 124, "seconds": 100, "limit": 100})
    _stage_files(runs, "big-7b-gpus-8", 8, 1.0, {"exit": 0, "seconds": 200, "limit": 300}, [60 * 1024] * 8)
    result = _report(work, tmp_path / "out")
    rows = {r["stage"]: r for r in result["stages"]}
    assert list(rows) == ["gpus-1", "gpus-2", "gpus-4", "gpus-8", "big-7b-gpus-8"]
    # weak scaling: 8192 tokens per GPU per step; the warm-up steps are left out of the median
    assert rows["gpus-2"]["tokens_per_step"] == 16384 and rows["gpus-2"]["steps_timed"] == 10
    assert rows["gpus-1"]["tokens_per_s"] == pytest.approx(8192 / 0.2)
    assert [rows[f"gpus-{n}"].get("scaling_efficiency") for n in (1, 2, 4)] == pytest.approx([1.0, 0.8, 0.5])
    assert rows["gpus-8"]["status"] == "timed out after 100 s (limit 100 s)"
    assert rows["gpus-8"].get("scaling_efficiency") is None
    big = rows["big-7b-gpus-8"]
    assert big["status"] == "ok" and "scaling_efficiency" not in big   # another model: no efficiency
    assert big["step_s_median"] == 1.0 and big["tokens_per_s"] == pytest.approx(8 * 8192)
    assert big["parameters"] == 6_738_415_616
    # every rank's peak in use, from nvidia-smi's samples (GPU 9 is not this stage's)
    assert rows["gpus-2"]["peak_used_gib_per_gpu"] == [20.0, 21.0]
    assert big["peak_used_gib_per_gpu"] == [60.0] * 8
    assert rows["gpus-4"]["peak_gpu_memory_gib_rank0"] == 7.5
    assert (rows["gpus-1"]["loss_first"], rows["gpus-1"]["loss_last"]) == (9.0, -5.0)
    md = (tmp_path / "out" / "scaling.md").read_text()
    assert "| gpus-2 | 0.94B | 2 | 16,384 | 0.250 | 65,536 | 0.80 | 15.0 | 20.0 / 21.0 | 20 |" in md
    assert "| big-7b-gpus-8 | 6.74B | 8 |" in md and "timed out after 100 s" in md
    assert json.loads((tmp_path / "out" / "scaling.json").read_text())["stages"][1]["scaling_efficiency"] == 0.8


def test_report_without_a_1_gpu_baseline_and_with_skipped_failed_and_missing_stages(work, tmp_path):
    runs = work / "runs"
    _stage_files(runs, "gpus-1", 1, None, {"exit": 1, "seconds": 9, "limit": 100})
    _stage_files(runs, "gpus-2", 2, 0.25, {"exit": 0, "seconds": 50, "limit": 100})
    (runs / "gpus-4.status").write_text(json.dumps({"skipped": "20 s left of the call's 560 s"}))
    (runs / "gpus-8.status").write_text(json.dumps({"exit": 0, "seconds": 70, "limit": 100}))  # no summary
    result = _report(work, tmp_path / "out")
    rows = {r["stage"]: r for r in result["stages"]}
    assert rows["gpus-1"]["status"] == "exit 1 (see gpus-1.log)"
    assert rows["gpus-2"]["tokens_per_s"] == pytest.approx(16384 / 0.25)
    assert rows["gpus-2"]["scaling_efficiency"] is None
    assert rows["gpus-4"]["status"] == "skipped: 20 s left of the call's 560 s"
    assert rows["gpus-8"]["status"].startswith("no summary.json")
    assert rows["big-7b-gpus-8"]["status"].startswith("not run: run.sh recorded nothing")
    assert "no 1-GPU throughput in this call: no efficiency" in (tmp_path / "out" / "scaling.md").read_text()


def test_report_needs_the_plan(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="plan.json is missing"):
        _report(tmp_path, tmp_path / "out")


# --- the accelerate configs and the dry run -----------------------------------------------------


def test_an_fsdp2_config_for_every_n_differing_only_in_processes():
    configs = {n: yaml.safe_load((REPO / "configs" / "accelerate" / f"fsdp2-{n}gpu.yaml").read_text())
               for n in (2, 4, 8)}
    for n, c in configs.items():
        assert c["num_processes"] == n and c["fsdp_config"]["fsdp_version"] == 2
        assert {k: v for k, v in c.items() if k != "num_processes"} == \
               {k: v for k, v in configs[2].items() if k != "num_processes"}


def _run_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    # run.sh calls `python3`: this interpreter's, whether or not its environment is activated
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", str(HERE / "run.sh"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PATH": path, **env})


def test_dry_run_prints_the_stages_for_8_gpus(tmp_path):
    out = tmp_path / "out"
    done = _run_sh("--dry-run", GPUS="8", OUT=str(out))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    would = [line for line in text.splitlines() if line.startswith("would run ")]
    assert [line.split(":")[0] for line in would] == [
        "would run gpus-1", "would run gpus-2", "would run gpus-4", "would run gpus-8", "would run big-7b-gpus-8"]
    assert "--num_processes 1 --num_machines 1 --mixed_precision bf16" in would[0]
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 " in would[3]
    assert "--config_file configs/accelerate/fsdp2-8gpu.yaml --num_processes 8" in would[3]
    assert "model.path=/tmp/dirtune-scaling/model-7b" in would[4] and "train.max_steps=12" in would[4]
    assert "largest LLaMA-2 shape that fits on 8 GPU(s) by the estimate: 7b" in text
    assert not out.exists()   # nothing run, nothing written


def test_dry_run_on_one_gpu_skips_the_big_stage_and_bad_arguments_are_refused():
    one = _run_sh("--dry-run", GPUS="1", BIG="13b")
    assert one.returncode == 0, one.stderr
    assert "big-13b-gpus-1" in one.stdout and "skip (estimated" in one.stdout
    assert [line.split(":")[0] for line in one.stdout.splitlines() if line.startswith("would run")] == \
        ["would run gpus-1"]
    bad = _run_sh("--now")
    assert bad.returncode == 2 and "usage: bash bench/scaling/run.sh [--dry-run]" in bad.stderr
    unknown = _run_sh("--dry-run", GPUS="4", BIG="3b")
    assert unknown.returncode != 0 and "unknown model shape '3b'" in unknown.stderr


def test_a_call_with_too_little_time_reports_every_stage_skipped(tmp_path):
    """The real path (no --dry-run) as far as it goes without GPUs: prepare, the stage loop's time
    check, the report and the one archive of logs; 20 s leave no stage its 30 s."""
    out, work = tmp_path / "out", tmp_path / "work"
    done = _run_sh(GPUS="2", TOTAL="20", OUT=str(out), WORK=str(work),
                   PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((out / "scaling.json").read_text())["stages"]
    assert [r["stage"] for r in rows] == ["gpus-1", "gpus-2", "big-7b-gpus-2"]
    assert all(r["status"].startswith("skipped: ") and r["status"].endswith("s left of the call's 20 s")
               for r in rows), [r["status"] for r in rows]
    assert (work / "model-7b" / "config.json").exists() and (work / "run.yaml").exists()
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "scaling.json", "scaling.md"]
    names = subprocess.run(["tar", "tzf", str(out / "logs.tar.gz")], capture_output=True, text=True).stdout
    assert {"logs/stages.txt", "logs/prepare.log", "logs/report.log"} <= set(names.split())
