"""records.py: files -> records -> checked examples, and the DataError for each kind of bad input."""

from __future__ import annotations

import json
import lzma
import re
from pathlib import Path

import pytest

from dirtune.data.records import (Alpaca, Chat, DataError, Text, file_kind, load_examples, read_records,
                                  records_from_bytes, to_examples)

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
ALPACA = [{"instruction": "say hi", "input": "", "output": "hi"},
          {"instruction": "add", "input": "1 2", "output": "3", "extra": [1]}]


def write(tmp_path, name, data: bytes | str):
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------- reading files

@pytest.mark.parametrize("name, kind", [("a.json", "json"), ("a.JSONL", "json"), ("a.jsonl.xz", "json"),
                                        ("a.txt", "text"), ("a.txt.xz", "text")])
def test_file_kind(name, kind):
    assert file_kind(name) == kind


def test_file_kind_rejects_other_suffixes():
    with pytest.raises(DataError, match=r"a\.csv: unsupported file type; accepted: \.json, \.jsonl, \.txt"):
        file_kind("a.csv")


def test_json_array_records_carry_their_lines(tmp_path):
    p = write(tmp_path, "a.json", json.dumps(ALPACA, indent=2))
    records = read_records(p)
    assert [r.fields["instruction"] for r in records] == ["say hi", "add"]
    assert [r.line for r in records] == [2, 7]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    p = write(tmp_path, "a.jsonl", "\n" + json.dumps(ALPACA[0]) + "\n\n" + json.dumps(ALPACA[1]) + "\n")
    assert [r.line for r in read_records(p)] == [2, 4]


def test_json_suffix_with_one_object_per_line_is_read_as_jsonl(tmp_path):
    p = write(tmp_path, "a.json", jsonl(ALPACA))
    assert len(read_records(p)) == 2


def test_xz_files_are_decompressed(tmp_path):
    p = write(tmp_path, "a.jsonl.xz", lzma.compress(jsonl([{"text": "doc one"}, {"text": "doc two"}]).encode()))
    fmt, examples = load_examples(p)
    assert fmt == "text" and [e.text for e in examples] == ["doc one", "doc two"]


def test_txt_is_one_document(tmp_path):
    p = write(tmp_path, "a.txt", "line one\nline two\n")
    fmt, examples = load_examples(p)
    assert fmt == "text" and examples == [Text("line one\nline two\n", 1)]


def test_byte_order_mark_is_ignored(tmp_path):
    p = write(tmp_path, "a.jsonl", b"\xef\xbb\xbf" + jsonl(ALPACA).encode())
    assert len(read_records(p)) == 2


# ---------------------------------------------------------------- errors while reading

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: not found"):
        read_records(tmp_path / "nope.json")


def test_directory(tmp_path):
    (tmp_path / "d.json").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        read_records(tmp_path / "d.json")


@pytest.mark.parametrize("content", ["", "  \n\n", "[]", "[ \n ]\n"])
def test_empty_files(tmp_path, content):
    p = write(tmp_path, "a.json", content)
    with pytest.raises(DataError, match=r"a\.json: empty, no records"):
        read_records(p)


def test_bad_json_line_names_the_line(tmp_path):
    p = write(tmp_path, "a.jsonl", json.dumps(ALPACA[0]) + "\n{\"instruction\": oops}\n")
    with pytest.raises(DataError, match=r"a\.jsonl: line 2: not valid JSON: Expecting value"):
        read_records(p)


def test_bad_record_inside_a_json_array_names_its_line(tmp_path):
    text = json.dumps(ALPACA, indent=2).replace('"3"', "3,,")
    p = write(tmp_path, "a.json", text)
    bad_line = text.splitlines().index(next(s for s in text.splitlines() if ",," in s)) + 1
    with pytest.raises(DataError, match=rf"a\.json: line {bad_line}: not valid JSON"):
        read_records(p)


@pytest.mark.parametrize("content, message", [
    ('[{"a": 1}', r"line 1: not valid JSON: the array is not closed"),
    ('[{"a": 1} {"b": 2}]', r"line 1: not valid JSON: expected ',' or '\]' after a record"),
    ('[{"a": 1}]\n[2]', r"line 2: not valid JSON: extra data after the closing '\]'"),
    ('[{"a": 1},\n 7]', r"line 2: expected a JSON object \(one record\), got a number"),
    ('{"a": 1}\n[1, 2]', r"line 2: expected one JSON object per line, got an array"),
    ('{\n "instruction": "x",\n "output": "y"\n}', r"holds a single JSON object over several lines"),
    ("[" * 50000, r"line 1: not valid JSON: nested too deeply"),
])
def test_json_structure_errors(tmp_path, content, message):
    p = write(tmp_path, "a.json", content)
    with pytest.raises(DataError, match=message):
        read_records(p)


def test_non_utf8_names_line_byte_and_column(tmp_path):
    p = write(tmp_path, "a.jsonl", jsonl(ALPACA).encode() + b'{"text": "ab\xffc"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl: line 3: not UTF-8 text \(byte 0xff at column 13\)"):
        read_records(p)


def test_non_utf8_in_txt(tmp_path):
    p = write(tmp_path, "a.txt", b"fine\nfine\nbad \xc3(\n")
    with pytest.raises(DataError, match=r"a\.txt: line 3: not UTF-8 text \(byte 0xc3 at column 5\)"):
        read_records(p)


def test_corrupt_xz(tmp_path):
    p = write(tmp_path, "a.jsonl.xz", lzma.compress(b'{"text": "x"}\n')[:-8])
    with pytest.raises(DataError, match=r"a\.jsonl\.xz: not a valid \.xz file"):
        read_records(p)


# ---------------------------------------------------------------- formats

def test_alpaca_examples_with_optional_input_and_extra_fields():
    records = records_from_bytes(jsonl(ALPACA + [{"instruction": "i", "output": "o", "input": None}]).encode(),
                                 "f.jsonl", "json")
    fmt, examples = to_examples(records, "f.jsonl")
    assert fmt == "alpaca"
    assert examples == [Alpaca("say hi", "", "hi", 1), Alpaca("add", "1 2", "3", 2), Alpaca("i", "", "o", 3)]


def test_gsm8k_question_answer_becomes_alpaca():
    rows = [{"question": "1+1?", "answer": "2\n#### 2"}]
    fmt, examples = to_examples(records_from_bytes(jsonl(rows).encode(), "g.jsonl", "json"), "g.jsonl")
    assert fmt == "alpaca" and examples == [Alpaca("1+1?", "", "2\n#### 2", 1)]


def test_gsm8k_missing_answer_names_gsm8k_fields():
    rows = [{"question": "a", "answer": "b"}, {"question": "c"}]
    with pytest.raises(DataError, match=r"line 2: missing field 'answer' \(GSM8K records need question, answer\)"):
        to_examples(records_from_bytes(jsonl(rows).encode(), "g.jsonl", "json"), "g.jsonl")


def test_chat_examples():
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a", "name": "bot"}]}]
    fmt, examples = to_examples(records_from_bytes(jsonl(rows).encode(), "c.jsonl", "json"), "c.jsonl")
    assert fmt == "chat"
    assert examples == [Chat((("system", "s"), ("user", "u"), ("assistant", "a")), 1)]


@pytest.mark.parametrize("row, message", [
    ({"instruction": "x", "input": ""}, r"line 1: missing field 'output' \(alpaca records need instruction, "
                                        r"output; input optional\)"),
    ({"instruction": "x", "output": 3}, r"line 1: field 'output' must be a string, got a number"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, r"line 1: field 'input' must be a string, got an array"),
    ({"instruction": "x", "output": "\ud800"}, r"line 1: field 'output' holds a lone surrogate \\ud800"),
])
def test_alpaca_field_errors(row, message):
    records = records_from_bytes(jsonl([row]).encode(), "f.jsonl", "json")
    with pytest.raises(DataError, match=r"f\.jsonl: " + message):
        to_examples(records, "f.jsonl")


@pytest.mark.parametrize("messages, message", [
    ("hi", r"field 'messages' must be a non-empty list of \{role, content\} objects, got a string"),
    ([], r"field 'messages' must be a non-empty list"),
    (["hi"], r"messages\[0\] must be an object \{role, content\}, got a string"),
    ([{"role": "bot", "content": "x"}], r"messages\[0\]: role 'bot' is not valid; accepted: system, user, assistant"),
    ([{"role": "user"}], r"messages\[0\]: missing field 'content'"),
    ([{"role": "user", "content": 1}], r"field 'messages\[0\]\.content' must be a string, got a number"),
    ([{"role": "user", "content": "x"}], r"no assistant message; chat records need at least one"),
])
def test_chat_field_errors(messages, message):
    records = records_from_bytes(jsonl([{"messages": messages}]).encode(), "c.jsonl", "json")
    with pytest.raises(DataError, match=r"c\.jsonl: line 1: " + message):
        to_examples(records, "c.jsonl")


def test_unknown_keys_name_the_keys_and_the_accepted_sets():
    records = records_from_bytes(jsonl([{"prompt": "a", "completion": "b"}]).encode(), "f.jsonl", "json")
    with pytest.raises(DataError, match=r"f\.jsonl: line 1: cannot tell the format from the keys "
                                        r"\('prompt', 'completion'\); accepted: 'messages' \(chat\)"):
        to_examples(records, "f.jsonl")


def test_explicit_format_checks_every_record_against_it():
    records = records_from_bytes(jsonl(ALPACA).encode(), "f.jsonl", "json")
    with pytest.raises(DataError, match=r"line 1: missing field 'messages'"):
        to_examples(records, "f.jsonl", "chat")
    assert to_examples(records, "f.jsonl", "alpaca")[0] == "alpaca"


def test_txt_refuses_instruction_formats(tmp_path):
    p = write(tmp_path, "a.txt", "some text")
    with pytest.raises(DataError, match=r"a\.txt: a \.txt file holds plain text; format 'alpaca' needs"):
        load_examples(p, "alpaca")


def test_text_field_must_be_a_string():
    records = records_from_bytes(jsonl([{"text": "a"}, {"text": None}]).encode(), "t.jsonl", "json")
    with pytest.raises(DataError, match=r"t\.jsonl: line 2: missing field 'text'"):
        to_examples(records, "t.jsonl")


def test_real_alpaca_demo_file_loads():
    p = SHARED / "bench" / "alpaca_en_demo.json"
    if not p.is_file():
        pytest.skip("../shared is not beside the checkout")
    fmt, examples = load_examples(p)
    assert fmt == "alpaca" and len(examples) == 999
    assert examples[1].line > examples[0].line


@pytest.mark.parametrize("row, message", [
    ({"instruction": "", "input": "", "output": ""}, "all its fields (instruction, input, output) are empty"),
    ({"instruction": " ", "output": "\n\t"}, "all its fields (instruction, input, output) are empty"),
    ({"question": "", "answer": ""}, "all its fields (instruction, input, output) are empty"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}]},
     "all its message contents are empty"),
])
def test_a_record_with_every_field_empty_is_refused_naming_its_line(row, message):
    """issue 13: such a record trained on the end-of-sequence token alone, without a word."""
    rows = [{"instruction": "a", "output": "b"} if "messages" not in row else
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, row]
    if "question" in row:
        rows[0] = {"question": "a", "answer": "b"}
    records = records_from_bytes(jsonl(rows).encode(), "f.jsonl", "json")
    with pytest.raises(DataError, match=rf"f\.jsonl: line 2: {re.escape(message)}; there is nothing to train on"):
        to_examples(records, "f.jsonl")


def test_a_record_with_only_a_response_is_still_fine():
    records = records_from_bytes(jsonl([{"instruction": "", "output": "b"}]).encode(), "f.jsonl", "json")
    assert to_examples(records, "f.jsonl")[1][0].output == "b"
