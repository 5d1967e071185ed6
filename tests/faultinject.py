"""Fault injection against `dirtune train`: kill -9 at chosen and at random moments, then resume
and compare bit for bit with a run that was never stopped; a second process on a live run
folder; a torn metrics line; a full disk on a small tmpfs where the machine allows one.

    python tests/faultinject.py [--seed 0] [--chains 5] [--work DIR] [--only kill,lock,torn,disk]

CPU, a tiny LLaMA with LoRA (dropout on, so the RNG state must resume too), validation and a
checkpoint every 2 steps, the best checkpoint loaded at the end. Every run is a fork of this
process (the libraries are imported once), single-threaded, so that runs are bit-comparable.

Where the kills land. A child counts its *events*: each call of os.replace, shutil.rmtree,
torch.save, safetensors' save_file, checksums.write, MetricsLog.write, write_json_atomically
(summary.json) and Trainer.training_step. A kill at event K stops the process with SIGKILL at
that call; at a write, after writing half of it (a file cut short, half a JSON line), at a
rmtree after deleting one file. The uninterrupted run's event list names the points; kills are
drawn from it with a seeded RNG (plus fixed ones in the writes of a checkpoint, of final/ and
of summary.json), and some at a random time instead. After each kill the folder must hold only
complete checkpoints; after the chain of kills, `--resume` must end exactly where the reference
ended (metrics.jsonl byte for byte but for its wall-clock "time" field, the same checkpoints
with the same tensors, final/, the summary's losses and steps) or refuse with a reason.

Exit status 0 when everything held, 1 otherwise; the report says what ran, what was skipped.
tests/integration/test_faultinject.py runs it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import safetensors.torch  # noqa: E402
from metrics_lines import untimed_lines  # noqa: E402  (tests/metrics_lines.py, beside this script)
from safetensors.torch import load_file  # noqa: E402

import dirtune.models.lora  # noqa: E402,F401  (imported before forking, with everything a run needs)
import dirtune.train.runner  # noqa: E402,F401
from dirtune.cli import main  # noqa: E402
from dirtune.train import atomic_save, checkpoints, checksums, run_folder  # noqa: E402
from dirtune.train.trainer import DirtuneTrainer  # noqa: E402

MAX_STEPS = 12
ADAPTER = "adapter_model.safetensors"
SUMMARY_KEYS = ("best_eval_loss", "best_step", "final_eval_loss", "final_step", "target_step", "stopped_early",
                "skipped_steps", "test_loss")
REFUSALS = ("holds a run but no complete checkpoint to resume from", "holds a finished run")


# ---------------------------------------------------------------- the child: a run with a tripwire

class Tripwire:
    """Counts events in this (child) process; at event `kill_at`, does half of it and dies."""

    def __init__(self, kill_at: int | None, record: Path | None, out: Path, slow: float = 0.0):
        self.kill_at, self.record, self.out, self.slow = kill_at, record, out, slow
        self.n = 0
        self.events: list[list] = []

    def hit(self, kind: str, detail: str = "") -> bool:
        self.n += 1
        if self.record is not None:
            self.events.append([kind, detail])
        return self.n == self.kill_at

    def rel(self, path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.out.resolve()))
        except (ValueError, TypeError, OSError):
            return str(path)

    def install(self) -> None:
        trip = self
        real_replace, real_rmtree, real_save = os.replace, shutil.rmtree, torch.save
        real_st_save, real_ck_write = safetensors.torch.save_file, checksums.write
        real_log_write, real_json = run_folder.MetricsLog.write, run_folder.write_json_atomically
        real_step = DirtuneTrainer.training_step

        def replace(src, dst, *a, **kw):
            if trip.hit("os.replace", f"{trip.rel(src)} -> {trip.rel(dst)}"):
                die()
            return real_replace(src, dst, *a, **kw)

        def rmtree(path, *a, **kw):
            if trip.hit("shutil.rmtree", trip.rel(path)):
                files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
                if files:
                    files[0].unlink()  # a rotation killed mid-delete
                die()
            return real_rmtree(path, *a, **kw)

        def half_written(write, path):
            write()
            if os.path.isfile(path):
                os.truncate(path, os.path.getsize(path) // 2)
            die()

        def save(obj, f, *a, **kw):
            if trip.hit("torch.save", trip.rel(f)):
                if isinstance(f, (str, os.PathLike)):
                    half_written(lambda: real_save(obj, f, *a, **kw), f)
                die()
            return real_save(obj, f, *a, **kw)

        def st_save(tensors, filename, *a, **kw):
            if trip.hit("save_file", trip.rel(filename)):
                half_written(lambda: real_st_save(tensors, filename, *a, **kw), filename)
            return real_st_save(tensors, filename, *a, **kw)

        def ck_write(folder):
            if trip.hit("checksums.write", trip.rel(folder)):
                half_written(lambda: real_ck_write(folder), Path(folder) / checksums.NAME)
            return real_ck_write(folder)

        def log_write(self, record):
            if trip.hit("MetricsLog.write", f"{record.get('kind')} {record.get('step')}"):
                with open(self.path, "a") as f:  # half a line, no newline: a torn last line
                    line = json.dumps(record)
                    f.write(line[: len(line) // 2])
                die()
            return real_log_write(self, record)

        def write_json(path, value):
            if trip.hit("write_json_atomically", trip.rel(path)):
                staging = Path(path).with_name(checkpoints.PARTIAL_PREFIX + Path(path).name)
                staging.write_text(json.dumps(value)[:40])
                die()
            return real_json(path, value)

        def step(self, *a, **kw):
            if trip.hit("training_step", str(self.state.global_step + 1)):
                die()
            if trip.slow:
                time.sleep(trip.slow)
            return real_step(self, *a, **kw)

        swaps = {id(real_replace): replace, id(real_rmtree): rmtree, id(real_save): save, id(real_st_save): st_save}
        for module in list(sys.modules.values()):  # every `from x import f` copy too (peft's safe_save_file)
            try:
                names = list(vars(module).items())
            except TypeError:
                continue
            for name, value in names:
                if id(value) in swaps and callable(value):
                    try:
                        setattr(module, name, swaps[id(value)])
                    except (AttributeError, TypeError):
                        pass
        checksums.write = ck_write
        atomic_save.checksums.write = ck_write
        run_folder.MetricsLog.write = log_write
        run_folder.write_json_atomically = write_json
        DirtuneTrainer.training_step = step

    def save_record(self) -> None:
        if self.record is not None:
            self.record.write_text(json.dumps(self.events))


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def run(args: list[str], out: Path, log: Path, kill_at: int | None = None, kill_after_s: float | None = None,
        record: Path | None = None, slow: float = 0.0, wait: bool = True):
    """`dirtune train ARGS` in a forked child. Returns its exit status (-9 when killed), or the
    pid when not waiting."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            trip = Tripwire(kill_at, record, out, slow)
            trip.install()
            if kill_after_s is not None:
                threading.Timer(kill_after_s, die).start()
            code = main(["train", *args])
            trip.save_record()
        except BaseException:  # noqa: BLE001 - a child never returns into the parent's code
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if not wait:
        return pid
    return status_of(os.waitpid(pid, 0)[1])


def status_of(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# ---------------------------------------------------------------- checks

class Report:
    def __init__(self):
        self.failures: list[str] = []
        self.lines: list[str] = []

    def fail(self, what: str, log: Path | None = None) -> None:
        tail = ""
        if log is not None and log.exists():
            tail = "\n      " + "\n      ".join(log.read_text(errors="replace").splitlines()[-12:])
        self.failures.append(what + tail)
        print(f"  FAIL {what}{tail}", flush=True)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)


def no_traceback(log: Path) -> bool:
    return "Traceback" not in log.read_text(errors="replace")


def invariants(out: Path) -> list[str]:
    """What must hold in a run folder after any kill."""
    problems = []
    for ckpt in checkpoints.checkpoint_folders(out):
        if (p := checkpoints.checkpoint_problem(ckpt)) is not None:
            problems.append(f"{ckpt.name} is visible but incomplete: {p}")
    if (out / "summary.json").exists():
        try:
            json.loads((out / "summary.json").read_text())
        except ValueError as e:
            problems.append(f"summary.json does not parse: {e}")
        if not (out / "final" / ADAPTER).is_file():
            problems.append("summary.json without final/")
        elif (p := checksums.problem(out / "final")) is not None:
            problems.append(f"final/: {p}")
    return problems


def differences(out: Path, ref: Path) -> list[str]:
    """How `out` differs from the reference run (empty: bit for bit where it matters)."""
    diffs = []
    # bit for bit but for "time", the wall-clock seconds of train and eval lines (no two runs share it)
    if untimed_lines(out / "metrics.jsonl") != untimed_lines(ref / "metrics.jsonl"):
        diffs.append("metrics.jsonl differs")
    try:
        s, r = json.loads((out / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    except (OSError, ValueError) as e:
        return diffs + [f"summary.json: {e}"]
    diffs += [f"summary {k}: {s.get(k)!r} != {r.get(k)!r}" for k in SUMMARY_KEYS if s.get(k) != r.get(k)]
    if Path(s.get("best_checkpoint") or "").name != Path(r.get("best_checkpoint") or "").name:
        diffs.append(f"best checkpoint {s.get('best_checkpoint')} != {r.get('best_checkpoint')}")
    elif s.get("best_checkpoint") and not Path(s["best_checkpoint"]).is_dir():
        diffs.append(f"summary names {s['best_checkpoint']}, which is not there")
    names = [p.name for p in checkpoints.checkpoint_folders(out)]
    if names != [p.name for p in checkpoints.checkpoint_folders(ref)]:
        diffs.append(f"checkpoints {names}")
    for folder in [*(n for n in names if (ref / n).is_dir()), "final"]:
        a, b = load_file(str(out / folder / ADAPTER)), load_file(str(ref / folder / ADAPTER))
        if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
            diffs.append(f"{folder}/{ADAPTER} tensors differ")
        if folder != "final":
            oa = torch.load(out / folder / "optimizer.pt", weights_only=True)["state"]
            ob = torch.load(ref / folder / "optimizer.pt", weights_only=True)["state"]
            if any(not torch.equal(oa[i][k], ob[i][k]) for i in ob for k in ob[i]):
                diffs.append(f"{folder}/optimizer.pt moments differ")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".partial-", ".replaced-", ".previous-run",
                                                                      run_folder.LOCK_NAME))]
    if leftovers:
        diffs.append(f"left behind: {leftovers}")
    return diffs


# ---------------------------------------------------------------- scenarios

class Setup:
    """The working folder: the run's config, the reference run and its events."""

    def __init__(self, work: Path, model: Path | None = None, train: Path | None = None, valid: Path | None = None):
        self.work = work
        self.config = work / "run.yaml"
        self.ref = work / "reference"
        self.events: list[list] = []
        self.seconds = 0.0
        if model is None:  # the inner full-disk process: the outer one wrote the config and the reference
            return
        self.config.write_text(f"""\
model: {{path: {model}}}
finetune: {{type: lora, lora_r: 4, lora_dropout: 0.1}}
data: {{train_file: {train}, valid_file: {valid}, max_eval_samples: 4, max_length: 96}}
optimizer: {{lr: 1.0e-2}}
train: {{seed: 3, max_steps: {MAX_STEPS}, batch_size: 4, eval_every: 2, save_every: 2, save_total_limit: 2,
         progress: false, report_to: [none], device: cpu, drift_every: 0}}
""")

    def args(self, out: Path, *extra: str) -> list[str]:
        return [str(self.config), f"train.output_dir={out}", *extra]

    def reference(self, report: Report) -> bool:
        log, record = self.work / "reference.log", self.work / "events.json"
        started = time.perf_counter()
        code = run(self.args(self.ref), self.ref, log, record=record)
        self.seconds = time.perf_counter() - started
        if code != 0:
            report.fail(f"the reference run exited {code}", log)
            return False
        self.events = json.loads(record.read_text())
        kinds: dict[str, int] = {}
        for kind, _ in self.events:
            kinds[kind] = kinds.get(kind, 0) + 1
        report.say(f"reference: {MAX_STEPS} steps in {self.seconds:.1f} s, {len(self.events)} events ("
                   + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")")
        return True

    def named_points(self) -> dict[str, int]:
        """Event numbers (1-based) of the writes the issue names: a checkpoint's, final/'s, summary.json's."""
        def first(pred) -> int | None:
            return next((i + 1 for i, (k, d) in enumerate(self.events) if pred(k, d)), None)

        def last(pred) -> int | None:
            found = [i + 1 for i, (k, d) in enumerate(self.events) if pred(k, d)]
            return found[-1] if found else None

        points = {
            "optimizer.pt half-written (checkpoint-6)": first(lambda k, d: k == "torch.save" and
                                                             d.endswith("checkpoint-6/optimizer.pt")),
            "checkpoint-8 publish rename": first(lambda k, d: k == "os.replace" and d.endswith("-> checkpoint-8")),
            "checksums.json half-written": first(lambda k, d: k == "checksums.write"),
            "rotation rename": first(lambda k, d: k == "os.replace" and "-> .replaced-checkpoint-" in d),
            "final/ weights half-written": last(lambda k, d: k == "save_file" and d.startswith(".partial-final")),
            "final/ publish rename": last(lambda k, d: k == "os.replace" and d.endswith("-> final")),
            "summary.json half-written": last(lambda k, d: k == "write_json_atomically"),
            "summary.json rename": last(lambda k, d: k == "os.replace" and d.endswith("-> summary.json")),
        }
        published = last(lambda k, d: k == "shutil.rmtree" and d.startswith(".partial-checkpoint-"))
        if published is not None:  # the last checkpoint is in place, the old ones not yet rotated
            points["last checkpoint published, not rotated"] = published + 1
        if points["rotation rename"] is not None:  # the delete after it: a kill leaves part of the folder
            points["rotation mid-delete"] = points["rotation rename"] + 1
        return {name: n for name, n in points.items() if n is not None}


def chain(setup: Setup, report: Report, name: str, kills: list[tuple[str, int | None, float | None]]) -> bool:
    """Kill a run at each point in turn (each resumed), resume to the end, compare with the reference."""
    out = setup.work / name
    overwrite = False
    for i, (what, kill_at, after_s) in enumerate(kills):
        log = setup.work / f"{name}-{i}.log"
        extra = (["--resume"] if i else []) + (["--overwrite"] if overwrite else [])
        code = run(setup.args(out, *extra), out, log, kill_at=kill_at, kill_after_s=after_s)
        if not no_traceback(log):
            report.fail(f"{name}: run {i} ({what}) printed a traceback", log)
            return False
        if code == 2 and REFUSALS[0] in log.read_text():
            overwrite = True  # killed before its first checkpoint: the refusal says to start again
            continue
        if code not in (-signal.SIGKILL, 0) and not (code == 2 and REFUSALS[1] in log.read_text()):
            report.fail(f"{name}: run {i} ({what}) exited {code}", log)
            return False
        overwrite = False
        if problems := invariants(out):
            report.fail(f"{name}: after the kill at {what}: {'; '.join(problems)}")
            return False
    log = setup.work / f"{name}-end.log"
    code = run(setup.args(out, "--resume", *(["--overwrite"] if overwrite else [])), out, log)
    if code == 2 and REFUSALS[0] in log.read_text():  # as the refusal says: start again
        code = run(setup.args(out, "--resume", "--overwrite"), out, log)
    text = log.read_text()
    if code != 0 and not (code == 2 and REFUSALS[1] in text):
        report.fail(f"{name}: the final resume exited {code}", log)
        return False
    if "Traceback" in text:
        report.fail(f"{name}: the final resume printed a traceback", log)
        return False
    if diffs := differences(out, setup.ref):
        report.fail(f"{name} (killed at {', '.join(w for w, _, _ in kills)}): " + "; ".join(diffs))
        return False
    print(f"  {name}: killed at {'; '.join(w for w, _, _ in kills)}: resumed bit-identical", flush=True)
    return True


def scenario_kills(setup: Setup, report: Report, rng: random.Random, chains: int) -> None:
    named = setup.named_points()
    plans = [[(f"{what} (event {n})", n, None)] for what, n in named.items()]
    n_events = len(setup.events)
    for c in range(chains):  # random: 1-3 kills each, at an event or at a moment
        plan = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.7:
                n = rng.randint(1, n_events if not plan else max(1, n_events // 2))
                kind, detail = setup.events[n - 1]
                plan.append((f"{kind} {detail} (event {n})", n, None))
            else:
                t = round(rng.uniform(0.3, max(0.5, setup.seconds)), 2)
                plan.append((f"a random moment ({t} s)", None, t))
        plans.append(plan)
    ok = sum(chain(setup, report, f"kill-{i}", plan) for i, plan in enumerate(plans))
    kills = sum(len(p) for p in plans)
    report.say(f"kill -9: {kills} kills in {len(plans)} chains ({len(named)} at named writes); "
               f"{ok} of {len(plans)} resumed runs ended bit-identical to the uninterrupted run")


def scenario_torn(setup: Setup, report: Report) -> None:
    """Killed while writing the line of step 7 (after checkpoint-6): half a line, no newline."""
    n = next((i + 1 for i, (k, d) in enumerate(setup.events) if k == "MetricsLog.write" and d == "train 7"), None)
    ok = n is not None and chain(setup, report, "torn", [(f"the metrics line of step 7 (event {n})", n, None)])
    report.say(f"torn metrics line: {'resumed, bit-identical to the uninterrupted run' if ok else 'FAILED'}")


def scenario_lock(setup: Setup, report: Report) -> None:
    out = setup.work / "lock"
    log = setup.work / "lock-live.log"
    pid = run(setup.args(out), out, log, slow=0.3, wait=False)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-4").is_dir() and time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            report.fail("lock: the live run ended early", log)
            return
        time.sleep(0.05)
    refused = 0
    for extra in ([], ["--overwrite"], ["--resume"]):
        second = setup.work / f"lock-second{''.join(extra)}.log"
        code = run(setup.args(out, *extra), out, second)
        text = second.read_text()
        if code == 2 and f"is in use by another dirtune run (pid {pid})" in text and "Traceback" not in text:
            refused += 1
        else:
            report.fail(f"lock: a second run {extra} beside the live one exited {code}", second)
    code = status_of(os.waitpid(pid, 0)[1])
    if code != 0:
        report.fail(f"lock: the live run exited {code}", log)
    elif diffs := differences(out, setup.ref):
        report.fail("lock: the live run: " + "; ".join(diffs))
    else:
        report.say(f"second process: {refused} of 3 (plain, --overwrite, --resume) refused naming the live "
                   "run's pid; the live run ended bit-identical")


# ---------------------------------------------------------------- full disk (a tmpfs, in a mount namespace)

def tmpfs_command() -> list[str] | None:
    """How to get a private mount namespace where a tmpfs may be mounted, or None."""
    if not shutil.which("unshare") or not shutil.which("mount") or sys.platform != "linux":
        return None
    for cmd in (["unshare", "-m"], ["unshare", "-Urm"]) if os.geteuid() == 0 else (["unshare", "-Urm"],):
        probe = subprocess.run([*cmd, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp && echo ok"],
                               capture_output=True, text=True, timeout=30)
        if probe.stdout.strip() == "ok":
            return cmd
    return None


def scenario_disk(setup: Setup, report: Report, rng: random.Random) -> None:
    cmd = tmpfs_command()
    if cmd is None:
        report.say("full disk: SKIPPED (no tmpfs: needs root or unprivileged user namespaces, and unshare)")
        return
    mnt = setup.work / "disk"
    mnt.mkdir(exist_ok=True)
    peak = sum(p.stat().st_size for p in setup.ref.rglob("*") if p.is_file())  # about the most a run holds
    frees = sorted(rng.sample(range(20_000, int(peak * 1.5), 4096), 3))
    inner = [sys.executable, __file__, "--inner-disk", str(mnt), "--work", str(setup.work),
             "--frees", ",".join(map(str, frees))]
    shell = f"mount -t tmpfs -o size=20m tmpfs {mnt} && exec " + " ".join(f"'{a}'" for a in inner)
    proc = subprocess.run([*cmd, "sh", "-c", shell], capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("disk:", "  FAIL"))]
    for line in lines[:-1]:
        print(line, flush=True)
    if proc.returncode != 0:
        report.fail(f"full disk: exited {proc.returncode}: " + "\n".join(lines[-8:] or proc.stderr.splitlines()[-8:]))
    else:
        report.say(lines[-1] if lines else "full disk: no report")


def inner_disk(args) -> int:
    """Inside the mount namespace: for each amount of free space, a run that fills the disk must
    stop in one line with its checkpoints whole, and resume bit-identical once space is freed."""
    work, mnt = Path(args.work), Path(args.inner_disk)
    setup = Setup(work)
    report = Report()
    ok = 0
    frees = [int(f) for f in args.frees.split(",")]
    for i, free in enumerate(frees):
        out, filler = mnt / f"run{i}", mnt / "filler"
        avail = shutil.disk_usage(mnt).free
        with open(filler, "wb") as f:
            f.truncate(0)
            os.posix_fallocate(f.fileno(), 0, max(avail - free, 1))
        log = work / f"disk-{i}.log"
        code = run(setup.args(out), out, log)
        text = log.read_text()
        if "Traceback" in text or code not in (0, 2):
            report.fail(f"disk: {free} bytes free: exited {code}", log)
            continue
        errors = [line for line in text.splitlines() if "error:" in line]
        if code == 2 and not (len(errors) == 1 and ("No space left on device" in errors[0])):
            report.fail(f"disk: {free} bytes free: not one line naming the full disk", log)
            continue
        if problems := invariants(out):
            report.fail(f"disk: {free} bytes free: " + "; ".join(problems))
            continue
        where = errors[0].split("error: ", 1)[1][:110] + "…" if errors else "nothing (it fit)"
        filler.unlink()
        if code == 2:  # as the message says: free space and resume (started again if no checkpoint)
            log = work / f"disk-{i}-resume.log"
            code = run(setup.args(out, "--resume"), out, log)
            if code == 2 and REFUSALS[0] in log.read_text():
                code = run(setup.args(out, "--resume", "--overwrite"), out, log)
            if code != 0 or "Traceback" in log.read_text():
                report.fail(f"disk: {free} bytes free: the resume exited {code}", log)
                continue
        if diffs := differences(out, setup.ref):
            report.fail(f"disk: {free} bytes free: " + "; ".join(diffs))
            continue
        print(f"disk: {free} bytes free: {where} -> {'resumed, ' if errors else ''}bit-identical", flush=True)
        shutil.rmtree(out)
        ok += 1
    print(f"disk: full disk (20 MB tmpfs, {', '.join(map(str, frees))} bytes left free): {ok} of {len(frees)} "
          "runs stopped in one line (or fit) with their checkpoints whole, and ended bit-identical", flush=True)
    return 0 if ok == len(frees) else 1


# ---------------------------------------------------------------- main

def tiny_setup(work: Path) -> tuple[Path, Path, Path]:
    """A 2-layer LLaMA (hidden 32, from tests/tiny.py) with a character tokenizer, and the demo's
    task: what tests/conftest.py builds."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from tiny import make_tiny_llama  # tests/tiny.py, beside this script (sys.path[0])

            from dirtune.data.synthetic import char_tokenizer, write_demo_data

            tok = char_tokenizer()
            make_tiny_llama(tok, seed=0).save_pretrained(work / "tiny-llama")
            tok.save_pretrained(work / "tiny-llama")
            write_demo_data(work / "task", seed=0, n_people=24, n_source_train=200, n_source_valid=20)
            code = 0
        finally:
            os._exit(code)
    if status_of(os.waitpid(pid, 0)[1]) != 0:
        raise SystemExit("faultinject: could not build the tiny model")
    return work / "tiny-llama", work / "task" / "task_train.jsonl", work / "task" / "task_valid.jsonl"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    p.add_argument("--chains", type=int, default=5, help="random chains of kills (besides the named writes)")
    p.add_argument("--work", help="working folder (default: a temporary one, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--only", default="kill,lock,torn,disk", help="scenarios to run")
    p.add_argument("--model", help="model folder (default: a tiny random LLaMA made here)")
    p.add_argument("--train", help="alpaca training file (with --model)")
    p.add_argument("--valid", help="alpaca validation file (with --model)")
    p.add_argument("--inner-disk", help=argparse.SUPPRESS)
    p.add_argument("--frees", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_all(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="dirtune-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model, train, valid = Path(args.model), Path(args.train), Path(args.valid)
    else:
        model, train, valid = tiny_setup(work)
    setup, report, rng = Setup(work, model, train, valid), Report(), random.Random(args.seed)
    only = set(args.only.split(","))
    try:
        if setup.reference(report):
            if "kill" in only:
                scenario_kills(setup, report, rng, args.chains)
            if "torn" in only:
                scenario_torn(setup, report)
            if "lock" in only:
                scenario_lock(setup, report)
            if "disk" in only:
                scenario_disk(setup, report, rng)
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    verdict = "all held" if not report.failures else f"{len(report.failures)} FAILED"
    print(f"faultinject: {verdict} (seed {args.seed}, {time.perf_counter() - started:.0f} s)", flush=True)
    return 0 if not report.failures else 1


if __name__ == "__main__":
    ns = parse()
    sys.exit(inner_disk(ns) if ns.inner_disk else run_all(ns))
