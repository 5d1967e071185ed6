"""Fixtures of the end-to-end runs: the command-line overrides they all share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def run_overrides(tiny_checkpoint, task_files):
    """`run_overrides(out, *extra, model=tiny_checkpoint, valid=True)`: the key=value overrides
    of a run on the demo task (its train file, and its valid file unless `valid` is false) into
    the run folder `out`, on the CPU, without a progress bar or loggers; then `extra`, which
    holds what a test chooses (sizes, steps, method)."""
    def overrides(out, *extra, model=tiny_checkpoint, valid=True):
        data = [f"data.train_file={task_files['task_train']}"]
        if valid:
            data.append(f"data.valid_file={task_files['task_valid']}")
        return [f"model.path={model}", *data, f"train.output_dir={out}", "train.progress=false",
                "train.report_to=[none]", "train.device=cpu", *extra]

    return overrides
