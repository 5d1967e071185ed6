"""CI's run of tests/faultinject.py (issue 13): kill -9 at named and random points (seed 0), then
resume and compare bit for bit; a second process on a live folder; a torn metrics line; a full
disk on a tmpfs when the machine allows one (skipped, and said, when it does not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "faultinject.py"


def test_fault_injection_holds(tiny_checkpoint, task_files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--seed", "0", "--chains", "2", "--work", str(tmp_path),
                           "--model", str(tiny_checkpoint), "--train", str(task_files["task_train"]),
                           "--valid", str(task_files["task_valid"])],
                          capture_output=True, text=True, timeout=1200, env=env)
    report = proc.stdout
    print(report)
    assert proc.returncode == 0, report + proc.stderr[-3000:]
    assert "faultinject: all held" in report
    kills = next(line for line in report.splitlines() if line.startswith("kill -9:"))
    n_chains = int(kills.split(" chains")[0].split(" in ")[-1])
    assert n_chains >= 10 and f"{n_chains} of {n_chains} resumed runs ended bit-identical" in kills
    assert "torn metrics line: resumed, bit-identical" in report
    assert "second process: 3 of 3 (plain, --overwrite, --resume) refused" in report
    assert ("full disk: SKIPPED" in report) or ("3 of 3 runs stopped in one line (or fit) with their checkpoints whole" in report)
