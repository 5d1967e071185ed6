"""mixing.py: several files in one split, per-file hold-outs, weighted mixes (and through
build_datasets: lists of files, data.train_weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dirtune.data import DataError, build_datasets
from dirtune.data.mixing import head, hold_out, mix, shares
from dirtune.train.config import ConfigError, DataConfig, load_config

WORDS = "the a of to and is in it you that he was for on are with as his they be".split()


def rows(n, tag):
    # the instruction carries the file's tag, so that a tokenised row says which file it came from
    # and distinct records (n <= 400)
    return [{"instruction": f"{tag} {WORDS[i % 20]} {WORDS[i // 20]}", "output": " ".join(WORDS[: 1 + i % 4])}
            for i in range(n)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("weights, n, expected", [
    ([1, 1], 10, [5, 5]), ([3, 1], 10, [8, 2]), ([1, 1, 1], 10, [4, 3, 3]), ([0.2, 0.8], 7, [1, 6]),
])
def test_shares_are_proportional_and_sum_to_n(weights, n, expected):
    assert shares(weights, n) == expected


def test_mix_subsamples_the_big_file_and_repeats_the_small_one():
    groups = [(Path("a"), list(range(100))), (Path("b"), list(range(1000, 1010)))]
    out, report = mix(groups, [1, 1], None, seed=0)
    a, b = out[0][1], out[1][1]
    assert (len(a), len(b)) == (55, 55)  # N = 110 records, half each
    assert len(set(a)) == 55 and a == sorted(a)  # a seeded subset, in file order
    assert b[:50] == list(range(1000, 1010)) * 5 and set(b[50:]) <= set(range(1000, 1010))
    assert report == [{"file": "a", "records": 100, "used": 55}, {"file": "b", "records": 10, "used": 55}]
    assert mix(groups, [1, 1], None, seed=0)[0] == out  # deterministic
    assert mix(groups, [1, 1], None, seed=1)[0][0][1] != a  # and follows the seed


def test_mix_total_is_max_samples_when_set():
    groups = [(Path("a"), list(range(100))), (Path("b"), list(range(50)))]
    out, _ = mix(groups, [1, 3], 20, seed=0)
    assert [len(items) for _, items in out] == [5, 15]


def test_head_takes_the_first_records_across_files_in_order():
    groups = [(Path("a"), [1, 2, 3]), (Path("b"), [4, 5, 6])]
    assert head(groups, 4) == [(Path("a"), [1, 2, 3]), (Path("b"), [4])]
    assert head(groups, 2) == [(Path("a"), [1, 2])]
    assert head(groups, None) == groups


def test_hold_out_takes_every_files_share():
    groups = [(Path("a"), list(range(40))), (Path("b"), list(range(100, 120)))]
    kept, held = hold_out(groups, 0.1, seed=0, key="data.valid_ratio")
    assert [len(i) for _, i in held] == [4, 2] and [len(i) for _, i in kept] == [36, 18]
    assert not set(held[0][1]) & set(kept[0][1])


# ---------------------------------------------------------------- through build_datasets

def tagged(ds, word_tok) -> list[str]:
    """The file tag of each tokenised row: the first instruction word (after "### Instruction :")."""
    return [word_tok.decode(ids, skip_special_tokens=True).split()[3] for ids in ds["input_ids"]]


def test_a_list_of_files_is_concatenated_and_hashed(tmp_path, word_tok):
    a = write_jsonl(tmp_path / "a.jsonl", rows(6, "one"))
    b = tmp_path / "b.json"
    b.write_text(json.dumps(rows(4, "two")))
    bundle = build_datasets(DataConfig(train_file=[str(a), str(b)], valid_ratio=0.0, template="plain"), word_tok)
    assert len(bundle.train) == 10 and bundle.stats["records"] == 10
    assert bundle.data_files == [a.resolve(), b.resolve()]
    assert bundle.stats["splits"]["train"]["file"] == f"{a}, {b}"


def test_train_weights_set_each_files_share(tmp_path, word_tok):
    a = write_jsonl(tmp_path / "a.jsonl", rows(30, "one"))
    b = write_jsonl(tmp_path / "b.jsonl", rows(6, "two"))
    bundle = build_datasets(DataConfig(train_file=[str(a), str(b)], train_weights=[1.0, 2.0], valid_ratio=0.0,
                                       template="plain", max_samples=24), word_tok)
    tags = tagged(bundle.train, word_tok)
    assert (tags.count("one"), tags.count("two")) == (8, 16)
    assert bundle.stats["splits"]["train"]["mix"] == [{"file": str(a), "records": 30, "used": 8},
                                                      {"file": str(b), "records": 6, "used": 16}]
    assert "mix (data.train_weights): " in bundle.summary()


def test_validation_is_held_out_before_the_mix(tmp_path, word_tok):
    # repeating a small file must never put its validation records into training
    a = write_jsonl(tmp_path / "a.jsonl", rows(40, "one"))
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"two {w}", "output": w} for w in WORDS[:10]])
    bundle = build_datasets(DataConfig(train_file=[str(a), str(b)], train_weights=[1.0, 1.0], valid_ratio=0.2,
                                       template="plain"), word_tok)
    as_set = lambda ds: {tuple(r) for r in ds["input_ids"]}  # noqa: E731
    assert not as_set(bundle.valid) & as_set(bundle.train)
    assert sorted(set(tagged(bundle.valid, word_tok))) == ["one", "two"]


def test_files_of_one_split_must_share_a_format(tmp_path, word_tok):
    a = write_jsonl(tmp_path / "a.jsonl", rows(3, "one"))
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "the a of"}])
    with pytest.raises(DataError, match=rf"data\.train_file: {a} holds alpaca records but {b} holds text records"):
        build_datasets(DataConfig(train_file=[str(a), str(b)]), word_tok)


def test_an_error_names_the_file_it_is_in(tmp_path, word_tok):
    a = write_jsonl(tmp_path / "a.jsonl", rows(3, "one"))
    b = write_jsonl(tmp_path / "b.jsonl", rows(2, "two") + [{"instruction": "x"}])
    with pytest.raises(DataError, match=rf"{b}: line 3: missing field 'output'"):
        build_datasets(DataConfig(train_file=[str(a), str(b)]), word_tok)


@pytest.mark.parametrize("overrides, message", [
    (["data.train_file=[a.json,b.json]", "data.train_weights=[1]"],
     "data.train_weights: [1.0] has 1 weight(s) but data.train_file names 2 file(s); give one weight per file"),
    (["data.train_file=[a.json,b.json]", "data.train_weights=[1,-2]"],
     "data.train_weights: [1.0, -2.0] is not valid; expected numbers > 0"),
    (["data.train_file=[]"], "data.train_file: [] is not valid; expected a file or a non-empty list of files"),
    (["data.train_file={a: 1}"], "data.train_file: {'a': 1} is not valid; expected str or list of str"),
])
def test_bad_mixes_are_config_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_config(None, overrides)
