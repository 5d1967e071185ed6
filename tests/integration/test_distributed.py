"""The method under sharding, on CPU with 2 and 4 processes over gloo.

1. tests/integration/_sharded_worker.py: FSDP2's `fully_shard` runs on CPU with gloo in the
   installed torch, so the sharded runs are real FSDP2: DTensor parameters sharded by rows
   (uneven shards and shards without rows included), the optimizer's parameters swapped for the
   shards after construction as accelerate does. Each check compares with the same computation
   on whole tensors; the worker reports the largest difference. On 2 ranks every check runs; on
   4 ranks the reductions, the penalty, the optimizer and the tiny LLaMA's training (what changes
   with the world size), not the checkpoints and the fault guard.
2. `dirtune train` itself on 2 processes (torchrun, what `accelerate launch` runs), written
   once, ending with the weights of a 1-process run on the same batches: data-parallel (what
   accelerate does on CPU processes), and FSDP2 with the settings of
   configs/accelerate/fsdp2-2gpu.yaml (tests/integration/_fsdp_cpu_cli.py lets accelerate take
   its FSDP path on CPU processes), which is then resumed from a checkpoint.
All start together (the machine waits mostly on imports), each test waits for its part.
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
FSDP_CLI = Path(__file__).with_name("_fsdp_cpu_cli.py")
FSDP_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp2-2gpu.yaml"
WORLD = 2
# the worker's checks on 4 ranks (section 1 and 2 below)
WORLD4_CHECKS = "reductions,penalty,refusals,optimizer,training"
# shards without rows among the worker's SHAPES (see there), summed over ranks
EMPTY_SHARDS = {2: 1, 4: 4}
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(out: Path, world: int = WORLD, checks: str | None = None) -> list:
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = [checks] if checks else []
    return [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), port, str(out), *extra],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(world)]


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


@pytest.fixture(scope="module")
def train_overrides(run_overrides):
    """`train_overrides(out, batch_size)`: 6 steps of full fine-tuning with the method
    (scale-balanced anchored decay and the decoupled turn), evaluated at steps 3 and 6."""
    return lambda out, batch_size: run_overrides(
        out, "data.max_length=128", "data.max_eval_samples=16", f"train.batch_size={batch_size}",
        "train.eval_batch_size=8", "train.max_steps=6", "train.eval_every=3", "train.drift_every=2",
        "train.max_grad_norm=0", "finetune.type=full", "optimizer.name=balanced_adamw", "optimizer.lr=3e-3",
        "optimizer.weight_decay=0.1", "optimizer.anchor_dtype=fp32", "method.penalty=decoupled",
        "method.direction_weight=1", "method.reference_dtype=fp32")


def _fsdp_env() -> dict:
    """The environment `accelerate launch --config_file fsdp2-2gpu.yaml` sets for FSDP."""
    import yaml

    config = yaml.safe_load(FSDP_CONFIG.read_text())["fsdp_config"]
    env = {"ACCELERATE_USE_FSDP": "true"}
    for key, value in config.items():
        name = "FSDP_TRANSFORMER_CLS_TO_WRAP" if key == "fsdp_transformer_layer_cls_to_wrap" else key.upper()
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _launch(work: Path, entry: list[str], *overrides: str, fsdp: bool = False) -> subprocess.Popen:
    """`dirtune train` on 2 CPU processes under torchrun (entry: how to start the CLI)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(_fsdp_env() if fsdp else {})}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
         f"--master-port={_free_port()}", *entry, "train", str(work / "run.yaml"), *overrides],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def started(tmp_path_factory, train_overrides) -> dict:
    """Starts the FSDP2 workers (2 and 4 ranks) and the 2-process `dirtune train` runs; returns
    their handles."""
    work = tmp_path_factory.mktemp("distributed")
    (work / "run.yaml").write_text("{}\n")
    out = {2: work / "results.json", 4: work / "results-world4.json"}
    two = train_overrides(work / "ddp", batch_size=2)
    sharded = train_overrides(work / "fsdp", batch_size=2)
    return {"work": work, "out": out, "results": {},
            "worker": {2: _start_worker(out[2]), 4: _start_worker(out[4], 4, WORLD4_CHECKS)},
            "ddp": _launch(work, ["-m", "dirtune.cli"], *two),
            "fsdp": _launch(work, [str(FSDP_CLI)], *sharded, "train.save_every=3", fsdp=True)}


def _worker_results(started, world: int) -> dict:
    """The report of the FSDP2 worker on `world` ranks (waited for once)."""
    if world in started["results"]:
        return started["results"][world]
    out, what = started["out"][world], f"the {world}-process worker"
    logs = _wait(started["worker"][world], what)
    if any(p.returncode for p in started["worker"][world]) and any("ddress already in use" in g for g in logs):
        # the free port was taken meanwhile: once more
        started["worker"][world] = _start_worker(out, world, None if world == WORLD else WORLD4_CHECKS)
        logs = _wait(started["worker"][world], what)
    errors = [Path(f"{out}.rank{r}") for r in range(world) if Path(f"{out}.rank{r}").exists()]
    if errors:
        pytest.fail("\n".join(json.loads(e.read_text())["error"] for e in errors))
    if any(p.returncode for p in started["worker"][world]) or not out.exists():
        pytest.fail(f"{what} failed:\n" + "\n".join(g[-3000:] for g in logs))
    started["results"][world] = json.loads(out.read_text())
    return started["results"][world]


@pytest.fixture(scope="module")
def results(started) -> dict:
    """The 2-rank worker's report (every check); section 3 reads it."""
    return _worker_results(started, WORLD)


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def sharded_results(request, started) -> dict:
    """The report on 2 ranks, then on 4; sections 1 and 2 read it."""
    return _worker_results(started, request.param)


# --- 1. the sharded reductions, directly on DTensors ------------------------------------------


def test_local_rows_follow_dtensor_layout_including_empty_shards(sharded_results):
    assert sharded_results["local_rows"] == 0.0
    # shards without rows were met
    assert sharded_results["empty_shards"] == EMPTY_SHARDS[sharded_results["world"]]


def test_partial_sums_complete_in_one_all_reduce(sharded_results):
    assert sharded_results["sum_over_shards"] < 1e-12
    assert sharded_results["sum_over_shards_calls"] == 1   # 4 sharded tensors + 1 plain, one message


@pytest.mark.parametrize("check", ["balance_scales", "selective_decay", "turn_tensor", "turn_row",
                                   "angle", "drift"])
def test_per_tensor_quantities_equal_unsharded(sharded_results, check):
    assert sharded_results[check] < 1e-12


def test_selective_decay_check_has_both_signs(sharded_results):
    assert sharded_results["selective_decay_mixed_signs"] == 1.0   # else equality would prove little


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("ref", ["full", "dtensor"])
def test_penalty_value_and_gradient_equal_unsharded(sharded_results, granularity, ref):
    assert sharded_results[f"penalty_{granularity}_{ref}_value"] < 1e-12
    assert sharded_results[f"penalty_{granularity}_{ref}_grad"] < 1e-12


def test_placements_that_split_rows_and_sharded_lora_are_refused(sharded_results):
    assert sharded_results["refuses_shard1"] == 1.0
    assert sharded_results["refuses_sharded_lora"] == 1.0


@pytest.mark.parametrize("mode", ["scale_row", "selective_tensor", "zero_scale_foreach",
                                  "none_turn_tensor"])
def test_optimizer_on_dtensors_equals_unsharded(sharded_results, mode):
    assert sharded_results[f"optimizer_{mode}"] < 1e-12


# --- 2. a tiny LLaMA, FSDP2-sharded, against one process on the same global batch -------------

SCENARIOS = ["scale_turn_row", "selective_turn_tensor", "coupled_row", "coupled_tensor"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_training_equals_single_process_float64(sharded_results, scenario):
    name = f"train_{scenario}_f64"
    assert sharded_results[f"{name}_moved"] > 1e-3          # the weights did move
    assert sharded_results[name] < 1e-10                    # ... identically
    assert sharded_results[f"{name}_anchors_sharded"] == 1.0
    if scenario.startswith("coupled"):
        assert sharded_results[f"{name}_penalty_last"] > 0.1  # the penalty was active
        assert sharded_results[f"{name}_penalty"] < 1e-10


def test_sharded_training_equals_single_process_fp32(sharded_results):
    assert sharded_results["train_scale_turn_row_f32_moved"] > 1e-3
    assert sharded_results["train_scale_turn_row_f32"] < 1e-5


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


@pytest.fixture(scope="module")
def one_process(started, train_overrides) -> Path:
    """The reference: 1 process, 4 examples per step (runs here while the others work)."""
    from dirtune.train.config import load_config
    from dirtune.train.runner import run_training

    out = started["work"] / "one"
    summary = run_training(load_config(None, train_overrides(out, 4)))
    assert summary["world_size"] == 1
    return out


def _finished(started, name: str) -> Path:
    (log,) = _wait([started[name]], f"the 2-process dirtune train ({name})")
    assert started[name].returncode == 0, log[-4000:]
    return started["work"] / name


def _largest_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_dirtune_train_on_two_processes_equals_one(started, one_process, tiny_checkpoint, name):
    from safetensors.torch import load_file

    from dirtune.train.run_folder import read_metrics

    run = _finished(started, name)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["step_times_s"]) == 6
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2
    # written once: the same records as one process (no duplicate lines from rank 1)
    train = [[r for r in read_metrics(folder / "metrics.jsonl") if r["kind"] == "train"]
             for folder in (one_process, run)]
    assert [r["step"] for r in train[1]] == [r["step"] for r in train[0]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in train[1]] == pytest.approx([r["loss"] for r in train[0]], abs=1e-5)
    (first,) = tiny_checkpoint.glob("*.safetensors")
    reference = _final_weights(one_process)
    assert _largest_difference(reference, load_file(first)) > 1e-3   # trained
    assert _largest_difference(_final_weights(run), reference) < 1e-5  # identically
    assert (run / "checkpoint-6").is_dir() and not list(run.glob(".*checkpoint*"))


def test_fsdp2_run_resumes_from_its_checkpoint(started, train_overrides):
    """Trainer saves the FSDP2 run (FULL_STATE_DICT: weights, BalancedAdamW's moments and
    anchors) and loads it into a freshly sharded model: the same end as without stopping."""
    import shutil

    work = started["work"]
    run = _finished(started, "fsdp")
    resumed = work / "fsdp-resumed"
    resumed.mkdir()
    shutil.copytree(run / "checkpoint-3", resumed / "checkpoint-3")
    job = _launch(work, [str(FSDP_CLI)], *train_overrides(resumed, 2),
                  "train.save_every=3", "train.resume=auto", fsdp=True)
    (log,) = _wait([job], "the resumed FSDP2 run")
    assert job.returncode == 0, log[-4000:]
    assert _largest_difference(_final_weights(resumed), _final_weights(run)) < 1e-6
