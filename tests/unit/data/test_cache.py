"""cache.py: a bundle is built once per (data config, tokenizer, files) in a process."""

from __future__ import annotations

import json
import os

import pytest

from dirtune.data import cache
from dirtune.train.config import DataConfig


@pytest.fixture()
def saved_tok(tmp_path, word_tok):
    from transformers import AutoTokenizer

    word_tok.save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


@pytest.fixture(autouse=True)
def empty_cache():
    cache.clear()
    yield
    cache.clear()


def _rows(n, word="the"):
    return [{"instruction": f"{word} a", "output": "of to and"} for _ in range(n)]


def test_same_key_same_bundle_and_any_change_rebuilds(tmp_path, saved_tok):
    f = tmp_path / "a.json"
    f.write_text(json.dumps(_rows(20)))
    web = tmp_path / "web.txt"
    web.write_text("the a of to and is in it " * 20)
    cfg = DataConfig(train_file=str(f), forget_files=[f"web={web}"], max_length=32)
    first = cache.build_datasets_cached(cfg, saved_tok)
    assert cache.build_datasets_cached(DataConfig(**vars(cfg)), saved_tok) is first
    assert cache.build_datasets_cached(DataConfig(**{**vars(cfg), "max_length": 16}), saved_tok) is not first
    # an edited forget file is read again (its size and modification time are in the key)
    web.write_text("you that he was for on " * 20)
    os.utime(web, ns=(1, 1))
    again = cache.build_datasets_cached(cfg, saved_tok)
    assert again is not first and again.forget_sets["web"]["input_ids"] != first.forget_sets["web"]["input_ids"]


def test_a_tokenizer_without_a_folder_is_not_cached(tmp_path, word_tok):
    f = tmp_path / "a.json"
    f.write_text(json.dumps(_rows(20)))
    cfg = DataConfig(train_file=str(f), max_length=32)
    assert cache.build_datasets_cached(cfg, word_tok) is not cache.build_datasets_cached(cfg, word_tok)


def test_only_the_last_few_are_kept(tmp_path, saved_tok):
    f = tmp_path / "a.json"
    f.write_text(json.dumps(_rows(20)))
    built = [cache.build_datasets_cached(DataConfig(train_file=str(f), max_length=16 + i), saved_tok)
             for i in range(cache.KEEP + 1)]
    assert cache.build_datasets_cached(DataConfig(train_file=str(f), max_length=16 + cache.KEEP), saved_tok) is built[-1]
    assert cache.build_datasets_cached(DataConfig(train_file=str(f), max_length=16), saved_tok) is not built[0]


def test_several_training_files_are_all_in_the_key(tmp_path, saved_tok):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_rows(10)))
    b.write_text(json.dumps(_rows(10, "a")))
    cfg = DataConfig(train_file=[str(a), str(b)], max_length=32)
    first = cache.build_datasets_cached(cfg, saved_tok)
    assert cache.build_datasets_cached(cfg, saved_tok) is first
    b.write_text(json.dumps(_rows(12, "a")))
    os.utime(b, ns=(1, 1))
    assert cache.build_datasets_cached(cfg, saved_tok) is not first
