"""Reading data files into records and checking them, with errors that name the file and line.

A *record* is one JSON object (or one whole .txt document) and the line it starts on. A record
becomes an *example* of one format once its fields are checked:

    alpaca  {instruction: str, input?: str, output: str}          -> Alpaca
            {question: str, answer: str}  (GSM8K, read as alpaca)  -> Alpaca
    chat    {messages: [{role: system|user|assistant, content: str}, ...]}  -> Chat
    text    {text: str}, or a whole .txt file                      -> Text

Extra fields are ignored. We read and check the files ourselves instead of calling
`datasets.load_dataset("json")`: its loader (pyarrow) reports a bad line without the file's
line number, infers a schema from the first rows and fails on a later row of another shape, and
cannot name the missing field. The checked examples are turned into `datasets.Dataset`s later,
after tokenisation (`pipeline.py`).

Accepted files: .json (an array of objects, or one object per line), .jsonl, .txt, each
optionally compressed as .xz; and tables read through `datasets` (tables.py): .parquet, .arrow,
and folders written by `Dataset.save_to_disk`, whose records are numbered by row. A record
template (`columns`) maps the field names above to the names a user's files use. Every problem
raises `DataError`, never another exception.
"""

from __future__ import annotations

import json
import lzma
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from dirtune.data.errors import DataError


@dataclass(frozen=True)
class Record:
    fields: dict
    line: int  # 1-based line of the file where the record starts (row, for a table)
    unit: str = "line"

    @property
    def at(self) -> str:
        """Where the record is, for messages: 'line 3', or 'row 3' in a table."""
        return f"{self.unit} {self.line}"


@dataclass(frozen=True)
class Alpaca:
    instruction: str
    input: str
    output: str
    line: int


@dataclass(frozen=True)
class Chat:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, in order
    line: int


@dataclass(frozen=True)
class Text:
    text: str
    line: int


Example = Union[Alpaca, Chat, Text]
FORMATS = ("alpaca", "chat", "text")
ROLES = ("system", "user", "assistant")
ACCEPTED_FIELDS = ("'messages' (chat), 'instruction' + 'output' (alpaca), "
                   "'question' + 'answer' (GSM8K, read as alpaca), 'text' (text)")
ACCEPTED_FILES = ".json, .jsonl, .txt, .parquet, .arrow (the first three may be .xz-compressed)"
# data.columns keys: our field names, the names inside a message, and the role values
COLUMN_KEYS = ("instruction", "input", "output", "messages", "text", "role", "content",
               "system", "user", "assistant")
Columns = dict[str, str]
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


# ---------------------------------------------------------------- files -> records

def file_kind(path: str | Path) -> str:
    """'json' for .json/.jsonl, 'text' for .txt (a trailing .xz is allowed), 'parquet', 'arrow',
    'saved' for a save_to_disk folder; else DataError naming what the path is."""
    p = Path(path)
    if p.is_dir():
        from dirtune.data.tables import is_saved_dataset

        if is_saved_dataset(p):
            return "saved"
        raise DataError(f"{p}: is a directory, not a data file; accepted: {ACCEPTED_FILES}; "
                        "or a folder written by datasets' save_to_disk")
    name = p.name.lower()
    if name.endswith((".parquet", ".arrow")):
        return name.rsplit(".", 1)[1]
    if name.endswith(".xz"):
        name = name[:-3]
    if name.endswith((".json", ".jsonl")):
        return "json"
    if name.endswith(".txt"):
        return "text"
    raise DataError(f"{path}: unsupported file type; accepted: {ACCEPTED_FILES}")


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, decompressed when the name ends in .xz."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: not found")
    if p.is_dir():
        raise DataError(f"{p}: is a directory; expected a data file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot be read ({e.strerror})") from None
    if p.name.lower().endswith(".xz"):
        try:
            raw = lzma.decompress(raw)
        except (lzma.LZMAError, EOFError) as e:
            raise DataError(f"{p}: not a valid .xz file ({e})") from None
    return raw


def read_records(path: str | Path) -> list[Record]:
    """All records of one file, in file order; DataError if there is none."""
    if not Path(path).exists():
        raise DataError(f"{path}: not found")
    kind = file_kind(path)
    if kind in ("parquet", "arrow", "saved"):
        from dirtune.data.tables import table_rows

        return [Record(row, i, "row") for i, row in enumerate(table_rows(path, kind), start=1)]
    return records_from_bytes(read_bytes(path), path, kind)


def records_from_bytes(raw: bytes, source: str | Path, kind: str) -> list[Record]:
    """Records from the bytes of a file of `kind` ('json' or 'text'); `source` names it in errors."""
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, written by some editors
        raw = raw[3:]
    if not raw.strip():
        raise DataError(f"{source}: empty, no records")
    if kind == "text":
        return [Record({"text": _decode(raw, source)}, 1)]
    if raw.lstrip()[:1] == b"[":
        records = _json_array(_decode(raw, source), source)
    else:
        records = _json_lines(raw, source)
    if not records:
        raise DataError(f"{source}: empty, no records")
    return records


def _decode(raw: bytes, source: str | Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{source}: line {line}: not UTF-8 text "
                        f"(byte 0x{raw[e.start]:02x} at column {column})") from None


def _kind_of(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "null")


def _json_array(text: str, source: str | Path) -> list[Record]:
    """Parse `[ {...}, {...} ]` one element at a time so each record knows its line."""
    decoder = json.JSONDecoder()
    records: list[Record] = []
    line, seen = 1, 0  # line number of position `seen`, advanced incrementally
    i = _WS.match(text, text.index("[") + 1).end()
    if text.startswith("]", i):  # "[]"
        return _close_array(text, i, source, records)
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: line {e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # e.g. a 5000-digit integer, or [[[[... nested too deep
            raise DataError(f"{source}: line {_line_at(text, i)}: not valid JSON: {_short(e)}") from None
        line += text.count("\n", seen, i)
        seen = i
        if not isinstance(obj, dict):
            raise DataError(f"{source}: line {line}: expected a JSON object (one record), got {_kind_of(obj)}")
        records.append(Record(obj, line))
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif text.startswith("]", i):
            return _close_array(text, i, source, records)
        else:
            what = "the array is not closed with ']'" if i >= len(text) else "expected ',' or ']' after a record"
            raise DataError(f"{source}: line {_line_at(text, i)}: not valid JSON: {what}")


def _close_array(text: str, i: int, source: str | Path, records: list[Record]) -> list[Record]:
    """`text[i]` is the closing ']': only whitespace may follow."""
    rest = _WS.match(text, i + 1).end()
    if rest < len(text):
        raise DataError(f"{source}: line {_line_at(text, rest)}: not valid JSON: extra data after the closing ']'")
    return records


def _line_at(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


def _json_lines(raw: bytes, source: str | Path) -> list[Record]:
    """One JSON object per line; blank lines are skipped."""
    records: list[Record] = []
    for n, chunk in enumerate(raw.split(b"\n"), start=1):
        if not chunk.strip():
            continue
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: line {n}: not UTF-8 text "
                            f"(byte 0x{chunk[e.start]:02x} at column {e.start + 1})") from None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if not records:
                _maybe_one_object(raw, source)
            raise DataError(f"{source}: line {n}: not valid JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{source}: line {n}: not valid JSON: {_short(e)}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{source}: line {n}: expected one JSON object per line, got {_kind_of(obj)}")
        records.append(Record(obj, n))
    return records


def _maybe_one_object(raw: bytes, source: str | Path) -> None:
    """A pretty-printed single object fails as JSON Lines; say so rather than 'line 1: bad JSON'."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return
    if isinstance(obj, dict):
        raise DataError(f"{source}: holds a single JSON object over several lines; expected a JSON "
                        "array of records ([{...}, {...}]) or JSON Lines (one object per line)")


def _short(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split("\n")[0][:200]


# ---------------------------------------------------------------- records -> examples

def detect_format(record: Record, source: str | Path, columns: Columns | None = None) -> str:
    """The format the keys of `record` (the file's first) announce; DataError if none does."""
    keys = record.fields.keys()
    col = (columns or {}).get
    if col("messages", "messages") in keys:
        return "chat"
    if col("instruction", "instruction") in keys or {"question", "answer"} <= keys:
        return "alpaca"
    if col("text", "text") in keys:
        return "text"
    seen = ", ".join(repr(k) for k in list(keys)[:12]) or "none"
    hint = "" if columns else "; or name your fields with data.columns (e.g. {instruction: prompt, output: response})"
    raise DataError(f"{source}: {record.at}: cannot tell the format from the keys ({seen}); "
                    f"accepted: {ACCEPTED_FIELDS}{hint}")


def load_examples(path: str | Path, fmt: str = "auto", columns: Columns | None = None) -> tuple[str, list[Example]]:
    """Read and check one file: (format, examples). `fmt` is 'auto' or one of FORMATS; `columns`
    maps our field names to the file's (data.columns)."""
    records = read_records(path)
    return to_examples(records, path, fmt, is_txt=file_kind(path) == "text", columns=columns)


def to_examples(records: list[Record], source: str | Path, fmt: str = "auto",
                is_txt: bool = False, columns: Columns | None = None) -> tuple[str, list[Example]]:
    """Check every record against one format ('auto': the first record's keys decide)."""
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"{source}: format {fmt!r} is not known; accepted: auto, {', '.join(FORMATS)}")
    if is_txt and fmt not in ("auto", "text"):
        raise DataError(f"{source}: a .txt file holds plain text; format {fmt!r} needs .json or .jsonl")
    if not records:
        raise DataError(f"{source}: empty, no records")
    cols = dict(columns or {})
    if is_txt:
        cols.pop("text", None)  # a .txt file is one document whatever the record template says
    if fmt == "auto":
        fmt = "text" if is_txt else detect_format(records[0], source, cols)
    if fmt == "alpaca":
        first = records[0].fields
        gsm8k = cols.get("instruction", "instruction") not in first and {"question", "answer"} <= first.keys()
        examples = [_alpaca(r, source, gsm8k, cols) for r in records]
    elif fmt == "chat":
        examples = [_chat(r, source, cols) for r in records]
    else:
        examples = [Text(_field(r, "text", source, "text records need a 'text' string", cols=cols), r.line)
                    for r in records]
        return fmt, examples  # a blank document is dropped and counted as rejected (tokenize.py)
    for e in examples:
        _check_not_empty(e, source)
    return fmt, examples


def _check_not_empty(e: Alpaca | Chat, source: str | Path) -> None:
    """A record whose every field is empty (or blank) would train on the end-of-sequence token
    alone: almost always a bug in whatever wrote the file, so it is refused, naming the line."""
    if isinstance(e, Alpaca):
        texts, what = (e.instruction, e.input, e.output), "fields (instruction, input, output) are"
    else:
        texts, what = tuple(content for _, content in e.messages), "message contents are"
    if not any(t.strip() for t in texts):
        raise DataError(f"{source}: line {e.line}: all its {what} empty; there is nothing to train on "
                        "(remove the record or fill it in)")


def _check_str(value: Any, key: str, r: Record, source: str | Path) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source}: {r.at}: field {key!r} must be a string, got {_kind_of(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON allows a lone "\ud800" escape; no tokenizer does
        raise DataError(f"{source}: {r.at}: field {key!r} holds a lone surrogate "
                        f"\\u{ord(value[e.start]):04x}, not valid Unicode text") from None
    return value


def _field(r: Record, key: str, source: str | Path, need: str, optional: bool = False,
           cols: Columns | None = None) -> str:
    name = (cols or {}).get(key, key)  # the file's name for our field `key`
    value = r.fields.get(name)
    if value is None:
        if optional:
            return ""
        mapped = f"data.columns.{key}; " if name != key else ""
        raise DataError(f"{source}: {r.at}: missing field {name!r} ({mapped}{need})")
    return _check_str(value, name, r, source)


def _alpaca(r: Record, source: str | Path, gsm8k: bool, cols: Columns) -> Alpaca:
    if gsm8k:  # GSM8K {question, answer}: the answer (reasoning + "#### N") is the response
        need = "GSM8K records need question, answer"
        return Alpaca(_field(r, "question", source, need), "", _field(r, "answer", source, need), r.line)
    need = "alpaca records need instruction, output; input optional"
    return Alpaca(_field(r, "instruction", source, need, cols=cols),
                  _field(r, "input", source, need, optional=True, cols=cols),
                  _field(r, "output", source, need, cols=cols), r.line)


def _chat(r: Record, source: str | Path, cols: Columns) -> Chat:
    key, role_key, content_key = (cols.get(k, k) for k in ("messages", "role", "content"))
    need = f"chat records need {key}: a list of {{{role_key}, {content_key}}}"
    # role values as the file writes them (e.g. ShareGPT's human/gpt) -> ours
    roles = {cols.get(role, role): role for role in ROLES}
    messages = r.fields.get(key)
    if messages is None:
        raise DataError(f"{source}: {r.at}: missing field {key!r} ({need})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: {r.at}: field {key!r} must be a non-empty list "
                        f"of {{{role_key}, {content_key}}} objects, got {_kind_of(messages)}")
    pairs = []
    for i, m in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{source}: {r.at}: {where} must be an object {{{role_key}, {content_key}}}, "
                            f"got {_kind_of(m)}")
        role, content = m.get(role_key), m.get(content_key)
        if role not in roles:
            hint = "" if cols else " (other role names: map them with data.columns, e.g. {user: human, assistant: gpt})"
            raise DataError(f"{source}: {r.at}: {where}: {role_key} {role!r} is not valid; "
                            f"accepted: {', '.join(roles)}{hint}")
        if content is None:
            raise DataError(f"{source}: {r.at}: {where}: missing field {content_key!r}")
        pairs.append((roles[role], _check_str(content, f"{where}.{content_key}", r, source)))
    if not any(role == "assistant" for role, _ in pairs):
        raise DataError(f"{source}: {r.at}: no assistant message; chat records need at "
                        "least one (the loss is on assistant turns)")
    return Chat(tuple(pairs), r.line)
