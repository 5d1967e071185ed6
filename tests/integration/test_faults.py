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

from metrics_lines import untimed_lines

from dirtune.cli import main
from dirtune.train import checkpoints
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
    assert sorted(p.name for p in checkpoints.checkpoint_folders(reference)) == \
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

    last = checkpoints.latest_good_checkpoint(out)
    step = checkpoints.step_of(last)
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
    assert checkpoints.checkpoint_problem(newest) is None  # written again, whole
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
    folders = [*checkpoints.checkpoint_folders(out), out / "final"]
    tensors = [t for f in folders if (f / ADAPTER).is_file() for t in weights(f).values()]
    return bool(tensors) and all(torch.isfinite(t).all() for t in tensors)


def test_nan_loss_stops_the_run_naming_the_step(config, tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, at_step=7)
    out = tmp_path / "run"
    assert train(config, out) == 2
    err = capsys.readouterr().err
    assert "dirtune train: error: step 7: the loss is NaN or Inf; stopped before the optimizer step" in err
    assert "train.nan_policy=skip" in err and "Traceback" not in err
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-4"]
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
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-4"]
    assert checkpoints.checkpoint_problem(out / "checkpoint-4") is None
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


# ---------------------------------------------------------------- issue 13: the holes fault injection found

def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_metrics(out: Path, reference: Path) -> bool:
    """metrics.jsonl identical to the uninterrupted run's, but for the wall-clock "time" field."""
    return untimed_lines(out / "metrics.jsonl") == untimed_lines(reference / "metrics.jsonl")


def killed_at_the_end(reference: Path, out: Path) -> Path:
    """A copy of the reference run as a kill while final/ or summary.json was written leaves it."""
    shutil.copytree(reference, out)
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    return out


def test_resuming_a_finished_run_refuses_and_changes_nothing(config, reference, tmp_path, capsys):
    """13.1: it trained step max_steps+1 at learning rate 0 and rewrote final/ and summary.json."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    assert train(config, out, "--resume") == 2
    err = capsys.readouterr().err
    assert f"dirtune train: error: train.resume: {out} holds a finished run (summary.json, step {MAX_STEPS})" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("left", ["nothing", "final", "staged final and summary"])
def test_killed_while_final_or_summary_was_written_resume_hands_over(config, reference, tmp_path, left):
    """13.1: the resumed run trains no step past the end; final/ is the uninterrupted run's."""
    out = killed_at_the_end(reference, tmp_path / "run")
    if left == "final":
        shutil.copytree(reference / "final", out / "final")
    elif left == "staged final and summary":
        shutil.copytree(reference / "final", out / ".partial-final")
        (out / ".partial-summary.json").write_text('{"target_loss": nu')
    assert train(config, out, "--resume") == 0
    assert train_steps(out) == list(range(1, MAX_STEPS + 1))
    assert same_metrics(out, reference)
    assert_same_weights(out / "final", reference / "final")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == MAX_STEPS and summary["final_model"] == str(out / "final")
    assert not list(out.glob(".partial-*"))


def scheduled_eval_losses(monkeypatch, losses: dict[int, float]) -> None:
    """Make the validation loss at step s losses[s] (the last one given for later steps)."""
    original = DirtuneTrainer.evaluation_loop

    def loop(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        key = f"{kwargs.get('metric_key_prefix', 'eval')}_loss"
        if key == "eval_valid_loss":
            step = self.state.global_step
            output.metrics[key] = losses[max(s for s in losses if s <= step)]
        return output

    monkeypatch.setattr(DirtuneTrainer, "evaluation_loop", loop)


def interrupt_at(monkeypatch, step: int) -> None:
    """Stop the run at `step` as SIGTERM does (checkpoint, no summary, exit 130)."""
    from dirtune.train.callbacks import FaultGuard

    original = FaultGuard.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step and self.interrupted is None:
            self.interrupted = "SIGTERM"
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(FaultGuard, "on_step_end", on_step_end)


@pytest.mark.parametrize("how", ["spelled absolute", "moved"])
def test_the_best_checkpoint_survives_a_resume_from_another_spelling(config, task_files, tmp_path, monkeypatch,
                                                                     capsys, how):
    """13.2: resumed as /abs/run after run/, or after moving the folder, rotation deleted the best
    checkpoint, summary.json named a folder that was gone, final/ held the last weights."""
    scheduled_eval_losses(monkeypatch, {0: 9.0, 2: 1.0, 4: 2.0})  # best at step 2, then worse
    valid = [f"data.valid_file={task_files['task_valid']}", "data.max_eval_samples=2", "train.max_steps=12",
             "train.eval_every=2", "train.save_every=2", "train.save_total_limit=1"]
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:
        interrupt_at(m, 6)
        assert main(["train", str(config), "train.output_dir=run", *valid]) == 130
    assert sorted(p.name for p in checkpoints.checkpoint_folders(tmp_path / "run")) == ["checkpoint-2", "checkpoint-6"]
    out = tmp_path / "run"
    if how == "moved":
        out = tmp_path / "moved"
        os.rename(tmp_path / "run", out)
    assert main(["train", str(config), f"train.output_dir={out}", *valid, "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == 2 and summary["best_checkpoint"] == str(out / "checkpoint-2")
    assert sorted(p.name for p in checkpoints.checkpoint_folders(out)) == ["checkpoint-12", "checkpoint-2"]
    assert_same_weights(out / "final", out / "checkpoint-2")


def test_a_run_that_reached_its_target_is_handed_over_not_trained_on(config, task_files, tmp_path, monkeypatch):
    """13.1 with train.target_loss: the run had stopped early; the resumed one must not go on."""
    scheduled_eval_losses(monkeypatch, {0: 9.0, 2: 5.0, 6: 1.0})
    valid = [f"data.valid_file={task_files['task_valid']}", "data.max_eval_samples=2", "train.eval_every=2",
             "train.save_every=2", "train.target_loss=1.5"]
    reference = tmp_path / "reference"
    assert train(config, reference, *valid) == 0
    out = killed_at_the_end(reference, tmp_path / "run")
    assert train(config, out, *valid, "--resume") == 0
    for name in ("target_step", "best_step", "final_step", "stopped_early", "best_eval_loss"):
        assert json.loads((out / "summary.json").read_text())[name] == \
            json.loads((reference / "summary.json").read_text())[name], name
    assert max(train_steps(out)) == 6
    assert_same_weights(out / "final", reference / "final")


@pytest.mark.parametrize("damage", ["rng state missing", "bytes changed"])
def test_a_checkpoint_damaged_in_place_is_skipped_and_the_run_stays_exact(config, reference, tmp_path, capsys,
                                                                          damage):
    """13.3: without rng_state.pth it resumed silently with other dropout masks. 13.4: 64 bytes of
    0xff in the tensor data resumed, and the run stopped later on a NaN."""
    out = killed_at_the_end(reference, tmp_path / "run")
    newest = out / f"checkpoint-{MAX_STEPS}"
    if damage == "rng state missing":
        (newest / "rng_state.pth").unlink()
        expected = "no rng_state.pth (the random state"
    else:
        weights = newest / ADAPTER
        with open(weights, "r+b") as f:
            f.seek(weights.stat().st_size // 2)
            f.write(b"\xff" * 64)
        expected = f"{ADAPTER} does not match its checksum"
    assert train(config, out, "--resume") == 0
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is incomplete or corrupt: {expected}" in err
    assert (out / f"corrupt-checkpoint-{MAX_STEPS}").is_dir()
    assert_same_weights(out / "final", reference / "final")
    assert same_metrics(out, reference)


def test_a_full_disk_while_optimizer_pt_is_written_is_one_line(config, tmp_path, monkeypatch, capsys):
    """13.5: exit 1 and a traceback ending in RuntimeError: [enforce fail at inline_container.cc:672]."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and "checkpoint-8" in str(f):
            real_save(obj, f, *args, **kwargs)
            os.truncate(f, os.path.getsize(f) // 2)
            try:  # how torch.save reported it on a full 20 MB tmpfs
                raise RuntimeError("basic_ios::clear: iostream error")
            except RuntimeError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8448 vs 8342")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert train(config, out) == 2
    err = capsys.readouterr().err
    assert f"dirtune train: error: step 8: could not write the checkpoint into {out} (" in err
    assert "Traceback" not in err and "enforce fail" not in err
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-4"]
    assert not list(out.glob(".partial-*"))


def test_nan_evaluations_stop_a_skipping_run_instead_of_ending_in_a_lie(config, task_files, tmp_path, monkeypatch,
                                                                          capsys):
    """13.6: with every evaluation after step 0 NaN, nan_policy=skip finished, summary.json gave the
    step-0 loss as final_eval_loss, and final/ held weights of about 1e30."""
    scheduled_eval_losses(monkeypatch, {0: 5.0, 2: 4.0, 4: float("nan")})
    out = tmp_path / "run"
    assert train(config, out, "train.nan_policy=skip", f"data.valid_file={task_files['task_valid']}",
                 "data.max_eval_samples=2", "train.eval_every=2", "train.save_every=2") == 2
    err = capsys.readouterr().err
    assert "dirtune train: error: step 4: the evaluation gives NaN or Inf (valid_loss)" in err
    assert not (out / "summary.json").exists() and not (out / "final").exists()
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-2"]


def test_skipping_stops_when_every_step_is_nan(config, tmp_path, monkeypatch, capsys):
    """13.6 without validation: weights that give NaN at every step; skipping them all 'finished'."""
    original = DirtuneTrainer.compute_loss

    def broken_from_step_3(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step >= 2:
            loss = loss * float("nan")
            self.last_loss = loss.detach()
        return loss

    monkeypatch.setattr(DirtuneTrainer, "compute_loss", broken_from_step_3)
    out = tmp_path / "run"
    assert train(config, out, "train.nan_policy=skip") == 2
    err = capsys.readouterr().err
    assert "dirtune train: error: step 12: the loss was NaN or Inf at 10 steps in a row" in err
    assert not (out / "summary.json").exists()


def test_a_second_process_on_a_live_run_folder_is_refused(config, reference, tmp_path, capsys):
    """13.7: both trained into one folder; --overwrite or --resume beside a live run crashed."""
    out, log = tmp_path / "run", tmp_path / "child.log"
    child = start_child(config, out, log)
    try:
        wait_for_checkpoint(child, out / "checkpoint-8", log)
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert train(config, out, *extra) == 2
            err = capsys.readouterr().err
            assert f"train.output_dir: {out} is in use by another dirtune run (pid {child.pid})" in err, err
        assert child.wait(timeout=300) == 0, log.read_text()
    finally:
        child.kill()
    assert_same_weights(out / "final", reference / "final")
    assert same_metrics(out, reference)
    assert not (out / ".dirtune.lock").exists()


def test_a_torn_last_metrics_line_resumes(config, reference, tmp_path, capsys):
    """13.8: --resume exited 1 with a JSONDecodeError traceback."""
    out = killed_at_the_end(reference, tmp_path / "run")
    shutil.rmtree(out / f"checkpoint-{MAX_STEPS}")  # killed while logging the step after checkpoint-20
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:21]) + lines[21][:17])
    assert train(config, out, "--resume") == 0
    assert "dropped 1 unreadable line(s) (22)" in capsys.readouterr().err
    assert same_metrics(out, reference)
    assert_same_weights(out / "final", reference / "final")


def test_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(config, reference, tmp_path, monkeypatch,
                                                                    capsys):
    """13.9: --overwrite deleted the old run before the new one was known to start."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with monkeypatch.context() as m:
        poison_loss(m, at_step=2)  # fails before its first checkpoint (step 4)
        assert train(config, out, "train.seed=5", "--overwrite") == 2
    assert "back in place" in capsys.readouterr().err
    assert snapshot(out) == before  # byte for byte, the lock file gone too
    poison_loss(monkeypatch, at_step=7)  # after its first checkpoint: the old run is gone by then
    assert train(config, out, "train.seed=5", "--overwrite") == 2
    assert not (out / ".previous-run").exists() and not (out / "summary.json").exists()
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-4"] and (out / "notes.txt").is_file()
