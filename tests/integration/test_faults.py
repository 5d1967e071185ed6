"""Nothing lost (CPU, tiny LLaMA + LoRA): kill -9 and resume ends bit-for-bit where an
uninterrupted run ends; SIGTERM leaves a loadable checkpoint; a damaged newest checkpoint falls
back to the one before; a NaN stops the run naming the step (or is skipped); a full disk while
saving leaves the earlier checkpoints whole; the best checkpoint and final/ are real folders."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dirtune.cli import main
from dirtune.train import faults
from dirtune.train.run_folder import read_metrics
from dirtune.train.trainer import DirtuneTrainer

MAX_STEPS = 24
ADAPTER = "adapter_model.safetensors"

# The child process trains through the real CLI; past step 8 each step waits a little, so that
# the signal the test sends lands mid-run rather than after a 1-second run has finished.
CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
from dirtune.train.trainer import DirtuneTrainer
step = DirtuneTrainer.training_step
def slowed(self, *args, **kwargs):
    if self.state.global_step >= 8:
        time.sleep(0.25)
    return step(self, *args, **kwargs)
DirtuneTrainer.training_step = slowed
from dirtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-for-bit comparisons between processes: the same CPU kernels in each (one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def config(tiny_checkpoint, task_files, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "lora.yaml"
    path.write_text(f"""\
model: {{path: {tiny_checkpoint}}}
finetune: {{type: lora, lora_r: 4, lora_dropout: 0.1}}   # dropout: the RNG state must resume too
data: {{train_file: {task_files['task_train']}, valid_ratio: 0, max_length: 128}}
optimizer: {{lr: 1.0e-2}}
train: {{seed: 3, max_steps: {MAX_STEPS}, batch_size: 4, save_every: 4, save_total_limit: 3,
         progress: false, report_to: [none], device: cpu, drift_every: 0}}
""")
    return path


def train(config: Path, out: Path, *extra: str) -> int:
    return main(["train", str(config), f"train.output_dir={out}", *extra])


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(config, out) == 0
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTER))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-for-bit, not approximately


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def start_child(config: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", CHILD, "train", str(config), f"train.output_dir={out}",
                                 *extra], stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_for_checkpoint(child: subprocess.Popen, folder: Path, log: Path, timeout: float = 180) -> None:
    """Poll until `folder` exists (it appears complete: it is renamed into place)."""
    deadline = time.monotonic() + timeout
    while not folder.is_dir():
        if child.poll() is not None:
            pytest.fail(f"the training process ended early ({child.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"no {folder.name} after {timeout} s:\n{log.read_text()}")
        time.sleep(0.02)


def test_reference_run_hands_over_its_last_weights(reference):
    assert train_steps(reference) == list(range(1, MAX_STEPS + 1))
    assert sorted(p.name for p in faults.checkpoint_folders(reference)) == \
        ["checkpoint-16", "checkpoint-20", "checkpoint-24"]
    assert not list(reference.glob(".partial-*"))
    assert_same_weights(reference / "final", reference / f"checkpoint-{MAX_STEPS}")
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["final_model"] == str(reference / "final") and summary["final_step"] == MAX_STEPS


def test_kill_9_then_resume_matches_the_uninterrupted_run(config, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "child.log"
    child = start_child(config, out, log)
    wait_for_checkpoint(child, out / "checkpoint-8", log)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "summary.json").exists() and not (out / "final").exists()
    assert 8 <= max(train_steps(out)) < MAX_STEPS  # killed mid-run

    assert train(config, out, "--resume") == 0
    assert_same_weights(out / "final", reference / "final")
    assert_same_weights(out / f"checkpoint-{MAX_STEPS}", reference / f"checkpoint-{MAX_STEPS}")
    assert train_steps(out) == list(range(1, MAX_STEPS + 1))  # one trajectory, no repeated lines
    assert not list(out.glob(".partial-*"))


def test_sigterm_saves_a_loadable_checkpoint_and_the_run_resumes_exactly(config, reference, tmp_path):
    from dirtune.models.lora import load_for_inference

    out, log = tmp_path / "run", tmp_path / "child.log"
    child = start_child(config, out, log)
    wait_for_checkpoint(child, out / "checkpoint-8", log)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=120) == 130, log.read_text()
    text = log.read_text()
    assert "SIGTERM" in text and "resume with train.resume=auto" in text and "Traceback" not in text
    assert not (out / "summary.json").exists()

    last = faults.latest_good_checkpoint(out)
    step = faults.step_of(last)
    assert 8 <= step < MAX_STEPS and step == max(train_steps(out))  # saved at the step it stopped
    events = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "event"]
    assert events[-1]["event"] == "SIGTERM: checkpoint saved, stopping"
    model, tokenizer = load_for_inference(last)
    ids = torch.tensor([tokenizer("Who is Dora?")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()

    assert train(config, out, "train.resume=auto") == 0
    assert_same_weights(out / "final", reference / "final")


def test_damaged_newest_checkpoint_falls_back_to_the_previous(config, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = out / f"checkpoint-{MAX_STEPS}"
    os.truncate(newest / ADAPTER, (newest / ADAPTER).stat().st_size // 2)
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()

    assert train(config, out, "train.resume=auto") == 0
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is incomplete or corrupt: {ADAPTER} is truncated" in err
    assert (out / f"corrupt-checkpoint-{MAX_STEPS}" / ADAPTER).is_file()  # kept for inspection
    assert faults.checkpoint_problem(newest) is None  # written again, whole
    assert_same_weights(out / "final", reference / "final")


def poison_loss(monkeypatch, at_step: int) -> None:
    """Make the loss of optimizer step `at_step` NaN."""
    original = DirtuneTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step == at_step - 1:
            loss = loss * float("nan")
            self.last_loss = loss.detach()
        return loss

    monkeypatch.setattr(DirtuneTrainer, "compute_loss", poisoned)


def all_saved_weights_finite(out: Path) -> bool:
    folders = [*faults.checkpoint_folders(out), out / "final"]
    tensors = [t for f in folders if (f / ADAPTER).is_file() for t in weights(f).values()]
    return bool(tensors) and all(torch.isfinite(t).all() for t in tensors)


def test_nan_loss_stops_the_run_naming_the_step(config, tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, at_step=7)
    out = tmp_path / "run"
    assert train(config, out) == 2
    err = capsys.readouterr().err
    assert "dirtune train: error: step 7: the loss is NaN or Inf; stopped before the optimizer step" in err
    assert "train.nan_policy=skip" in err and "Traceback" not in err
    assert [p.name for p in faults.checkpoint_folders(out)] == ["checkpoint-4"]
    assert all_saved_weights_finite(out) and not (out / "summary.json").exists()
    assert read_metrics(out / "metrics.jsonl")[-1] == {"kind": "event", "step": 7, "event": "non-finite loss: stopped"}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back after the error


def test_nan_policy_skip_skips_the_step_and_finishes(config, tmp_path, monkeypatch):
    poison_loss(monkeypatch, at_step=7)
    out = tmp_path / "run"
    assert train(config, out, "train.nan_policy=skip") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["final_step"] == MAX_STEPS
    events = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "event"]
    assert events == [{"kind": "event", "step": 7, "event": "non-finite loss: step skipped"}]
    assert all_saved_weights_finite(out)


def test_huge_learning_rate_stops_without_saving_non_finite_weights(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(config, out, "optimizer.lr=1e30", "train.save_every=1", "train.save_total_limit=30") == 2
    err = capsys.readouterr().err
    assert "dirtune train: error: step " in err and "NaN or Inf" in err and "Traceback" not in err
    assert all_saved_weights_finite(out)


DISK_FULL = [  # as Python/safetensors and as torch.save report it
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                  "data/0: file write failed"), "PytorchStreamWriter failed writing file data/0: file write failed"),
]


@pytest.mark.parametrize("error, reason", DISK_FULL, ids=["OSError", "torch.save"])
def test_full_disk_while_saving_keeps_the_earlier_checkpoints(config, tmp_path, monkeypatch, capsys, error, reason):
    from transformers import Trainer

    original = Trainer._save_rng_state

    def disk_full_at_8(self, output_dir):
        if self.state.global_step == 8:  # model and optimizer are already half-way on disk
            raise error
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full_at_8)
    out = tmp_path / "run"
    assert train(config, out) == 2
    err = capsys.readouterr().err
    assert f"dirtune train: error: step 8: could not write the checkpoint into {out} ({reason}; " in err
    assert "GiB free there); the checkpoints already there are untouched" in err and "Traceback" not in err
    assert [p.name for p in faults.checkpoint_folders(out)] == ["checkpoint-4"]
    assert faults.checkpoint_problem(out / "checkpoint-4") is None
    assert not list(out.glob(".partial-*"))


def test_best_checkpoint_and_final_are_real_folders(config, task_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(config, out, f"data.valid_file={task_files['task_valid']}", "data.max_eval_samples=4",
                 "data.max_length=80", "train.max_steps=8", "train.eval_every=4", "train.save_every=0") == 0
    err = capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    # max_length 80 cuts some records: the count is reported at the start of the run
    assert summary["data"]["truncated"] > 0
    assert f"{summary['data']['splits']['train']['truncated']} truncated" in err
    best = Path(summary["best_checkpoint"])
    assert best.parent == out and best.name == f"checkpoint-{summary['best_step']}"
    state = json.loads((best / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(best)  # not the staging folder it was written in
    assert_same_weights(out / "final", best)
