"""The README's promises: its Python example runs, its config reference lists every key, and its
two set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from dirtune.train.config import describe

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_python_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "angle_deg" in out and "drift" in out


def test_config_reference_lists_every_key():
    missing = [key for key, *_ in describe() if f"`{key}`" not in README]
    assert not missing, f"README config reference lacks {missing}"


def test_test_command_is_what_ci_runs():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "python -m pytest -x -q" in ci and "python -m pytest -x -q" in README
    assert re.search(r"pip install (-q )?torch==2.13.0", ci) and "dirtune demo" in README


def test_demo_section_matches_the_committed_output_of_the_current_sizes():
    """The README's demo block is what docs/demo/output.txt printed, and that output (and the
    README's words) are of the sizes the code runs now: a stale copy fails here."""
    from dirtune.demo import FULL

    section = README[README.index("## The demo"):README.index("## Results")]
    block = re.search(r"```\n\$ dirtune demo\n\.\.\.\n(.*?)```", section, re.S).group(1)
    output = (Path(__file__).resolve().parents[1] / "docs" / "demo" / "output.txt").read_text(encoding="utf-8")
    assert block.strip() and block in output
    assert (f"pretraining a {FULL.layers}-layer, width-{FULL.hidden} LLaMA-2-architecture model from scratch "
            f"on the world's prose ({FULL.source_steps} steps)") in output
    assert f"with AdamW ({FULL.task_steps} steps)" in output
    words = " ".join(section.split())  # the prose, whatever its line breaks
    assert f"{FULL.layers}-layer, width-{FULL.hidden}" in words and f"({FULL.source_steps} steps)" in words
    assert f"budget ({FULL.task_steps} steps)" in words
