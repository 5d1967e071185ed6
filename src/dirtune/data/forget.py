"""Named forget sets (`data.forget_files`): data from before fine-tuning, each evaluated beside
the validation split at every evaluation; the rise of its loss is what the model forgets.

    data.forget_files: ["web=c4_demo.jsonl", "instruct=alpaca_en_demo.json"]

    text file (.txt, JSONL `text`, optionally .xz)   cut into max_length blocks, as data.forget_file
    alpaca or chat records                           rendered with the run's template (data.template)
                                                     and measured on the responses only, whatever
                                                     data.train_on_prompt says: instruction following

data.max_eval_samples caps each set: its first N records, then its first N rows (a text file's
documents can be long, so the cut is on what is evaluated). Each set is logged as
`forget_<name>_loss`; the legacy data.forget_file stays `forget_loss`. data.columns (the task
files' own field names) does not apply: a forget set is another file, in a standard format.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from dirtune.data.records import DataError, Example, load_examples

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
PREFIX = "forget_"  # split name of a named set: forget_<name>


def parse_forget_files(items: Iterable[str], key: str = "data.forget_files") -> list[tuple[str, str]]:
    """[(name, path)] from "name=path" items; DataError naming the item and what is accepted."""
    specs: list[tuple[str, str]] = []
    for i, item in enumerate(items or []):
        name, sep, path = str(item).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not NAME.fullmatch(name) or not path:
            raise DataError(f"{key}[{i}]: {item!r} is not valid; expected 'name=path' with a name of "
                            "letters, digits and '_' (it names the metric forget_<name>_loss)")
        if any(name == n for n, _ in specs):
            raise DataError(f"{key}[{i}]: the name {name!r} is used twice")
        specs.append((name, path))
    return specs


def split_name(name: str) -> str:
    return PREFIX + name


def is_forget_split(split: str) -> bool:
    """The legacy 'forget' split or a named one."""
    return split == "forget" or split.startswith(PREFIX)


def load_forget_sets(items: Iterable[str]) -> list[tuple[str, Path, str, list[Example]]]:
    """(split name, path, format, every example) per named set, in the order given; the
    format is always detected from the file (data.format is the training file's)."""
    out = []
    for name, value in parse_forget_files(items):
        path = Path(value).expanduser()
        fmt, examples = load_examples(path, "auto")
        out.append((split_name(name), path, fmt, examples))
    return out
