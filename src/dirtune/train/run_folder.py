"""The run folder: refusing to clobber a finished run, the manifest, and metrics.jsonl.

Layout of `train.output_dir`:
    config.yaml      the resolved config
    manifest.json    seed, library versions, data file hashes, git commit, command line
    metrics.jsonl    one JSON object per line: {"kind": "train"|"eval"|"event", "step": int, ...}
    summary.json     the run's outcome (written last: its presence means the run finished)
    loss.png         curves, rewritten at the end of every run
    tb/              TensorBoard events
    checkpoint-N/    transformers checkpoints (model or adapter, optimizer, scheduler, RNG, trainer state),
                     each written atomically (faults.py)
    final/           the model the run hands over (the best checkpoint's if validated, else the last)
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from dirtune.train import faults
from dirtune.train.config import Config, ConfigError

RUN_MARKERS = ("metrics.jsonl", "summary.json")


def holds_run(out: Path) -> bool:
    return out.is_dir() and (any((out / m).exists() for m in RUN_MARKERS) or bool(list(out.glob("checkpoint-*"))))


def resolve(cfg: Config) -> tuple[Path, Path | None]:
    """Check the output folder and choose the checkpoint to resume from (or None); write nothing.

    A folder that already holds a run is refused unless resuming or `train.overwrite` is set,
    so that nothing already written is lost by a typo in output_dir. `resume=auto` takes the
    newest complete checkpoint, skipping (with a warning) any that is truncated or corrupt.
    """
    out = Path(cfg.train.output_dir)
    resume = cfg.train.resume
    if resume:
        if resume == "auto":
            ckpt = faults.latest_good_checkpoint(out)
            if ckpt is None and holds_run(out) and not cfg.train.overwrite:
                raise ConfigError(f"train.resume=auto: {out} holds a run but no complete checkpoint to resume from; "
                                  "set train.overwrite=true to start again")
        else:
            ckpt = Path(resume)
            problem = faults.checkpoint_problem(ckpt)
            if problem is not None:
                good = faults.latest_good_checkpoint(ckpt.parent) if ckpt.parent.is_dir() else None
                hint = f"; the newest complete checkpoint beside it is {good}" if good else ""
                raise ConfigError(f"train.resume: {ckpt} cannot be resumed: {problem}{hint}")
        if ckpt is not None:
            return out, ckpt
    if holds_run(out) and not cfg.train.overwrite:
        raise ConfigError(f"train.output_dir: {out} already holds a run; choose another folder, "
                          "resume it (train.resume=auto) or replace it (train.overwrite=true)")
    return out, None


def claim(out: Path, resume_ckpt: Path | None) -> None:
    """Make `out` ready to write, once the model and data have loaded: clear a replaced run
    (resolve() allowed it), or move aside damaged checkpoints newer than the resumed one."""
    if resume_ckpt is None and holds_run(out):
        for p in [*out.glob("checkpoint-*"), *out.glob(faults.CORRUPT_PREFIX + "checkpoint-*")]:
            shutil.rmtree(p, ignore_errors=True)
        for name in (*RUN_MARKERS, "loss.png"):
            (out / name).unlink(missing_ok=True)
        for name in ("tb", "final"):
            shutil.rmtree(out / name, ignore_errors=True)
    elif resume_ckpt is not None and resume_ckpt.parent.resolve() == out.resolve():
        faults.set_aside_corrupt(out, faults.step_of(resume_ckpt))
    out.mkdir(parents=True, exist_ok=True)
    faults.remove_leftovers(out)


def prepare(cfg: Config) -> tuple[Path, Path | None]:
    """resolve() then claim(): the folder and the checkpoint to resume from (or None)."""
    out, ckpt = resolve(cfg)
    claim(out, ckpt)
    return out, ckpt


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    """The dirtune checkout's commit (with '+dirty' if modified), or 'unknown' for an installed wheel."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


class MetricsLog:
    """Append-only metrics.jsonl. On resume, lines past the checkpoint's step are dropped so that
    the file describes exactly one trajectory."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")
        self._eval_steps = {r["step"] for r in self.read() if r.get("kind") == "eval"}

    def write(self, record: dict) -> None:
        if record.get("kind") == "eval":
            if record["step"] in self._eval_steps:
                return
            self._eval_steps.add(record["step"])
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def read(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
