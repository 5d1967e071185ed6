"""tables.py and data.columns: parquet and arrow files, save_to_disk folders, and a record
template for a user's own field names."""

from __future__ import annotations

import json

import pytest

from dirtune.data import DataError, build_datasets
from dirtune.data.records import Alpaca, Chat, file_kind, load_examples, read_records
from dirtune.train.config import ConfigError, DataConfig, load_config

QA = [{"question": "the a", "answer": "of to"}, {"question": "and is", "answer": "in it"},
      {"question": "you that", "answer": "he was"}]


def parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_parquet_rows_are_records_numbered_by_row(tmp_path):
    p = parquet(tmp_path / "qa.parquet", QA)
    records = read_records(p)
    assert [r.fields for r in records] == QA and [r.at for r in records] == ["row 1", "row 2", "row 3"]
    fmt, examples = load_examples(p)
    assert fmt == "alpaca" and examples[1] == Alpaca("and is", "", "in it", 2)


def test_arrow_file_in_both_layouts_and_a_saved_dataset(tmp_path):
    import datasets
    import pyarrow as pa

    ds = datasets.Dataset.from_list(QA)
    ds.save_to_disk(str(tmp_path / "saved"))
    streamed = next((tmp_path / "saved").glob("*.arrow"))  # what datasets writes
    table = pa.Table.from_pylist(QA)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink:  # the Arrow IPC file layout
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    for path in (streamed, tmp_path / "file.arrow", tmp_path / "saved"):
        assert [r.fields for r in read_records(path)] == QA, path
    assert file_kind(tmp_path / "saved") == "saved"


def test_errors_in_a_table_name_the_row(tmp_path):
    p = parquet(tmp_path / "bad.parquet", QA[:2] + [{"question": "x", "answer": None}])
    with pytest.raises(DataError, match=r"bad\.parquet: row 3: missing field 'answer'"):
        load_examples(p)


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "is a directory, not a data file; accepted: .json, .jsonl, .txt, .parquet, .arrow"),
    (lambda d: (d / "x.parquet").write_text("not parquet") and d / "x.parquet", "cannot be read as parquet"),
    (lambda d: (d / "x.csv").write_text("a,b") and d / "x.csv", "unsupported file type; accepted: .json"),
])
def test_what_is_wrong_with_a_path_is_named(tmp_path, make, message):
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        read_records(make(tmp_path))


def test_a_saved_dataset_dict_asks_for_one_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(QA)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: holds several splits \(train\); give one split's folder"):
        read_records(tmp_path / "dd")


# ---------------------------------------------------------------- data.columns

def test_columns_map_a_users_field_names(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("".join(json.dumps({"prompt": q["question"], "response": q["answer"], "ctx": "x"}) + "\n"
                         for q in QA))
    cols = {"instruction": "prompt", "output": "response", "input": "ctx"}
    fmt, examples = load_examples(p, columns=cols)
    assert fmt == "alpaca" and examples[0] == Alpaca("the a", "x", "of to", 1)
    with pytest.raises(DataError, match=r"line 1: cannot tell the format from the keys \('prompt', 'response', "
                                        r"'ctx'\); accepted: .*or name your fields with data\.columns"):
        load_examples(p)


def test_columns_map_sharegpt_conversations(tmp_path):
    p = tmp_path / "sharegpt.json"
    p.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]))
    cols = {"messages": "conversations", "role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    fmt, examples = load_examples(p, columns=cols)
    assert fmt == "chat" and examples == [Chat((("user", "hi"), ("assistant", "yo")), 1)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "bot", "value": "hi"}]}]))
    with pytest.raises(DataError, match=r"line 1: conversations\[0\]: from 'bot' is not valid; accepted: "
                                        r"system, human, gpt"):
        load_examples(bad, columns=cols)


def test_a_missing_mapped_field_names_the_users_name_and_the_key(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(DataError, match=r"mine\.jsonl: line 2: missing field 'response' \(data\.columns\.output; "):
        load_examples(p, columns={"instruction": "prompt", "output": "response"})


def test_columns_through_the_config_and_the_pipeline(tmp_path, word_tok):
    p = parquet(tmp_path / "mine.parquet", [{"q": r["question"], "a": r["answer"]} for r in QA * 4])
    cfg = load_config(None, [f"data.train_file={p}", "data.columns={instruction: q, output: a}",
                             "data.valid_ratio=0.25", "data.template=plain"])
    bundle = build_datasets(cfg.data, word_tok)
    assert (len(bundle.train), len(bundle.valid)) == (9, 3) and bundle.stats["format"] == "alpaca"
    assert bundle.data_files == [p.resolve()]


@pytest.mark.parametrize("override, message", [
    ("data.columns={prompt: q}", "data.columns: key 'prompt' is not known; accepted: instruction, input, output"),
    ("data.columns={outptu: a}", "data.columns: key 'outptu' is not known (did you mean 'output'?)"),
    ("data.columns={output: ''}", "data.columns.output: '' is not valid; expected the field name your files use"),
    ("data.columns=[q, a]", "data.columns: ['q', 'a'] is not valid; expected mapping of str to str"),
])
def test_bad_columns_are_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_a_saved_dataset_folder_is_hashed_file_by_file(tmp_path, word_tok):
    import datasets

    datasets.Dataset.from_list(QA * 3).save_to_disk(str(tmp_path / "saved"))
    bundle = build_datasets(DataConfig(train_file=str(tmp_path / "saved"), valid_ratio=0.0), word_tok)
    assert len(bundle.train) == 9
    assert bundle.data_files and all(f.is_file() and f.parent == (tmp_path / "saved").resolve()
                                     for f in bundle.data_files)
