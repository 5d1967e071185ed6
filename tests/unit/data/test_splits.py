"""splits.py: a deterministic, seeded, disjoint validation split."""

from __future__ import annotations

import pytest

from dirtune.data.records import DataError, Text
from dirtune.data.splits import split_document, split_indices, split_records, valid_count


@pytest.mark.parametrize("n, ratio, k", [(100, 0.05, 5), (10, 0.05, 1), (10, 0.25, 3), (7, 0.0, 0), (3, 0.5, 2)])
def test_valid_count(n, ratio, k):
    assert valid_count(n, ratio) == k


def test_split_is_deterministic_disjoint_complete_and_ordered():
    train, valid = split_indices(200, 0.1, seed=3)
    assert (train, valid) == split_indices(200, 0.1, seed=3)
    assert len(valid) == 20 and sorted(train + valid) == list(range(200))
    assert train == sorted(train) and valid == sorted(valid)
    assert valid != split_indices(200, 0.1, seed=4)[1]


def test_ratio_zero_keeps_everything_for_training():
    assert split_indices(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])


def test_too_few_records_to_split():
    with pytest.raises(DataError, match=r"f\.json: 1 record\(s\) cannot be split by data\.valid_ratio=0\.1"):
        split_indices(1, 0.1, seed=0, source="f.json")


def test_bad_ratio():
    with pytest.raises(DataError, match=r"data\.valid_ratio: 1\.0 is not valid"):
        split_indices(10, 1.0, seed=0)


def test_split_records_keeps_the_items():
    items = [Text(f"doc {i}", i + 1) for i in range(10)]
    train, valid = split_records(items, 0.2, seed=0)
    assert len(train) == 8 and len(valid) == 2 and not set(train) & set(valid)


def test_single_document_is_split_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(20))
    train, valid = split_records([Text(text, 1)], 0.1, seed=0)
    assert train[0].text + valid[0].text == text
    assert train[0].text.endswith("\n") and valid[0].text.startswith("line ")
    assert valid[0].line == 1 + train[0].text.count("\n")
    assert 0.05 < len(valid[0].text) / len(text) < 0.15


def test_too_short_document():
    with pytest.raises(DataError, match=r"one document of 1 characters is too short to split"):
        split_document(Text("x", 1), 0.1, "f.txt")
