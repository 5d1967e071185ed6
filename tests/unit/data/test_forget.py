"""forget.py and the named forget sets of build_datasets (data.forget_files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dirtune.data import DataError, build_datasets
from dirtune.data.forget import is_forget_split, parse_forget_files
from dirtune.data.tokenize import IGNORE_INDEX
from dirtune.train.config import ConfigError, DataConfig, load_config

WORDS = "the a of to and is in it you that he was for on are with as his they be at one have this".split()


def alpaca_rows(n):
    return [{"instruction": f"{WORDS[i % 20]} {WORDS[(i + 3) % 20]}", "input": "",
             "output": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + i % 4))} for i in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parse_keeps_order_and_strips():
    assert parse_forget_files([" web = a/b.jsonl", "instruct=x=y.json"]) == [("web", "a/b.jsonl"),
                                                                           ("instruct", "x=y.json")]
    assert parse_forget_files([]) == [] and parse_forget_files(None) == []
    assert is_forget_split("forget") and is_forget_split("forget_web") and not is_forget_split("valid")


@pytest.mark.parametrize("items, message", [
    (["web"], r"data.forget_files\[0\]: 'web' is not valid; expected 'name=path'"),
    (["=a.json"], r"\[0\]: '=a.json' is not valid"),
    (["web="], r"\[0\]: 'web=' is not valid"),
    (["a b=x.txt"], r"name of letters, digits and '_'"),
    (["_x=x.txt"], r"'_x=x.txt' is not valid"),
    (["web=a.txt", "web=b.txt"], r"data.forget_files\[1\]: the name 'web' is used twice"),
])
def test_bad_items_name_the_item(items, message):
    with pytest.raises(DataError, match=message):
        parse_forget_files(items)


def test_config_refuses_a_bad_item_with_its_key():
    with pytest.raises(ConfigError, match=r"command line: data.forget_files\[1\]: 'oops' is not valid"):
        load_config(None, ["data.forget_files=[web=a.txt, oops]"])
    cfg = load_config(None, ["data.forget_files=web=a.txt,instruct=b.json"])
    assert cfg.data.forget_files == ["web=a.txt", "instruct=b.json"]


def test_named_sets_text_and_records_beside_the_legacy_one(tmp_path, chat_tok):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(20))
    text = write_jsonl(tmp_path / "web.jsonl", [{"text": " ".join(WORDS)}] * 6)
    instruct = tmp_path / "instruct.json"
    instruct.write_text(json.dumps(alpaca_rows(12)))
    b = build_datasets(DataConfig(train_file=str(train), forget_file=str(text), template="tokenizer",
                                  forget_files=[f"web={text}", f"instruct={instruct}"], max_length=16,
                                  max_eval_samples=5, train_on_prompt=True), chat_tok)
    assert list(b.forget_sets) == ["web", "instruct"]
    splits = b.stats["splits"]
    assert splits["forget_web"]["format"] == "text" and splits["forget_instruct"]["format"] == "alpaca"
    assert splits["forget_instruct"]["template"] == "tokenizer"
    # the legacy set and the named text set are the same file, cut alike
    assert b.forget_sets["web"]["input_ids"] == b.forget["input_ids"] and len(b.forget) == 5
    # records: the first max_eval_samples, loss on the responses only though training is on prompts
    rows = b.forget_sets["instruct"]
    assert len(rows) == 5 and splits["forget_instruct"]["records"] == 5
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        assert labels[0] == IGNORE_INDEX and any(lab != IGNORE_INDEX for lab in labels)
    assert b.train[0]["labels"][0] != IGNORE_INDEX  # train_on_prompt still applies to training
    assert splits["forget_instruct"]["records"] == 5 and b.stats["records"] == 20 + 6 + 6 + 12
    assert set(b.data_files) == {train.resolve(), text.resolve(), instruct.resolve()}
    assert "forget_instruct: 5 rows" in b.summary()


def test_records_set_uses_the_runs_template(tmp_path, word_tok):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(10))
    instruct = write_jsonl(tmp_path / "instruct.jsonl", alpaca_rows(4))
    b = build_datasets(DataConfig(train_file=str(train), forget_files=[f"i={instruct}"], template="plain",
                                  max_length=64), word_tok)
    assert b.stats["splits"]["forget_i"]["template"] == "plain"
    valid_like = build_datasets(DataConfig(train_file=str(train), valid_file=str(instruct), template="plain",
                                           max_length=64), word_tok)
    assert b.forget_sets["i"]["labels"] == valid_like.valid["labels"]


def test_a_bad_named_file_names_the_file(tmp_path, word_tok):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(10))
    with pytest.raises(DataError, match=r"missing\.txt: not found"):
        build_datasets(DataConfig(train_file=str(train), forget_files=[f"m={tmp_path / 'missing.txt'}"]), word_tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="empty.txt: empty"):
        build_datasets(DataConfig(train_file=str(train), forget_files=[f"e={empty}"]), word_tok)
