"""Several files in one split: holding out per file, and mixing the training files by weight.

A split read from several files is a list of *groups*, one per file: (path, examples), in the
order the config names the files. Groups stay apart until tokenisation so that every message
names the file (and line) it is about.

Mixing (data.train_weights, one weight per file): the weights, normalised to shares p_i, say
how many of the N training records come from each file: k_i = p_i·N (rounded by largest
remainder so that they sum to N), where N is data.max_samples if set, else the number of
training records of all files together, so an epoch keeps its length. A file with more records
than its share gives a seeded random subset of them (in file order); a file with fewer gives
all of them, repeated whole as often as they fit, plus a seeded random subset for the rest.
Shares count records (documents, for text), not tokens. Without weights the files are simply
concatenated and data.max_samples keeps the first N records in that order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, TypeVar

import numpy as np

from dirtune.data.splits import split_records

T = TypeVar("T")
Group = tuple[Path, list]


def total(groups: Sequence[Group]) -> int:
    return sum(len(items) for _, items in groups)


def hold_out(groups: Sequence[Group], ratio: float, seed: int, key: str) -> tuple[list[Group], list[Group]]:
    """(kept, held out) per file, each file split by `ratio` as one file alone would be (so a
    single .txt document still gives its tail): the held-out part has every file's share."""
    kept, held = [], []
    for path, items in groups:
        a, b = split_records(items, ratio, seed, path, key)
        kept.append((path, a))
        held.append((path, b))
    return kept, held


def head(groups: Sequence[Group], n: Optional[int]) -> list[Group]:
    """The first n records over the groups in order (all when n is None); empty groups dropped
    unless nothing is left."""
    if n is None:
        return list(groups)
    out = []
    for path, items in groups:
        if n <= 0:
            break
        out.append((path, items[:n]))
        n -= len(out[-1][1])
    return out or list(groups[:1])


def shares(weights: Sequence[float], n: int) -> list[int]:
    """Integer counts proportional to `weights` that sum to n (largest remainder)."""
    s = float(sum(weights))
    exact = [w / s * n for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def mix(groups: Sequence[Group], weights: Sequence[float], n: Optional[int], seed: int) -> tuple[list[Group], list[dict]]:
    """The weighted mix of `groups` (module docstring): (groups with the records used, one
    {file, records, used} per file for the stats)."""
    n = total(groups) if n is None else n
    rng = np.random.default_rng(seed)
    out, report = [], []
    for (path, items), k in zip(groups, shares(weights, n)):
        whole, rest = divmod(k, len(items)) if items else (0, 0)
        picked = sorted(int(i) for i in rng.permutation(len(items))[:rest]) if items else []
        out.append((path, list(items) * whole + [items[i] for i in picked]))
        report.append({"file": str(path), "records": len(items), "used": len(out[-1][1])})
    return out, report
