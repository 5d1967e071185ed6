"""The method under sharding, on CPU with 2 processes over gloo.

1. tests/integration/_sharded_worker.py: FSDP2's `fully_shard` runs on CPU with gloo in the
   installed torch, so the sharded runs are real FSDP2: DTensor parameters sharded by rows
   (uneven shards included), the optimizer's parameters swapped for the shards after
   construction as accelerate does. Each check compares with the same computation on whole
   tensors; the worker reports the largest difference.
2. `dirtune train` itself on 2 processes (torchrun, what `accelerate launch` runs): accelerate
   shards with FSDP only on accelerators, so on CPU Trainer runs data-parallel (DDP); the run
   folder is written once and the trained weights equal a 1-process run on the same batches.
Both start together (the machine waits mostly on imports), each test waits for its part.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch without distributed support", allow_module_level=True)

WORKER = Path(__file__).with_name("_sharded_worker.py")
WORLD = 2
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(out: Path) -> list:
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, str(WORKER), str(r), str(WORLD), port, str(out)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(WORLD)]


def _wait(procs: list, what: str) -> list[str]:
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{what} did not finish in {TIMEOUT} s")
    return logs


def _train_overrides(ckpt: Path, files: dict, out: Path, batch_size: int) -> list[str]:
    # full fine-tuning with the method: scale-balanced anchored decay and the decoupled turn
    return [f"model.path={ckpt}", f"data.train_file={files['task_train']}",
            f"data.valid_file={files['task_valid']}", "data.max_length=128", "data.max_eval_samples=16",
            f"train.output_dir={out}", f"train.batch_size={batch_size}", "train.eval_batch_size=8",
            "train.max_steps=6", "train.eval_every=3", "train.progress=false", "train.report_to=[none]",
            "train.device=cpu", "train.drift_every=2", "train.max_grad_norm=0", "finetune.type=full",
            "optimizer.name=balanced_adamw", "optimizer.lr=3e-3", "optimizer.weight_decay=0.1",
            "optimizer.anchor_dtype=fp32", "method.penalty=decoupled", "method.direction_weight=1",
            "method.reference_dtype=fp32"]


@pytest.fixture(scope="module")
def started(tmp_path_factory, tiny_checkpoint, task_files) -> dict:
    """Starts the FSDP2 worker and a 2-process `dirtune train`; returns their handles."""
    work = tmp_path_factory.mktemp("distributed")
    (work / "run.yaml").write_text("{}\n")
    out = work / "results.json"
    train = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
         f"--master-port={_free_port()}", "-m", "dirtune.cli", "train", str(work / "run.yaml"),
         *_train_overrides(tiny_checkpoint, task_files, work / "two", batch_size=2)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    return {"work": work, "out": out, "worker": _start_worker(out), "train": train}


@pytest.fixture(scope="module")
def results(started) -> dict:
    """The FSDP2 worker's report; the tests of sections 1-3 read it."""
    out = started["out"]
    logs = _wait(started["worker"], "the 2-process worker")
    if any(p.returncode for p in started["worker"]) and any("ddress already in use" in g for g in logs):
        started["worker"] = _start_worker(out)  # the free port was taken meanwhile: once more
        logs = _wait(started["worker"], "the 2-process worker")
    errors = [Path(f"{out}.rank{r}") for r in range(WORLD) if Path(f"{out}.rank{r}").exists()]
    if errors:
        pytest.fail("\n".join(json.loads(e.read_text())["error"] for e in errors))
    if any(p.returncode for p in started["worker"]) or not out.exists():
        pytest.fail("worker failed:\n" + "\n".join(g[-3000:] for g in logs))
    return json.loads(out.read_text())


# --- 1. the sharded reductions, directly on DTensors ------------------------------------------


def test_local_rows_follow_dtensor_layout_including_empty_shards(results):
    assert results["local_rows"] == 0.0


def test_partial_sums_complete_in_one_all_reduce(results):
    assert results["sum_over_shards"] < 1e-12
    assert results["sum_over_shards_calls"] == 1   # 4 sharded tensors + 1 plain, one message


@pytest.mark.parametrize("check", ["balance_scales", "selective_decay", "turn_tensor", "turn_row",
                                   "angle", "drift"])
def test_per_tensor_quantities_equal_unsharded(results, check):
    assert results[check] < 1e-12


def test_selective_decay_check_has_both_signs(results):
    assert results["selective_decay_mixed_signs"] == 1.0   # else equality would prove little


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("ref", ["full", "dtensor"])
def test_penalty_value_and_gradient_equal_unsharded(results, granularity, ref):
    assert results[f"penalty_{granularity}_{ref}_value"] < 1e-12
    assert results[f"penalty_{granularity}_{ref}_grad"] < 1e-12


def test_placements_that_split_rows_and_sharded_lora_are_refused(results):
    assert results["refuses_shard1"] == 1.0
    assert results["refuses_sharded_lora"] == 1.0


@pytest.mark.parametrize("mode", ["scale_row", "selective_tensor", "zero_scale_foreach",
                                  "none_turn_tensor"])
def test_optimizer_on_dtensors_equals_unsharded(results, mode):
    assert results[f"optimizer_{mode}"] < 1e-12


# --- 2. a tiny LLaMA, FSDP2-sharded, against one process on the same global batch -------------

SCENARIOS = ["scale_turn_row", "selective_turn_tensor", "coupled_row", "coupled_tensor"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_training_equals_single_process_float64(results, scenario):
    name = f"train_{scenario}_f64"
    assert results[f"{name}_moved"] > 1e-3          # the weights did move
    assert results[name] < 1e-10                    # ... identically
    assert results[f"{name}_anchors_sharded"] == 1.0
    if scenario.startswith("coupled"):
        assert results[f"{name}_penalty_last"] > 0.1  # the penalty was active
        assert results[f"{name}_penalty"] < 1e-10


def test_sharded_training_equals_single_process_fp32(results):
    assert results["train_scale_turn_row_f32_moved"] > 1e-3
    assert results["train_scale_turn_row_f32"] < 1e-5


# --- 3. checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_checkpoint_round_trip_as_accelerate_saves_fsdp2(results, kind):
    """SHARDED_STATE_DICT (dcp.save/dcp.load into the fresh optimizer's template) and
    FULL_STATE_DICT (gathered, torch.save/torch.load(weights_only), broadcast): resuming after
    step 2 gives the uninterrupted weights, with the anchors still sharded and in bf16."""
    assert results[f"checkpoint_{kind}"] < 1e-12
    assert results[f"checkpoint_{kind}_anchors_kept"] == 1.0


def test_a_nan_in_one_shard_makes_every_process_skip(results):
    assert results["fault_guard_not_skipped"] == 0.0


# --- 4. `dirtune train` on 2 processes ---------------------------------------------------------


def _final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    (path,) = (run / "final").glob("*.safetensors")
    return load_file(path)


def test_dirtune_train_on_two_processes_equals_one(started, tiny_checkpoint, task_files):
    from dirtune.train.config import load_config
    from dirtune.train.run_folder import read_metrics
    from dirtune.train.runner import run_training

    work = started["work"]
    # the reference runs here while the 2-process run works: 4 examples per step either way
    one = run_training(load_config(None, _train_overrides(tiny_checkpoint, task_files, work / "one", 4)))
    (log,) = _wait([started["train"]], "the 2-process dirtune train")
    assert started["train"].returncode == 0, log[-3000:]
    two = json.loads((work / "two" / "summary.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(two["step_times_s"]) == 6
    manifest = json.loads((work / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    # written once: the same records as one process (no duplicate lines from rank 1)
    train = [[r for r in read_metrics(work / run / "metrics.jsonl") if r["kind"] == "train"]
             for run in ("one", "two")]
    assert [r["step"] for r in train[1]] == [r["step"] for r in train[0]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in train[1]] == pytest.approx([r["loss"] for r in train[0]], abs=1e-5)
    from safetensors.torch import load_file

    a, b = _final_weights(work / "one"), _final_weights(work / "two")
    (first,) = tiny_checkpoint.glob("*.safetensors")
    init = load_file(first)
    assert set(a) == set(b) == set(init)
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3   # trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5      # identically
    assert (work / "two" / "checkpoint-6").is_dir() and not list((work / "two").glob(".*checkpoint*"))
