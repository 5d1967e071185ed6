"""run_folder.py without training: one process per run folder (the lock), a run replaced by
--overwrite kept until its successor's first checkpoint, a finished run never resumed, output
folders that cannot be made, and metrics.jsonl with a line torn by a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fake_checkpoint import make_checkpoint, truncate

from dirtune.train import run_folder
from dirtune.train.config import ConfigError, load_config
from dirtune.train.run_folder import MetricsLog, read_metrics

# A second process that takes the folder's lock, says so, and holds it until killed.
HOLDER = """
import sys, time
from pathlib import Path
from dirtune.train import run_folder
run_folder.lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture(autouse=True)
def released():
    yield
    run_folder.release()


def cfg(out: Path, *extra: str):
    return load_config(None, [f"train.output_dir={out}", *extra])


def finished_run(out: Path) -> Path:
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    (out / "final").mkdir()
    (out / "final" / "adapter_model.safetensors").write_bytes(b"weights")
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    (out / "summary.json").write_text('{"final_step": 4}')
    (out / "config.yaml").write_text("old: config\n")
    (out / "notes.txt").write_text("mine")
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock."""
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(run_folder.__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc
    proc.kill()
    proc.wait()


def test_a_folder_in_use_by_another_process_is_refused_naming_it(holder):
    """issue 13.7: a second run, an --overwrite or a --resume beside a live run."""
    out, proc = holder
    for extra in ([], ["train.overwrite=true"], ["train.resume=auto"]):
        with pytest.raises(ConfigError, match=rf"^train.output_dir: {out} is in use by another dirtune run "
                                              rf"\(pid {proc.pid}\); wait for it to end"):
            run_folder.resolve(cfg(out, *extra))
    with pytest.raises(ConfigError, match="is in use by another dirtune run"):
        run_folder.claim(out, None)  # a folder created between resolve() and claim() by another run


def test_the_lock_dies_with_its_process_even_by_kill_9(holder):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_folder.resolve(cfg(out))  # no stale lock
    assert (out / ".dirtune.lock").read_text() == f"{os.getpid()}\n"
    run_folder.release()
    assert not (out / ".dirtune.lock").exists()


def test_the_lock_is_taken_before_the_folder_is_read(holder, capsys):
    """A live run's half-written checkpoint is not judged (and reported as damaged) by the second."""
    out, _ = holder
    (out / "checkpoint-4").mkdir()
    with pytest.raises(ConfigError, match="in use"):
        run_folder.resolve(cfg(out, "train.resume=auto"))
    assert "incomplete or corrupt" not in capsys.readouterr().err


def test_a_finished_run_is_not_resumed_even_with_overwrite(tmp_path):
    """issue 13.1: resuming a finished run trained a step past its end and rewrote final/."""
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    for extra in (["train.resume=auto"], ["train.resume=auto", "train.overwrite=true"],
                  [f"train.resume={out / 'checkpoint-4'}"]):
        with pytest.raises(ConfigError, match=rf"^train.resume: {out} holds a finished run \(summary.json, step 4\); "
                                              "there is nothing to resume"):
            run_folder.resolve(cfg(out, *extra))
        run_folder.release()
    assert snapshot(out) == before


def test_overwrite_sets_the_old_run_aside_and_puts_it_back_if_the_new_one_fails(tmp_path):
    """issue 13.9: the old run is kept until the new one has written its first checkpoint."""
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    resolved, ckpt = run_folder.resolve(cfg(out, "train.overwrite=true"))
    run_folder.claim(resolved, ckpt)
    assert sorted(p.name for p in out.iterdir()) == [".dirtune.lock", ".previous-run", "notes.txt"]
    (out / "metrics.jsonl").write_text("new\n")  # the new run starts writing, then fails
    (out / "config.yaml").write_text("new: config\n")
    (out / "tb").mkdir()
    run_folder.restore_if_failed()
    run_folder.release()
    assert snapshot(out) == before and not (out / ".previous-run").exists()


def test_a_replacement_killed_before_its_first_checkpoint_is_undone_at_the_next_start(tmp_path, capsys):
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    run_folder.claim(*run_folder.resolve(cfg(out, "train.overwrite=true")))
    (out / "metrics.jsonl").write_text("new\n")
    run_folder.release()  # as kill -9 would: the aside folder stays
    with pytest.raises(ConfigError, match="holds a finished run"):
        run_folder.resolve(cfg(out, "train.resume=auto"))
    assert "put back the run that --overwrite was replacing" in capsys.readouterr().err
    run_folder.release()
    assert snapshot(out) == before


def test_a_kill_while_the_old_run_was_being_set_aside_is_undone(tmp_path, monkeypatch):
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    moves = []

    def replace(src, dst):
        if len(moves) == 3:
            raise KeyboardInterrupt  # stands for kill -9 after three of the items were moved
        moves.append(src)
        os.rename(src, dst)

    monkeypatch.setattr(run_folder.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        run_folder.claim(*run_folder.resolve(cfg(out, "train.overwrite=true")))
    monkeypatch.undo()
    run_folder.release()
    assert (out / "checkpoint-4").is_dir() and (out / ".previous-run").is_dir()  # half moved
    with pytest.raises(ConfigError, match="holds a finished run"):
        run_folder.resolve(cfg(out, "train.resume=auto"))
    run_folder.release()
    assert snapshot(out) == before


def test_after_the_first_checkpoint_the_old_run_goes(tmp_path):
    out = finished_run(tmp_path / "run")
    run_folder.claim(*run_folder.resolve(cfg(out, "train.overwrite=true")))
    (out / "checkpoint-2").mkdir()  # the new run's first checkpoint (the trainer removes the aside run)
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    run_folder.restore_if_failed()
    assert (out / ".previous-run").is_dir() and not (out / "summary.json").exists()  # not restored
    run_folder.release()
    run_folder.claim(out, out / "checkpoint-2")  # the next start clears what a kill left
    assert not (out / ".previous-run").exists()


@pytest.mark.parametrize("where, message", [
    (lambda t: t / "afile" / "run", "{t}/afile/run cannot be created: {t}/afile is a file, not a folder"),
    (lambda t: t / "afile", "{t}/afile is a file, not a folder"),
    (lambda t: Path("/proc/dirtune-run"), "/proc/dirtune-run cannot be created in /proc ("),
])
def test_an_output_folder_that_cannot_be_made_is_named_before_anything_loads(tmp_path, where, message):
    """issue 13.12: a NotADirectoryError traceback, or a bare '[Errno 2]' naming no key."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="^train.output_dir: " + message.replace("{t}", str(tmp_path))
                       .replace("(", r"\(")):
        run_folder.resolve(cfg(where(tmp_path)))


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    """issue 13.8: a kill mid-write left half a line; --resume stopped on a JSONDecodeError."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + '{"kind": "train", "st')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    MetricsLog(path, resume_step=2)
    assert path.read_text() == "\n".join(lines[:2]) + "\n"  # lines kept byte for byte
    assert "dropped 1 unreadable line(s) (4)" in capsys.readouterr().err
    assert not list(tmp_path.glob(".partial-*"))


def test_train_and_eval_records_carry_a_time_that_increases_and_resumes_from_the_checkpoint(tmp_path, monkeypatch):
    now = [100.0]

    def monotonic():  # a clock that moves 0.25 s each time it is read
        now[0] += 0.25
        return now[0]

    monkeypatch.setattr(run_folder.time, "monotonic", monotonic)
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for record in ({"kind": "train", "step": 1, "loss": 2.0}, {"kind": "event", "step": 1, "event": "x"},
                   {"kind": "eval", "step": 2, "eval_loss": 1.5}, {"kind": "train", "step": 2, "loss": 1.0}):
        log.write(record)
    records = read_metrics(path)
    assert [r.get("time") for r in records] == [0.25, None, 0.5, 0.75]  # events are not timed
    # resumed from step 1: the clock continues from the last kept line, not from 0
    MetricsLog(path, resume_step=1).write({"kind": "train", "step": 2, "loss": 1.0})
    times = [r["time"] for r in read_metrics(path) if "time" in r]
    assert times == [0.25, 0.5] and times == sorted(set(times))
    # a log written before records were timed: the resumed run counts from 0
    path.write_text(json.dumps({"kind": "train", "step": 1, "loss": 2.0}) + "\n")
    MetricsLog(path, resume_step=1).write({"kind": "train", "step": 2, "loss": 1.0})
    assert [r.get("time") for r in read_metrics(path)] == [None, 0.25]


def test_summary_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text('{"old": 1}')

    def killed(*args):
        raise KeyboardInterrupt  # stands for a kill between the write and the rename

    monkeypatch.setattr(run_folder.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_folder.write_json_atomically(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    monkeypatch.undo()
    run_folder.write_json_atomically(path, {"new": 2})
    assert json.loads(path.read_text()) == {"new": 2} and not list(tmp_path.glob(".partial-*"))


def test_resolve_auto_falls_back_and_claim_sets_the_damaged_one_aside(tmp_path, capsys):
    out = tmp_path / "run"
    for step in (5, 10):
        make_checkpoint(out / f"checkpoint-{step}", step)
    (out / "metrics.jsonl").write_text("")
    truncate(out / "checkpoint-10" / "model.safetensors")
    resolved, ckpt = run_folder.resolve(cfg(out, "train.resume=auto"))
    assert (resolved, ckpt) == (out, out / "checkpoint-5")
    assert "checkpoint-10 is incomplete or corrupt" in capsys.readouterr().err
    assert (out / "checkpoint-10").is_dir()  # resolve() writes nothing
    run_folder.claim(out, ckpt)
    assert (out / "corrupt-checkpoint-10").is_dir() and not (out / "checkpoint-10").exists()


def test_resolve_refuses_a_damaged_named_checkpoint_and_points_at_a_good_one(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-5", 5)
    make_checkpoint(tmp_path / "checkpoint-10", 10)
    (tmp_path / "checkpoint-10" / "scheduler.pt").unlink()
    with pytest.raises(ConfigError, match=r"train.resume: .*checkpoint-10 cannot be resumed: no scheduler.pt; "
                                          r"the newest complete checkpoint beside it is .*checkpoint-5"):
        run_folder.resolve(cfg(tmp_path / "out", f"train.resume={tmp_path / 'checkpoint-10'}"))


def test_resolve_auto_with_only_damaged_checkpoints_refuses(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-5", 5)
    truncate(tmp_path / "checkpoint-5" / "optimizer.pt")
    with pytest.raises(ConfigError, match="no complete checkpoint to resume from"):
        run_folder.resolve(cfg(tmp_path, "train.resume=auto"))


def test_resolve_refuses_a_used_folder_and_writes_nothing(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_folder.resolve(cfg(tmp_path))
    resolved, ckpt = run_folder.resolve(cfg(tmp_path, "train.overwrite=true"))
    assert ckpt is None and (tmp_path / "summary.json").read_text() == "{}"  # cleared only by claim()
    make_checkpoint(tmp_path / "checkpoint-5", 5)
    (tmp_path / "final").mkdir()
    run_folder.claim(resolved, None)
    # the old run is set aside whole (not deleted) until the new one writes its first checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dirtune.lock", ".previous-run"]
    assert sorted(p.name for p in (tmp_path / ".previous-run").iterdir()) == [".complete", "checkpoint-5", "final",
                                                                            "summary.json"]
