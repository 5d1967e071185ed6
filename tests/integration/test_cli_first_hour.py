"""A new user's first hour with the CLI: every command's --help, config errors without torch,
merge that never clobbers, no library chatter, the resume line, and messages that name what is
wrong rather than an internal function."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dirtune.cli import build_parser, main

SRC = Path(__file__).resolve().parents[2] / "src" / "dirtune"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


# ---------------------------------------------------------------- help

@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_argument_has_help_a_default_and_the_command_an_example(name):
    parser = subcommands()[name]
    text = parser.format_help()
    assert parser.description and "example:\n  dirtune " + name in text, text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{name} {action.dest}: no help text"
        shown = formatter._get_help_string(action)
        if action.option_strings:  # optional: its default must be said
            assert "default" in shown, f"{name} {action.option_strings[0]}: no default in {shown!r}"
        elif action.nargs in ("?", "*"):  # a positional that may be left out: what then
            assert "default" in shown, f"{name} {action.dest}: no default in {shown!r}"


def test_top_level_help_lists_every_command_with_an_example():
    text = build_parser().format_help()
    assert all(name in text for name in subcommands()) and "example:\n  dirtune demo" in text


# ---------------------------------------------------------------- startup

RUNNER = """
import sys
from dirtune.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # argparse's --help and usage errors
    code = e.code
heavy = sorted(m for m in ("torch", "transformers", "datasets", "peft", "accelerate") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["merge", "--help"], ["demo", "--help"]])
def test_help_imports_no_torch(args):
    proc = run_cli(*args)
    assert proc.returncode == 0 and "usage: dirtune" in proc.stdout
    assert "HEAVY=\n" in proc.stderr, proc.stderr


@pytest.mark.parametrize("setup, args, message", [
    (None, ["train", "missing.yaml"], "missing.yaml: config file not found"),
    (None, ["train", "."], ".: is a directory; expected a YAML config file"),
    ("train: {max_step: 3}\n", ["train", "c.yaml"], "unknown key 'train.max_step' (did you mean 'max_steps'?)"),
    ("{}\n", ["train", "c.yaml"], "model.path is not set; give the transformers checkpoint folder"),
    ("{}\n", ["train", "c.yaml", "model.path=nowhere"], "nowhere: model folder not found"),
    ("{}\n", ["train", "c.yaml", "model.path=.", "data.train_file=[a.json, gone.jsonl]"],
     "data.train_file: a.json: not found"),
    ("{}\n", ["train", "c.yaml", "model.path=.", "data.train_file=x.json", "data.columns={prompt: q}"],
     "data.columns: key 'prompt' is not known"),
    (None, ["bench", "missing.yaml"], "missing.yaml: bench file not found"),
])
def test_config_errors_come_before_torch_is_imported(tmp_path, setup, args, message):
    if setup is not None:
        (tmp_path / "c.yaml").write_text(setup)
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"dirtune {args[0]}: error: ") and message in lines[0], proc.stderr
    assert lines[1] == "HEAVY=", "torch or transformers was imported before the config error"


# ---------------------------------------------------------------- merge

@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny checkpoint, B made non-zero so that merging changes the weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_checkpoint),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if line.startswith(f"dirtune {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_merge_refuses_an_existing_folder_without_overwrite(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["merge", str(adapter), str(out)]) == 2
    assert f"{out}: already exists; choose another folder, or pass --overwrite" in error_line(capsys, "merge")
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_merge_overwrite_replaces_the_folder_once_the_merge_succeeded(adapter, tmp_path, capsys, monkeypatch):
    import dirtune.models.lora as lora

    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def broken(model):  # the merge fails after the model has loaded
        merged = model.merge_and_unload()

        def save_pretrained(path, **kw):
            Path(path).mkdir(parents=True)
            (Path(path) / "half-written").write_text("x")
            raise OSError(28, "No space left on device")
        merged.save_pretrained = save_pretrained
        return merged

    monkeypatch.setattr(lora, "merge_lora", broken)
    # a full disk is the machine's state: one line, exit 2 (cli.main), and OUT as it was
    assert main(["merge", str(adapter), str(out), "--overwrite"]) == 2
    assert "No space left on device" in error_line(capsys, "merge")
    assert snapshot(out) == {"notes.txt": b"mine"}  # untouched, and no partial folder left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    monkeypatch.undo()
    assert main(["merge", str(adapter), str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("what, expected", [
    ("full", "{p}: a full model, not a LoRA adapter (no adapter_config.json); merge folds an adapter"),
    ("run", "{p}: is a run folder, not a model; its trained model is {p}/final"),
    ("self", "{p}: is the adapter folder itself"),
])
def test_merge_says_what_is_wrong_with_its_input(adapter, tiny_checkpoint, tmp_path, capsys, what, expected):
    if what == "full":
        p, out = tiny_checkpoint, tmp_path / "m"
    elif what == "run":
        p = tmp_path / "run"
        (p / "final").mkdir(parents=True)
        (p / "metrics.jsonl").write_text("")
        out = tmp_path / "m"
    else:
        p = out = adapter
    assert main(["merge", str(p), str(out)]) == 2
    line = error_line(capsys, "merge")
    assert expected.format(p=p) in line and "merge_lora" not in line


# ---------------------------------------------------------------- output

def test_commands_print_no_future_warnings_or_loading_bars(adapter, task_files, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    for args in (["eval", str(adapter), str(task_files["task_valid"]), "--max-length", "64"],
                 ["merge", str(adapter), str(tmp_path / "merged")]):
        proc = subprocess.run([sys.executable, "-m", "dirtune.cli", *args], capture_output=True, text=True,
                              timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "Warning" not in proc.stderr and "Loading weights" not in proc.stderr, proc.stderr
        assert "Writing model shards" not in proc.stderr, proc.stderr


def test_resume_says_which_checkpoint(run_overrides, tmp_path, capsys, monkeypatch):
    import signal

    from dirtune.train.trainer import DirtuneTrainer

    args = ["train", str(tmp_path / "c.yaml"), *run_overrides(
        tmp_path / "run", "data.valid_ratio=0", "data.max_length=64", "train.batch_size=2", "train.save_every=2",
        "finetune.lora_r=2", "train.max_steps=4", valid=False)]
    (tmp_path / "c.yaml").write_text("{}\n")
    compute_loss = DirtuneTrainer.compute_loss

    def stop_in_step_3(self, model, inputs, *a, **kw):  # a scheduler's SIGTERM during step 3
        if model.training and self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return compute_loss(self, model, inputs, *a, **kw)

    monkeypatch.setattr(DirtuneTrainer, "compute_loss", stop_in_step_3)
    assert main(args) == 130  # step 3 finished and saved, then stopped
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from checkpoint-3 of {tmp_path / 'run'} (step 3)" in err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_step"] == 4


# ---------------------------------------------------------------- messages

USER_ERRORS = {"ConfigError", "DataError", "ModelError", "UsageError"}


def user_error_messages() -> list[tuple[str, int, str]]:
    """(file, line, leading literal text) of every user error raised in src/."""
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                    and getattr(node.exc.func, "id", None) in USER_ERRORS and node.exc.args):
                arg = node.exc.args[0]
                parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
                head = parts[0].value if parts and isinstance(parts[0], ast.Constant) else ""
                found.append((str(path.relative_to(SRC)), node.lineno, str(head)))
    return found


def test_no_user_error_message_starts_with_an_internal_function_name():
    names = {node.name for path in SRC.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    messages = user_error_messages()
    assert len(messages) > 50  # the walk finds them
    bad = [(f, line, head) for f, line, head in messages
           if head.split(":")[0].split("(")[0].strip() in names]
    assert not bad, bad
