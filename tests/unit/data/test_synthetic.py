import json

import pytest

from dirtune.data.synthetic import (
    SPECIAL_TOKENS,
    char_tokenizer,
    make_world,
    source_paragraphs,
    task_records,
    write_demo_data,
)

SMALL = dict(n_people=12, n_source_train=120, n_source_valid=20)
NAMES = ["source_train", "source_valid", "task_train", "task_valid", "task_test"]


def _read_all(paths):
    return {k: paths[k].read_bytes() for k in NAMES}


def test_files_written_and_deterministic(tmp_path):
    a = write_demo_data(tmp_path / "a", seed=3, **SMALL)
    b = write_demo_data(tmp_path / "b", seed=3, **SMALL)
    c = write_demo_data(tmp_path / "c", seed=4, **SMALL)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        ["source_train.txt", "source_valid.txt", "task_train.jsonl", "task_valid.jsonl", "task_test.jsonl"])
    assert _read_all(a) == _read_all(b)
    assert _read_all(a) != _read_all(c)
    lines = a["source_train"].read_text().splitlines()
    assert len(lines) == 120 and all(lines)


def test_source_splits_disjoint(tmp_path):
    paths = write_demo_data(tmp_path, seed=0, **SMALL)
    train = set(paths["source_train"].read_text().splitlines())
    valid = paths["source_valid"].read_text().splitlines()
    assert len(valid) == 20 and not train & set(valid)


def test_task_splits_disjoint_by_person_and_alpaca_shaped(tmp_path):
    paths = write_demo_data(tmp_path, seed=1, **SMALL)
    world = make_world(12, seed=1)
    names = {p.name for p in world.people}
    who = {}
    for split in ("task_train", "task_valid", "task_test"):
        recs = [json.loads(line) for line in paths[split].read_text().splitlines()]
        assert recs and all(set(r) == {"instruction", "input", "output"} for r in recs)
        who[split] = {n for r in recs for n in names if n in r["instruction"] + r["input"]}
    assert who["task_train"] and who["task_valid"] and who["task_test"]
    assert not who["task_train"] & who["task_valid"]
    assert not who["task_train"] & who["task_test"]
    assert not who["task_valid"] & who["task_test"]


def test_task_answers_are_the_world_facts():
    world = make_world(6, seed=2)
    p = world.people[0]
    recs = task_records([p])
    answers = {r["output"] for r in recs}
    assert {p.town, p.trade, p.colour, p.pet, p.friend} <= answers
    assert any(f"town: {p.town}" in r["output"] for r in recs)
    assert all(q.friend != q.name for q in world.people)


def test_source_mentions_facts_and_checks_sizes(tmp_path):
    world = make_world(4, seed=0)
    paras = source_paragraphs(world, 30, seed=0)
    assert len(set(paras)) == 30
    assert all(p.name in " ".join(paras) for p in world.people)
    assert any(f"{p.name} lives in {p.town}." in paras_i for p in world.people for paras_i in paras)
    with pytest.raises(ValueError, match="n_people"):
        make_world(1)
    with pytest.raises(ValueError, match="too small"):
        write_demo_data(tmp_path / "x", n_people=3, valid_share=0.5, test_share=0.5)
    assert not (tmp_path / "x").exists()  # nothing written on a refused request


def test_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer()
    assert len(tok) < 200
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == 3 and tok.convert_ids_to_tokens([0, 1, 2, 3]) == SPECIAL_TOKENS
    text = "Kulor keeps a horse.\n[INST] Where does Kulor live? [/INST] Thimholt  ~{x}"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and 0 not in ids and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("é")["input_ids"] == [1, 0]  # outside the alphabet: <unk>

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 3)
    assert again.decode(ids, skip_special_tokens=True) == text
