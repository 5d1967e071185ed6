"""The run folder: one run at a time (a lock), refusing to clobber a finished run, the manifest,
and metrics.jsonl.

Layout of `train.output_dir`:
    config.yaml      the resolved config
    manifest.json    seed, library versions, data file hashes, git commit, command line
    metrics.jsonl    one JSON object per line: {"kind": "train"|"eval"|"event", "step": int, ...};
                     train and eval lines also carry "time" (seconds, see MetricsLog)
    summary.json     the run's outcome (written last: its presence means the run finished)
    loss.png         curves, rewritten at the end of every run
    tb/              TensorBoard events
    checkpoint-N/    transformers checkpoints (model or adapter, optimizer, scheduler, RNG, trainer state),
                     each written atomically (atomic_save.py)
    final/           the model the run hands over (the best checkpoint's if validated, else the last)
    .dirtune.lock    held (fcntl.flock) by the process writing the folder; removed when it ends
    .previous-run/   a run being replaced (--overwrite), until the new one writes its first checkpoint
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from dirtune.train import checkpoints
from dirtune.train.config import Config, ConfigError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one run per folder is then up to the user
    fcntl = None

RUN_MARKERS = ("metrics.jsonl", "summary.json")
LOCK_NAME = ".dirtune.lock"
# What a run writes (and --overwrite replaces); anything else in the folder is the user's.
RUN_ITEMS = (*RUN_MARKERS, "loss.png", "tb", "final", "config.yaml", "manifest.json")


def holds_run(out: Path) -> bool:
    return out.is_dir() and (any((out / m).exists() for m in RUN_MARKERS) or bool(list(out.glob("checkpoint-*"))))


def _run_items(out: Path) -> list[Path]:
    return [*(out / n for n in RUN_ITEMS if (out / n).exists()), *out.glob("checkpoint-*"),
            *out.glob(checkpoints.CORRUPT_PREFIX + "checkpoint-*")]


# ---------------------------------------------------------------- one process per run folder

_held: dict[Path, int] = {}  # folder (resolved) -> file descriptor of its lock, held by this process


def lock(out: Path) -> None:
    """Hold `out/.dirtune.lock` (exclusive, advisory, fcntl.flock) until `release()`.

    The OS drops the lock when the process ends, however it ends (kill -9 too), so it is never
    stale. ConfigError if another process holds it, naming that process.
    """
    key = out.resolve()
    if fcntl is None or key in _held:
        return
    path = out / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"train.output_dir: {out} cannot be written ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ConfigError(f"train.output_dir: {out}: cannot lock {LOCK_NAME} ({e.strerror})") from None
            raise ConfigError(f"train.output_dir: {out} is in use by another dirtune run (pid {holder}); "
                              "wait for it to end or stop it, or choose another folder") from None
        try:  # the holder before us may have removed the file between our open and flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def release() -> None:
    """Give back every run-folder lock this process holds (the lock files are removed)."""
    for key, fd in list(_held.items()):
        try:
            os.unlink(key / LOCK_NAME)  # before unlocking: a waiting process then retries on a new file
        except OSError:
            pass
        os.close(fd)
        del _held[key]


def _check_creatable(out: Path) -> None:
    """ConfigError unless `out`, which does not exist yet, can be made (tried with a temporary
    folder beside where it would go, removed at once)."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"train.output_dir: {out} cannot be created: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dirtune-probe-", dir=parent))
    except OSError as e:
        raise ConfigError(f"train.output_dir: {out} cannot be created in {parent} ({e.strerror})") from None


# ---------------------------------------------------------------- a run replaced by --overwrite

def _set_aside(out: Path) -> None:
    """Move the run in `out` into out/.previous-run (one rename per item: nothing is copied);
    a marker file says when all of it is there."""
    aside = out / checkpoints.PREVIOUS_RUN
    aside.mkdir()
    for item in _run_items(out):
        os.replace(item, aside / item.name)
    (aside / checkpoints.SET_ASIDE).write_text("")


def restore_replaced(out: Path) -> bool:
    """Put back the run `--overwrite` set aside, if the run replacing it wrote no checkpoint
    (it failed or was killed first): its own files go, the old ones return. True if restored.

    Killed while setting aside (no marker): the new run wrote nothing yet, so every item is
    either still in place or aside, and the aside ones are moved back.
    """
    aside = out / checkpoints.PREVIOUS_RUN
    if not aside.is_dir():
        return False
    complete = (aside / checkpoints.SET_ASIDE).exists()
    if complete:
        if checkpoints.checkpoint_folders(out):
            return False  # the new run has its first checkpoint: the old one is to go
        for item in [*_run_items(out), *out.glob(checkpoints.PARTIAL_PREFIX + "*"),
                     *out.glob(checkpoints.REPLACED_PREFIX + "*")]:
            checkpoints.remove_path(item)
        (aside / checkpoints.SET_ASIDE).unlink()
    for item in aside.iterdir():
        os.replace(item, out / item.name)
    aside.rmdir()
    return True


def restore_if_failed() -> None:
    """For the run that just failed: restore_replaced() in every folder this process holds."""
    for key in list(_held):
        if restore_replaced(key):
            print(f"dirtune: the run in {key} that --overwrite was replacing is back in place "
                  "(the new run stopped before its first checkpoint)", file=sys.stderr)


def resolve(cfg: Config) -> tuple[Path, Path | None]:
    """Check the output folder and choose the checkpoint to resume from (or None).

    Writes nothing of the run: it takes the folder's lock (an existing folder; a new one is
    locked by claim()), and puts back a run that an --overwrite killed before its first
    checkpoint was replacing. A folder that already holds a run is refused unless resuming or
    `train.overwrite` is set, so that nothing already written is lost by a typo in output_dir;
    a finished run (summary.json) is never resumed. `resume=auto` takes the newest complete
    checkpoint, skipping (with a warning) any that is truncated, corrupt or fails its checksums.
    """
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} is a file, not a folder")
    if out.is_dir():
        lock(out)  # first: a live run's folder is neither read nor changed
        if restore_replaced(out):
            print(f"dirtune: {out}: put back the run that --overwrite was replacing (the replacing run "
                  "was stopped before its first checkpoint)", file=sys.stderr)
    else:
        _check_creatable(out)
    resume = cfg.train.resume
    if resume and (out / "summary.json").is_file():
        raise ConfigError(f"train.resume: {out} holds a finished run ({_finished_at(out)}); there is nothing "
                          "to resume. To train it again use --overwrite (train.overwrite=true), or choose "
                          "another train.output_dir")
    if resume:
        if resume == "auto":
            ckpt = checkpoints.latest_good_checkpoint(out)
            if ckpt is None and holds_run(out) and not cfg.train.overwrite:
                raise ConfigError(f"train.resume=auto: {out} holds a run but no complete checkpoint to resume from; "
                                  "set train.overwrite=true to start again")
        else:
            ckpt = Path(resume)
            problem = checkpoints.checkpoint_problem(ckpt)
            if problem is not None:
                good = checkpoints.latest_good_checkpoint(ckpt.parent) if ckpt.parent.is_dir() else None
                hint = f"; the newest complete checkpoint beside it is {good}" if good else ""
                raise ConfigError(f"train.resume: {ckpt} cannot be resumed: {problem}{hint}")
        if ckpt is not None:
            return out, ckpt
    if holds_run(out) and not cfg.train.overwrite:
        raise ConfigError(f"train.output_dir: {out} already holds a run; choose another folder, "
                          "resume it (train.resume=auto) or replace it (train.overwrite=true)")
    return out, None


def _finished_at(out: Path) -> str:
    try:
        return f"summary.json, step {json.loads((out / 'summary.json').read_text())['final_step']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "summary.json"


def claim(out: Path, resume_ckpt: Path | None) -> None:
    """Make `out` ready to write, once the model and data have loaded: lock it, set a replaced
    run aside (resolve() allowed it; it is deleted at the new run's first checkpoint, restored if
    the new run fails before), or move aside damaged checkpoints newer than the resumed one."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.output_dir: {out} cannot be created ({e.strerror})") from None
    lock(out)
    checkpoints.remove_leftovers(out)
    if resume_ckpt is None and holds_run(out):
        _set_aside(out)
    elif resume_ckpt is not None and resume_ckpt.parent.resolve() == out.resolve():
        checkpoints.set_aside_corrupt(out, checkpoints.step_of(resume_ckpt))


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_state(package_only: bool = False) -> tuple[str, bool] | None:
    """(HEAD commit, whether tracked files have uncommitted changes) of the dirtune checkout, or
    None for an installed wheel. `package_only`: changes under src/dirtune alone count."""
    package = Path(__file__).resolve().parents[1]
    scope = ["--", "."] if package_only else []
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *scope], cwd=package,
                                capture_output=True, text=True, timeout=10)
        if status.returncode != 0:
            return None
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip(), status.stdout.strip() != ""


def git_commit() -> str:
    """The dirtune checkout's commit (with '+dirty' if modified), or 'unknown' for an installed wheel."""
    state = git_state()
    return "unknown" if state is None else state[0] + ("+dirty" if state[1] else "")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in ("dirtune", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = "absent"
    return found


def write_manifest(out: Path, cfg: Config, data_files: Iterable[Path], extra: dict | None = None) -> None:
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": cfg.train.seed,
        "command": sys.argv,
        "git_commit": git_commit(),
        "versions": versions(),
        "data_files": {str(p): sha256(Path(p)) for p in data_files},
        **(extra or {}),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    cfg.dump(out / "config.yaml")


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf; keep them visible as strings rather than crash or drop them.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json_atomically(path: Path, value: Any) -> None:
    """`path` holds the whole JSON or its old content, never a part (a kill mid-write leaves a
    .partial-* file, removed at the next start)."""
    staging = path.with_name(checkpoints.PARTIAL_PREFIX + path.name)
    with open(staging, "w") as f:
        f.write(json.dumps(value, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


class MetricsLog:
    """Append-only metrics.jsonl. On resume, lines past the checkpoint's step are dropped so that
    the file describes exactly one trajectory, and so is a last line torn by a kill mid-write.

    Train and eval records get "time": seconds (time.monotonic, 3 decimals) since the log was
    opened, just before the trainer is built, so that a run killed before summary.json still
    shows where its time went. A resumed run continues from the last time among the lines it
    keeps: the time spent on the steps past the checkpoint, which are redone, is not counted.
    """

    TIMED_KINDS = ("train", "eval")

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self._started = time.monotonic()
        self._time_before = 0.0  # the time a resumed run had reached at its checkpoint
        if resume_step is not None and path.exists():
            lines, bad = _parse_lines(path)
            if bad:
                print(f"dirtune: warning: {path}: dropped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:5]))}"
                      f"{', ...' if len(bad) > 5 else ''}), a write cut short by a kill", file=sys.stderr)
            kept = "".join(text + "\n" for text, r in lines if r.get("step", 0) <= resume_step)
            # rewritten whole or not at all: a kill here must not cost the lines before the checkpoint
            staging = path.with_name(checkpoints.PARTIAL_PREFIX + path.name)
            staging.write_text(kept)
            os.replace(staging, path)
            self._time_before = max((r["time"] for _, r in lines if r.get("step", 0) <= resume_step
                                     and isinstance(r.get("time"), (int, float))), default=0.0)
        elif resume_step is None:
            path.write_text("")
        self._eval_steps = {r["step"] for r in self.read() if r.get("kind") == "eval"}

    def write(self, record: dict) -> None:
        if record.get("kind") == "eval":
            if record["step"] in self._eval_steps:
                return
            self._eval_steps.add(record["step"])
        if record.get("kind") in self.TIMED_KINDS:
            record = {**record, "time": round(self._time_before + time.monotonic() - self._started, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def read(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that does not parse (torn by a kill) is left out."""
    if not Path(path).exists():
        return []
    return [record for _, record in _parse_lines(Path(path))[0]]


def _parse_lines(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """([(line, record)], numbers of the lines that are not a JSON object)."""
    found, bad = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            found.append((line, record))
        else:
            bad.append(n)
    return found, bad
