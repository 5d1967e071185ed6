"""No function in src/dirtune longer than LIMIT lines (decorators and docstring included) unless
LONG names it with the reason it reads better whole; an entry whose function got short again
must go, so the list stays true."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "dirtune"
LIMIT = 60

LONG = {  # "path:function": why it is one function
    "cli.py:build_parser": "argparse declarations, one block per subcommand: a table, not logic",
    "models/convert_meta.py:convert_meta": "one conversion read top to bottom: params, tokenizer, "
                                           "shards merged tensor by tensor, written; parts share its locals",
    "train/config.py:validate": "the ladder of range checks, one line each (torch's optimizers' style)",
    "method/fused.py:_group_step": "one optimizer step of one tensor group: coefficient table, then "
                                   "the launches, in the order the module docstring lists them",
    "method/fused_kernels.py:_step_turn_kernel": "a Triton kernel: one launch, its body cannot be "
                                                 "split without a second pass over memory",
    "models/direction.py:__init__": "DirectionPenalty's discovery of covered weights, checks and "
                                    "references in one pass over the modules",
    "data/pipeline.py:build_datasets": "the data pipeline in order (read, split, render, tokenize, "
                                       "pack) as one readable sequence",
    "method/balanced_adamw.py:balanced_adamw": "the functional step's signature is 22 parameters "
                                               "(torch's adamw() layout); the body is ~30 lines",
}


def long_functions() -> dict[str, int]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > LIMIT:
                    found[f"{path.relative_to(SRC).as_posix()}:{node.name}"] = node.end_lineno - first + 1
    return found


def test_no_long_function_without_a_reason():
    unlisted = {k: n for k, n in long_functions().items() if k not in LONG}
    assert not unlisted, (f"functions over {LIMIT} lines: {unlisted}; split them (setup / run / finish), "
                          "or add them to LONG with the reason they read better whole")


def test_every_listed_function_is_still_long_and_has_a_reason():
    found = long_functions()
    assert not [k for k in LONG if k not in found], "no longer long: drop from LONG"
    assert all(len(why) > 20 for why in LONG.values())
