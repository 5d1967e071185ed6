"""The held-out splits (validation, and test by ratio): a deterministic, seeded hold-out of
records (documents for text).

    n_valid = max(1, round_half_up(n * valid_ratio))     when valid_ratio > 0
    valid   = sorted(first n_valid of permutation(n))    numpy.random.default_rng(seed)
    train   = the other indices, in file order

Both parts keep the file's order, so "the first N records" (data.max_samples) means the same
records for every seed of the model. Text is split by documents before it is cut into blocks,
so no document is in both parts; a single document (a .txt file) is split at a line boundary
instead, its tail held out. `key` names the config key in errors (data.valid_ratio or
data.test_ratio).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np

from dirtune.data.records import DataError, Text

T = TypeVar("T")


def valid_count(n: int, ratio: float) -> int:
    """How many of n records are held out: at least 1 when ratio > 0."""
    if ratio <= 0:
        return 0
    return max(1, math.floor(n * ratio + 0.5))


def split_indices(n: int, ratio: float, seed: int, source: str | Path = "data",
                  key: str = "data.valid_ratio") -> tuple[list[int], list[int]]:
    """(train, valid) indices of n records, each sorted; DataError if either would be empty."""
    if not 0 <= ratio < 1:
        raise DataError(f"{key}: {ratio!r} is not valid; expected 0 <= x < 1")
    k = valid_count(n, ratio)
    if k == 0:
        return list(range(n)), []
    if n - k < 1:
        raise DataError(f"{source}: {n} record(s) cannot be split by {key}={ratio}: "
                        f"nothing would be left to train on; add records or set {_file_key(key)}")
    order = np.random.default_rng(seed).permutation(n)
    valid = sorted(int(i) for i in order[:k])
    held = set(valid)
    return [i for i in range(n) if i not in held], valid


def _file_key(key: str) -> str:
    return key.replace("_ratio", "_file")


def split_records(items: Sequence[T], ratio: float, seed: int, source: str | Path = "data",
                  key: str = "data.valid_ratio") -> tuple[list[T], list[T]]:
    """(train, valid) items by `split_indices`; a single Text document is split within itself."""
    if len(items) == 1 and ratio > 0 and isinstance(items[0], Text):
        return split_document(items[0], ratio, source, key)
    train, valid = split_indices(len(items), ratio, seed, source, key)
    return [items[i] for i in train], [items[i] for i in valid]


def split_document(doc: Text, ratio: float, source: str | Path = "data",
                   key: str = "data.valid_ratio") -> tuple[list[Text], list[Text]]:
    """Hold out the tail of one document: the cut is the first line break at or after
    (1 - ratio) of its characters (or exactly there when no line break follows)."""
    text = doc.text
    cut = math.floor(len(text) * (1 - ratio))
    newline = text.find("\n", cut)
    if newline != -1 and newline + 1 < len(text):
        cut = newline + 1
    head, tail = text[:cut], text[cut:]
    if not head.strip() or not tail.strip():
        raise DataError(f"{source}: one document of {len(text)} characters is too short to split by "
                        f"{key}={ratio}; add text or set {_file_key(key)}")
    tail_line = doc.line + head.count("\n")
    return [Text(head, doc.line)], [Text(tail, tail_line)]
