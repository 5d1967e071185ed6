"""pipeline.py: build_datasets from a DataConfig, end to end on small files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dirtune.data import DataBundle, DataError, build_datasets
from dirtune.data.tokenize import IGNORE_INDEX
from dirtune.train.config import DataConfig

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
WORDS = "the a of to and is in it you that he was for on are with as his they be at one have this".split()


def alpaca_rows(n):
    return [{"instruction": f"{WORDS[i % 20]} {WORDS[(i + 3) % 20]}", "input": "" if i % 2 else "hello",
             "output": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 5))} for i in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(tok, **kw) -> DataBundle:
    return build_datasets(DataConfig(**kw), tok)


def test_alpaca_with_ratio_split(tmp_path, word_tok):
    f = tmp_path / "a.json"
    f.write_text(json.dumps(alpaca_rows(40)))
    b = build(word_tok, train_file=str(f), valid_ratio=0.1, max_length=64)
    assert (len(b.train), len(b.valid)) == (36, 4) and b.test is None and b.forget is None
    assert b.train.column_names == ["input_ids", "attention_mask", "labels"]
    assert b.data_files == [f.resolve()]
    s = b.stats
    assert (s["format"], s["template"], s["records"], s["examples"]) == ("alpaca", "llama2", 40, 40)
    assert s["splits"]["valid"]["records"] == 4 and s["truncated"] == 0 and s["rejected"] == 0
    assert s["tokens"] == sum(len(r) for d in (b.train, b.valid) for r in d["input_ids"])
    row = b.train[0]
    # the first labelled token follows the "[/INST]" prompt, and every label is its id or ignored
    assert row["labels"][0] == IGNORE_INDEX and row["labels"][-1] == word_tok.eos_token_id
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(row["input_ids"], row["labels"]))
    assert "train:" in b.summary() and "valid:" in b.summary()


def test_split_is_deterministic_and_follows_the_seed(tmp_path, word_tok):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))
    one = build(word_tok, train_file=str(f), valid_ratio=0.2, seed=1)
    assert one.valid["input_ids"] == build(word_tok, train_file=str(f), valid_ratio=0.2, seed=1).valid["input_ids"]
    assert one.valid["input_ids"] != build(word_tok, train_file=str(f), valid_ratio=0.2, seed=2).valid["input_ids"]


def test_valid_file_test_file_and_limits(tmp_path, word_tok):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(20))
    valid = write_jsonl(tmp_path / "valid.jsonl", alpaca_rows(10))
    test = write_jsonl(tmp_path / "test.jsonl", alpaca_rows(7))
    b = build(word_tok, train_file=str(train), valid_file=str(valid), test_file=str(test),
              max_samples=5, max_eval_samples=3)
    assert (len(b.train), len(b.valid), len(b.test)) == (5, 3, 7)
    assert b.stats["records"] == 37
    assert b.data_files == [train.resolve(), valid.resolve(), test.resolve()]


def test_no_validation_when_ratio_is_zero(tmp_path, word_tok):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(5))
    b = build(word_tok, train_file=str(f), valid_ratio=0.0)
    assert b.valid is None and len(b.train) == 5 and list(b.stats["splits"]) == ["train"]


def test_packing_packs_train_only(tmp_path, word_tok):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(50))
    plain = build(word_tok, train_file=str(f), valid_ratio=0.2, max_length=48)
    packed = build(word_tok, train_file=str(f), valid_ratio=0.2, max_length=48, packing=True)
    assert len(packed.train) < len(plain.train)
    assert max(len(r) for r in packed.train["input_ids"]) <= 48
    assert sum(packed.train["input_ids"], []) == sum(plain.train["input_ids"], [])
    assert sum(packed.train["labels"], []) == sum(plain.train["labels"], [])
    assert packed.valid["input_ids"] == plain.valid["input_ids"]
    assert packed.stats["splits"]["train"]["examples"] == len(plain.train)


def test_overlong_truncate_and_reject(tmp_path, word_tok):
    rows = alpaca_rows(10)
    rows[3]["output"] = " ".join(WORDS * 3)
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    b = build(word_tok, train_file=str(f), valid_ratio=0.0, max_length=32)
    assert b.stats["truncated"] == 1 and max(len(r) for r in b.train["input_ids"]) == 32
    with pytest.raises(DataError, match=r"a\.jsonl: 1 of 10 examples are longer than data\.max_length=32 "
                                        r"tokens \(lines 4\)"):
        build(word_tok, train_file=str(f), valid_ratio=0.0, max_length=32, overlong="reject")


def test_text_is_split_by_documents_then_blocked(tmp_path, word_tok):
    docs = [{"text": " ".join(WORDS[i:] + WORDS[:i])} for i in range(20)] + [{"text": "   "}]
    f = write_jsonl(tmp_path / "c.jsonl", docs)
    b = build(word_tok, train_file=str(f), valid_ratio=0.1, max_length=16, template="llama2")
    s = b.stats
    assert s["format"] == "text" and s["template"] is None
    assert s["splits"]["train"]["records"] + s["splits"]["valid"]["records"] == 21
    assert s["rejected"] == 1  # the blank document
    assert all(len(r) == 16 for r in b.train["input_ids"][:-1])
    assert b.train["labels"] == b.train["input_ids"]
    n_tokens = 20 * len(WORDS) + 20  # every document plus its EOS
    assert s["tokens"] == n_tokens


def test_single_txt_document_gets_a_validation_tail(tmp_path, word_tok):
    f = tmp_path / "t.txt"
    f.write_text("".join(f"the {w} is one\n" for w in WORDS))
    b = build(word_tok, train_file=str(f), valid_ratio=0.2, max_length=8)
    assert len(b.valid) >= 1 and len(b.train) > len(b.valid)


def test_chat_uses_the_tokenizer_template_when_there_is_one(tmp_path, word_tok, chat_tok):
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}] * 4
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    assert build(chat_tok, train_file=str(f), valid_ratio=0.25).stats["template"] == "tokenizer"
    assert build(word_tok, train_file=str(f), valid_ratio=0.25).stats["template"] == "llama2"


def test_forget_file_is_text_whatever_the_train_format(tmp_path, word_tok):
    train = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    forget = write_jsonl(tmp_path / "src.jsonl", [{"text": "the one of to"}] * 5)
    b = build(word_tok, train_file=str(train), forget_file=str(forget), format="alpaca", max_length=32)
    assert b.stats["splits"]["forget"]["format"] == "text" and len(b.forget) >= 1


def test_test_ratio_holds_out_a_third_disjoint_split(tmp_path, word_tok):
    f = tmp_path / "a.json"
    f.write_text(json.dumps(alpaca_rows(40)))
    b = build(word_tok, train_file=str(f), valid_ratio=0.1, test_ratio=0.25, max_length=64)
    assert (len(b.train), len(b.valid), len(b.test)) == (27, 3, 10)
    rows = lambda ds: {tuple(r) for r in ds["input_ids"]}  # noqa: E731
    assert not rows(b.test) & rows(b.train) and not rows(b.test) & rows(b.valid)
    assert b.stats["splits"]["test"]["file"] == str(f) and list(b.stats["splits"]) == ["train", "valid", "test"]
    # the same files and seed give the same test split; without test_ratio nothing is held out for it
    again = build(word_tok, train_file=str(f), valid_ratio=0.1, test_ratio=0.25, max_length=64)
    assert again.test["input_ids"] == b.test["input_ids"]
    assert build(word_tok, train_file=str(f), valid_ratio=0.1, max_length=64).test is None


def test_test_ratio_on_one_text_document_takes_its_tail(tmp_path, word_tok):
    f = tmp_path / "t.txt"
    f.write_text("".join(f"{WORDS[i % 20]} {WORDS[(i + 7) % 20]} {WORDS[(i + 3) % 20]}\n" for i in range(200)))
    b = build(word_tok, train_file=str(f), valid_ratio=0.1, test_ratio=0.1, max_length=16)
    s = b.stats["splits"]
    assert s["test"]["format"] == "text" and s["test"]["tokens"] > 0 and s["valid"]["tokens"] > 0
    assert s["train"]["tokens"] > 5 * s["test"]["tokens"]


def test_test_ratio_errors_name_the_key(tmp_path, word_tok):
    f = tmp_path / "a.json"
    f.write_text(json.dumps(alpaca_rows(1)))
    with pytest.raises(DataError, match=r"cannot be split by data\.test_ratio=0\.5: nothing would be left "
                                        r"to train on; add records or set data\.test_file"):
        build(word_tok, train_file=str(f), valid_ratio=0.0, test_ratio=0.5)


def test_forget_text_is_cut_to_max_eval_samples_rows_not_records(tmp_path, word_tok):
    # One long document blocks into many rows; a record cut alone would keep them all.
    train = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    forget = write_jsonl(tmp_path / "src.jsonl", [{"text": " ".join(WORDS * 20)}])
    full = build(word_tok, train_file=str(train), forget_file=str(forget), max_length=16)
    cut = build(word_tok, train_file=str(train), forget_file=str(forget), max_length=16, max_eval_samples=3)
    assert len(full.forget) > 3 and len(cut.forget) == 3
    assert cut.forget["input_ids"] == full.forget["input_ids"][:3]
    assert cut.stats["splits"]["forget"]["rows"] == 3
    assert cut.stats["splits"]["forget"]["tokens"] == sum(map(len, full.forget["input_ids"][:3]))


def test_collator_feeds_a_tiny_llama(tmp_path, word_tok, tiny_llama):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(8))
    b = build(word_tok, train_file=str(f), valid_ratio=0.0)
    batch = b.collator()([b.train[i] for i in range(4)])
    model = tiny_llama(vocab_size=len(word_tok), num_key_value_heads=4)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


@pytest.mark.parametrize("kw, message", [
    ({"train_file": ""}, r"data\.train_file is not set"),
    ({"train_file": "missing.jsonl"}, r"missing\.jsonl: not found"),
    ({"train_file": "x.jsonl", "max_samples": 0}, r"data\.max_samples: 0 is not valid"),
])
def test_config_errors(word_tok, kw, message):
    with pytest.raises(DataError, match=message):
        build(word_tok, **kw)


def test_a_split_with_nothing_usable_is_an_error(tmp_path, word_tok):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    with pytest.raises(DataError, match=r"the train split has no usable example"):
        build(word_tok, train_file=str(f), valid_ratio=0.0, max_length=3)  # responses all cut away


def test_real_gsm8k_test_file(sp_tok):
    f = SHARED / "bench" / "gsm8k_test.jsonl"
    b = build(sp_tok, train_file=str(f), valid_ratio=0.1, max_length=1024, max_samples=100)
    assert b.stats["format"] == "alpaca" and b.stats["records"] == 1319
    assert (len(b.train), len(b.valid)) == (100, 132)
    row = b.train[0]
    response = sp_tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX])
    assert "####" in response and "[/INST]" not in response
