"""Property-based tests (hypothesis): any bytes either load or raise DataError; valid records
round-trip with their count, fields and an exact loss mask."""

from __future__ import annotations

import json
import lzma
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dirtune.data.records import Alpaca, Chat, DataError, load_examples, records_from_bytes, to_examples
from dirtune.data.splits import split_indices
from dirtune.data.templates import render
from dirtune.data.tokenize import IGNORE_INDEX, encode_examples, pack

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORDS = ["the", "a", "of", "to", "hello", "world", "answer", "[INST]", "</s>", "<s>", "###", "\n", ":"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
field_names = st.sampled_from(["instruction", "input", "output", "messages", "text", "question", "answer",
                               "role", "content", "other"])
records = st.dictionaries(field_names, json_values | st.text(max_size=10), max_size=5)
# text that tokenizers see: known words mixed with arbitrary characters (never lone surrogates)
texts = st.lists(st.sampled_from(WORDS) | st.text(max_size=6), max_size=8).map(" ".join)


def ids_of(tok, text: str) -> list[int]:
    """Plain ids of text, '</s>' written in it staying text (as the pipeline encodes user data)."""
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def load(raw: bytes, kind: str = "json"):
    """What the pipeline does with a file's bytes before tokenising."""
    return to_examples(records_from_bytes(raw, "f.jsonl", kind), "f.jsonl", is_txt=kind == "text")


def loads_or_data_error(raw: bytes, kind: str = "json"):
    try:
        return load(raw, kind)
    except DataError:
        return None


def mutate(raw: bytes, edits) -> bytes:
    data = bytearray(raw)
    for where, op, byte in edits:
        i = where % (len(data) + 1)
        if op == 0:
            data.insert(i, byte)
        elif op == 1 and i < len(data):
            del data[i]
        elif i < len(data):
            data[i] = byte
    return bytes(data)


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2), st.integers(0, 255)), min_size=1, max_size=6)


@FAST
@given(st.binary(max_size=300), st.sampled_from(["json", "text"]))
def test_random_bytes_load_or_raise_data_error(raw, kind):
    loads_or_data_error(raw, kind)


@FAST
@given(st.lists(records, min_size=1, max_size=4), edits, st.booleans())
def test_mutated_files_load_or_raise_data_error(rows, changes, as_array):
    raw = (json.dumps(rows, indent=1) if as_array else "".join(json.dumps(r) + "\n" for r in rows)).encode()
    loads_or_data_error(mutate(raw, changes))


@FAST
@given(st.lists(records, min_size=1, max_size=4), st.sampled_from(["auto", "alpaca", "chat", "text"]))
def test_arbitrary_records_check_render_and_encode_or_raise_data_error(word_tok, rows, fmt):
    raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    try:
        fmt, examples = to_examples(records_from_bytes(raw, "f.jsonl", "json"), "f.jsonl", fmt)
        if fmt != "text":
            encode_examples(word_tok, [render(e, "llama2", word_tok, "f.jsonl") for e in examples])
    except DataError:
        pass


@settings(max_examples=50, deadline=None)
@given(st.lists(records, min_size=1, max_size=3), edits)
def test_mutated_xz_files_load_or_raise_data_error(rows, changes):
    raw = mutate(lzma.compress("".join(json.dumps(r) + "\n" for r in rows).encode()), changes)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.jsonl.xz"
        path.write_bytes(raw)
        try:
            load_examples(path)
        except DataError:
            pass


alpaca_records = st.builds(lambda i, x, o: {"instruction": i, "input": x, "output": o}, texts, texts, texts).filter(
    lambda r: any(v.strip() for v in r.values()))  # an all-empty record is refused (test_records)


@FAST
@given(st.lists(alpaca_records, min_size=1, max_size=6), st.booleans(), st.booleans())
def test_valid_alpaca_round_trips(word_tok, rows, as_array, ascii_only):
    if as_array:
        raw = json.dumps(rows, indent=2, ensure_ascii=ascii_only).encode()
    else:
        raw = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows).encode()
    fmt, examples = load(raw)
    assert fmt == "alpaca" and len(examples) == len(rows)
    assert [(e.instruction, e.input, e.output) for e in examples] == [tuple(r.values()) for r in rows]
    assert [e.line for e in examples] == sorted({e.line for e in examples})
    check_alpaca_masks(word_tok, examples)


def check_alpaca_masks(tok, examples):
    pairs = encode_examples(tok, [render(e, "llama2") for e in examples])
    for e, (ids, labels) in zip(examples, pairs):
        assert len(ids) == len(labels)
        assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
        n_labelled = sum(lab != IGNORE_INDEX for lab in labels)
        response = ids_of(tok, e.output.strip())
        assert n_labelled == len(response) + 1  # the response and its EOS
        assert labels[-n_labelled:] == response + [tok.eos_token_id]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.builds(Alpaca, texts, texts, texts, st.just(1)), min_size=1, max_size=4))
def test_sentencepiece_masks_are_the_response_and_eos(sp_tok, examples):
    check_alpaca_masks(sp_tok, examples)


turns = st.lists(st.tuples(texts, texts), min_size=1, max_size=3)


@FAST
@given(st.one_of(st.none(), texts), turns)
def test_chat_labels_are_the_assistant_turns(word_tok, system, pairs):
    messages = ([("system", system)] if system is not None else [])
    messages += [m for user, assistant in pairs for m in (("user", user), ("assistant", assistant))]
    assume(any(c.strip() for _, c in messages))  # an all-empty record is refused (test_records)
    raw = json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]}).encode()
    fmt, [chat] = load(raw)
    assert fmt == "chat" and chat == Chat(tuple(messages), 1)
    [(ids, labels)] = encode_examples(word_tok, [render(chat, "llama2")])
    expected = [t for _, a in pairs for t in ids_of(word_tok, a.strip()) + [word_tok.eos_token_id]]
    assert [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX] == expected


@FAST
@given(st.integers(1, 300), st.floats(0, 0.99), st.integers(0, 2**32 - 1))
def test_split_is_a_partition_with_a_nonempty_validation_part(n, ratio, seed):
    try:
        train, valid = split_indices(n, ratio, seed)
    except DataError:
        assume(False)
        return
    assert sorted(train + valid) == list(range(n)) and train
    assert (len(valid) >= 1) == (ratio > 0)


@FAST
@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=10), min_size=1, max_size=20),
       st.integers(10, 40))
def test_pack_preserves_tokens_and_bounds_rows(examples, max_length):
    pairs = [(ids, [-100] + ids[1:]) for ids in examples]
    rows = pack(pairs, max_length)
    assert all(len(ids) <= max_length for ids, _ in rows)
    assert [t for ids, _ in rows for t in ids] == [t for ids, _ in pairs for t in ids]
    assert [t for _, lab in rows for t in lab] == [t for _, lab in pairs for t in lab]
