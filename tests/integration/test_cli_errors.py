"""Bad input through `dirtune train`: each case exits 2 with one message naming the file and line,
key or value and what is accepted, no traceback, and the run already in the output folder is
left byte for byte as it was, even under --overwrite or --resume (inputs are checked before the
folder is touched)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dirtune.cli import main


@pytest.fixture
def good_yaml(tiny_checkpoint, task_files, tmp_path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(f"""\
model: {{path: {tiny_checkpoint}}}
finetune: {{type: lora, lora_r: 2}}
data: {{train_file: {task_files['task_train']}, valid_ratio: 0, max_length: 128}}
train: {{max_steps: 2, batch_size: 2, progress: false, report_to: [none], device: cpu, drift_every: 0}}
""")
    return path


@pytest.fixture
def old_run(tmp_path) -> Path:
    """An output folder holding a finished run (a resumable checkpoint-4 among it) and a note."""
    out = tmp_path / "out"
    ckpt = out / "checkpoint-4"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.ones(2, 2)}, str(ckpt / "adapter_model.safetensors"))
    torch.save({"state": {}}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": 4}, ckpt / "scheduler.pt")
    torch.save({"python": 1}, ckpt / "rng_state.pth")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (out / "final").mkdir()
    shutil.copy(ckpt / "adapter_model.safetensors", out / "final")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 1.0}) + "\n"
                                               for s in range(1, 9)))
    (out / "summary.json").write_text('{"final_step": 8}')
    (out / "config.yaml").write_text("train: {}\n")
    (out / "notes.txt").write_text("my notes")
    return out


def unfinished(run: Path) -> None:
    """The run killed before its end: a run to resume (a finished one is refused at once)."""
    (run / "summary.json").unlink()
    shutil.rmtree(run / "final")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (names and contents), to compare before and after."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


GOOD = '{"instruction": "Name a colour.", "input": "", "output": "Blue."}\n'


def bigger_tokenizer(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tok.add_tokens(["<extra1>", "<extra2>", "<extra3>"])
    tok.save_pretrained(tmp_path / "big-tok")
    return tmp_path / "big-tok"


def weightless_model(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for p in tiny_checkpoint.iterdir():
        if not p.name.endswith(".safetensors"):
            shutil.copy(p, folder)
    return folder


BAD_JSONL = GOOD * 2 + '{"instruction": "x", \n'
BAD_JSON = "[" + GOOD + ",\n{]"
MISSING_OUTPUT = GOOD + '{"instruction": "Hi"}\n'
NOT_UTF8 = GOOD.encode() + b'{"instruction": "caf\xe9"}'


def data(name: str, content: bytes | str):
    return lambda t, c: ["data.train_file=" + str(write(t, name, content))]


# (id, overrides built from (tmp_path, tiny_checkpoint), expected words in the message);
# `{tmp}` in the expected text stands for the test's tmp_path.
CASES = [
    ("jsonl not json", data("bad.jsonl", BAD_JSONL), "{tmp}/bad.jsonl: line 3: not valid JSON"),
    ("json array not json", data("bad.json", BAD_JSON), "{tmp}/bad.json: line 3: not valid JSON: Expecting property name"),
    ("missing field", data("miss.jsonl", MISSING_OUTPUT),
     "{tmp}/miss.jsonl: line 2: missing field 'output' (alpaca records need instruction, output; input optional)"),
    ("empty file", data("empty.jsonl", ""), "{tmp}/empty.jsonl: empty, no records"),
    ("not utf-8", data("latin.jsonl", NOT_UTF8), "{tmp}/latin.jsonl: line 2: not UTF-8 text (byte 0xe9 at column 21)"),
    ("missing data file", lambda t, c: [f"data.train_file={t / 'nowhere.jsonl'}"], "{tmp}/nowhere.jsonl: not found"),
    ("overlong rejected", lambda t, c: ["data.max_length=40", "data.overlong=reject"],
     "examples are longer than data.max_length=40 tokens (lines 1, 2, 3"),
    ("unknown key", lambda t, c: ["train.max_step=5"],
     "unknown key 'train.max_step' (did you mean 'max_steps'?); accepted: output_dir"),
    ("wrong type", lambda t, c: ["train.batch_size=eight"], "train.batch_size: 'eight' is not valid; expected int"),
    ("bad choice", lambda t, c: ["finetune.type=qlora"], "finetune.type: 'qlora' is not valid; expected 'lora' | 'full'"),
    ("missing model folder", lambda t, c: [f"model.path={t / 'no-model'}"], "{tmp}/no-model: model folder not found"),
    ("model without weights", lambda t, c: [f"model.path={weightless_model(c, t)}"],
     "{tmp}/no-weights: no model weights"),
    ("tokenizer does not match", lambda t, c: [f"model.tokenizer={bigger_tokenizer(c, t)}"],
     "the tokenizer has 103 tokens but the model's embedding has 100 rows; use the tokenizer the model was trained with"),
    ("lora targets match nothing", lambda t, c: ["finetune.lora_targets=[q_proj,attn_proj]"],
     "finetune.lora_targets: attn_proj match no linear module; the model's linear modules are"),
    # issue 13.9: these passed the checks and failed after --overwrite had deleted the old run
    ("save_every off the evaluations", lambda t, c: ["data.valid_ratio=0.1", "train.save_every=3", "train.eval_every=2"],
     "command line: train.save_every: 3 is not a multiple of train.eval_every=2"),
    ("num_workers negative", lambda t, c: ["train.num_workers=-1"], "train.num_workers: -1 is not valid"),
    ("lr infinite", lambda t, c: ["optimizer.lr=inf"], "optimizer.lr: inf is not valid; expected a finite number"),
    ("seed negative", lambda t, c: ["train.seed=-1"], "train.seed: -1 is not valid; expected an integer in [0, 2**32)"),
    # issue 13.10: accepted without a word
    ("all fields empty", data("blank.jsonl", GOOD + '{"instruction": "", "input": "", "output": ""}\n'),
     "{tmp}/blank.jsonl: line 2: all its fields (instruction, input, output) are empty"),
    ("eps zero", lambda t, c: ["optimizer.eps=0"], "optimizer.eps: 0.0 is not valid; expected a number > 0"),
]
if not torch.cuda.is_available():
    CASES.append(("cuda without a GPU", lambda t, c: ["train.device=cuda"],
                  "train.device: 'cuda', but this process sees no CUDA GPU"))


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, expected: str) -> None:
    assert code == 2
    # progress bars end their lines with \r
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("dirtune train: error: ")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("mode", ["--overwrite", "--resume"])
@pytest.mark.parametrize("case, overrides, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_and_touches_nothing(good_yaml, old_run, tiny_checkpoint, tmp_path, capsys,
                                                     case, overrides, expected, mode):
    if mode == "--resume":
        unfinished(old_run)
    before = snapshot(old_run)
    code, err = run(["train", str(good_yaml), f"train.output_dir={old_run}", *overrides(tmp_path, tiny_checkpoint),
                     mode], capsys)
    assert_clean_failure(code, err, expected.replace("{tmp}", str(tmp_path)))
    assert snapshot(old_run) == before


def test_output_folder_holding_a_run_is_refused(good_yaml, old_run, capsys):
    before = snapshot(old_run)
    code, err = run(["train", str(good_yaml), f"train.output_dir={old_run}"], capsys)
    assert_clean_failure(code, err, f"train.output_dir: {old_run} already holds a run; choose another folder, "
                                    "resume it (train.resume=auto) or replace it (train.overwrite=true)")
    assert snapshot(old_run) == before


def test_damaged_checkpoint_named_for_resume_is_refused(good_yaml, old_run, capsys):
    unfinished(old_run)
    ckpt = old_run / "checkpoint-4"
    (ckpt / "optimizer.pt").write_bytes(b"")
    before = snapshot(old_run)
    code, err = run(["train", str(good_yaml), f"train.output_dir={old_run}", f"--resume={ckpt}"], capsys)
    assert_clean_failure(code, err, f"train.resume: {ckpt} cannot be resumed: optimizer.pt is empty")
    assert snapshot(old_run) == before


@pytest.mark.parametrize("content, expected", [
    (None, "config file not found"),
    ("train:\n  seed: [1\n", "line 3 is not valid YAML"),
    ("train: {output_dir: x}\ntrian: {}\n", "unknown key 'trian' (did you mean 'train'?)"),
])
def test_bad_config_file(tmp_path, capsys, content, expected):
    path = tmp_path / "c.yaml" if content is None else write(tmp_path, "c.yaml", content)
    code, err = run(["train", str(path)], capsys)
    assert_clean_failure(code, err, f"{path}: ")
    assert expected in err


def test_the_installed_command_exits_2_without_a_traceback(good_yaml, old_run, tmp_path):
    """The same through a real process: the exit status a shell or a scheduler sees."""
    before = snapshot(old_run)
    bad = write(tmp_path, "bad.jsonl", GOOD + "{oops}\n")
    proc = subprocess.run([sys.executable, "-m", "dirtune.cli", "train", str(good_yaml), f"train.output_dir={old_run}",
                           f"data.train_file={bad}", "--overwrite"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert f"dirtune train: error: {bad}: line 2: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert snapshot(old_run) == before


@pytest.mark.parametrize("where, expected", [
    (lambda t: t / "afile" / "run", "train.output_dir: {tmp}/afile/run cannot be created: {tmp}/afile is a file"),
    (lambda t: Path("/proc/dirtune-run"), "train.output_dir: /proc/dirtune-run cannot be created in /proc ("),
], ids=["under a file", "under /proc"])
def test_an_output_folder_that_cannot_be_made_is_one_line(good_yaml, tmp_path, capsys, where, expected):
    """issue 13.12: a NotADirectoryError traceback, or a bare '[Errno 2]' naming no key."""
    (tmp_path / "afile").write_text("x")
    code, err = run(["train", str(good_yaml), f"train.output_dir={where(tmp_path)}"], capsys)
    assert_clean_failure(code, err, expected.replace("{tmp}", str(tmp_path)))


def test_dry_run_checks_that_the_data_files_exist(good_yaml, tmp_path, capsys):
    """issue 13.12: --dry-run passed with a train_file that does not exist."""
    code, err = run(["train", str(good_yaml), f"data.train_file={tmp_path / 'nowhere.jsonl'}", "--dry-run"], capsys)
    assert_clean_failure(code, err, f"data.train_file: {tmp_path / 'nowhere.jsonl'}: not found")
    code, err = run(["train", str(good_yaml), f"data.valid_file={tmp_path}", "--dry-run"], capsys)
    assert_clean_failure(code, err, f"data.valid_file: {tmp_path}: is a directory")


def test_a_bad_value_on_the_command_line_is_blamed_on_the_command_line(good_yaml, capsys):
    """issue 13.12: it was blamed on the YAML file."""
    code, err = run(["train", str(good_yaml), "train.batch_size=eight"], capsys)
    assert_clean_failure(code, err, "dirtune train: error: command line: train.batch_size: 'eight' is not valid")


def test_a_full_disk_outside_a_checkpoint_is_one_line(good_yaml, tmp_path, capsys, monkeypatch):
    """A write the checkpoint code does not own (here the metrics log) fails on a full disk."""
    import errno

    from dirtune.train import run_folder

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(run_folder.MetricsLog, "write", full)
    out = tmp_path / "out"
    code, err = run(["train", str(good_yaml), f"train.output_dir={out}"], capsys)
    assert_clean_failure(code, err, f"dirtune train: error: {out / 'metrics.jsonl'}: No space left on device")
