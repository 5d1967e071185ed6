"""`build_datasets`: the one entry the trainer calls, from `DataConfig` to tokenised datasets.

    files --records.py--> checked examples --splits.py--> train / valid (+ test, forget)
          --templates.py--> segments --tokenize.py--> ids + labels, length policy, packing
          (text: documents --> EOS-joined blocks) --> datasets.Dataset per split

Which split gets which data:
  * train: data.train_file, minus the held-out parts (valid and test by ratio), cut to the first
    data.max_samples records. Packed when data.packing (instruction data; text is always blocked).
  * valid: data.valid_file, else data.valid_ratio of train_file (of what the test split leaves;
    None when the ratio is 0), cut to data.max_eval_samples records. Never packed, so its loss is comparable across runs.
  * test:  data.test_file, else data.test_ratio of train_file (held out first, so that it is
    disjoint from train and valid), or None. Not cut: it is evaluated once, in full.
  * forget: data.forget_file or None (its format always auto-detected), cut to the first
    data.max_eval_samples rows (blocks, for text): it is evaluated as often as valid, and its
    documents can be long, so the cut is on what is evaluated rather than on records.
  * forget_<name>: each named set of data.forget_files (forget.py), cut the same way; its
    alpaca/chat records are measured on the responses only.
For text, a record is a document; max_samples counts documents, not blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import datasets

from dirtune.data.forget import PREFIX, is_forget_split, load_forget_sets
from dirtune.data.records import DataError, Example, Text, load_examples
from dirtune.data.splits import split_records
from dirtune.data.templates import render, resolve_template
from dirtune.data.tokenize import (Rows, collate, encode_documents, encode_examples, fit_length,
                                   pack, pad_id_of, special_ids, text_blocks)

SPLITS = ("train", "valid", "test", "forget")
COUNTS = ("examples", "truncated", "rejected", "tokens")


@dataclass
class DataBundle:
    """Tokenised splits (columns input_ids, attention_mask, labels; labels -100 off the loss).

    stats: "format"/"template" of train; "records" read from all files; "examples",
    "truncated", "rejected", "tokens" summed over the splits; "splits": per split the same
    counts plus "file", "format", "template", "records" (used), "rows" (dataset rows after
    packing/blocking) and "labelled_tokens". "rejected" counts records left out: empty text
    documents, or examples whose every labelled token was truncated away.
    """

    train: datasets.Dataset
    valid: Optional[datasets.Dataset]
    test: Optional[datasets.Dataset] = None
    forget: Optional[datasets.Dataset] = None
    stats: dict = field(default_factory=dict)
    # data.forget_files, by name, in the order given (evaluated beside valid)
    forget_sets: dict[str, datasets.Dataset] = field(default_factory=dict)
    data_files: list[Path] = field(default_factory=list)  # every file read, for the manifest hashes
    pad_id: int = 0

    def collator(self) -> Callable[[list[dict]], dict]:
        """`collate` with this bundle's pad id, for a DataLoader or transformers.Trainer."""
        return functools.partial(collate, pad_id=self.pad_id)

    def summary(self) -> str:
        """One line per split, for the console."""
        lines = [f"data: format {self.stats['format']}"
                 + (f", template {self.stats['template']}" if self.stats.get("template") else "")]
        for name, s in self.stats["splits"].items():
            lines.append(f"  {name}: {s['rows']} rows, {s['tokens']:,} tokens ({s['labelled_tokens']:,} "
                         f"with loss) from {s['records']} records of {s['file']}; "
                         f"{s['truncated']} truncated, {s['rejected']} rejected")
        return "\n".join(lines)


def build_datasets(cfg_data: Any, tokenizer: Any) -> DataBundle:
    """Read, check, split, render and tokenise the files named by `cfg_data` (a DataConfig).
    Every problem with the data raises DataError naming the file (and line)."""
    cfg = cfg_data
    for key in ("max_samples", "max_eval_samples"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise DataError(f"data.{key}: {value!r} is not valid; expected an integer >= 1 or null")
    special_ids(tokenizer)  # fail early on a tokenizer without EOS

    train_path = _path(cfg.train_file, "data.train_file")
    parts: dict[str, tuple[Path, str, list[Example]]] = {}
    fmt, examples = load_examples(train_path, cfg.format)
    records_read = len(examples)
    if cfg.test_ratio > 0 and not cfg.test_file:
        # a different seed from the validation split's, so the two hold-outs are not nested
        examples, test = split_records(examples, cfg.test_ratio, cfg.seed + 1, train_path, "data.test_ratio")
        parts["test"] = (train_path, fmt, test)
    if cfg.valid_file:
        valid_path = _path(cfg.valid_file, "data.valid_file")
        vfmt, valid = load_examples(valid_path, cfg.format)
        records_read += len(valid)
        parts["valid"] = (valid_path, vfmt, valid)
    elif cfg.valid_ratio > 0:
        examples, valid = split_records(examples, cfg.valid_ratio, cfg.seed, train_path)
        parts["valid"] = (train_path, fmt, valid)
    parts = {"train": (train_path, fmt, examples[: cfg.max_samples]),
             **{k: parts[k] for k in ("valid", "test") if k in parts}}
    if "valid" in parts:
        p, f, v = parts["valid"]
        parts["valid"] = (p, f, v[: cfg.max_eval_samples])
    for name, value, limit, file_fmt in (("test", cfg.test_file, None, cfg.format),
                                         ("forget", cfg.forget_file, cfg.max_eval_samples, "auto")):
        if value:
            path = _path(value, f"data.{name}_file")
            f, items = load_examples(path, file_fmt)
            records_read += len(items)
            parts[name] = (path, f, items[:limit])
    for name, path, f, items in load_forget_sets(getattr(cfg, "forget_files", None) or []):
        records_read += len(items)
        parts[name] = (path, f, items[: cfg.max_eval_samples])

    sets, split_stats = {}, {}
    for name, (path, f, items) in parts.items():
        rows, split_stats[name] = _tokenise(name, path, f, items, cfg, tokenizer)
        sets[name] = rows.to_dataset()
    stats = {"format": fmt, "template": split_stats["train"]["template"], "records": records_read}
    stats.update({k: sum(s[k] for s in split_stats.values()) for k in COUNTS})
    stats["splits"] = split_stats
    files = list(dict.fromkeys(path.resolve() for path, _, _ in parts.values()))
    named = {k[len(PREFIX):]: v for k, v in sets.items() if k.startswith(PREFIX)}
    return DataBundle(train=sets["train"], valid=sets.get("valid"), test=sets.get("test"),
                      forget=sets.get("forget"), stats=stats, data_files=files, pad_id=pad_id_of(tokenizer),
                      forget_sets=named)


def _path(value: str, key: str) -> Path:
    if not value or not str(value).strip():
        raise DataError(f"{key} is not set; give a .json, .jsonl or .txt file")
    return Path(value).expanduser()


def _tokenise(name: str, path: Path, fmt: str, items: list[Example], cfg: Any, tokenizer: Any) -> tuple[Rows, dict]:
    """One split's rows and counts."""
    stats = {"file": str(path), "format": fmt, "template": None, "records": len(items),
             "truncated": 0, "rejected": 0}
    if fmt == "text":
        docs = [t.text for t in items if isinstance(t, Text) and t.text.strip()]
        stats["rejected"] = len(items) - len(docs)
        stats["examples"] = len(docs)
        rows = text_blocks(encode_documents(tokenizer, docs), special_ids(tokenizer)[1], cfg.max_length)
    else:
        template = resolve_template(fmt, cfg.template, tokenizer, path)
        segments = [render(e, template, tokenizer, path) for e in items]
        # llama2/plain place BOS/EOS by id, so '</s>' typed in a record stays text; a chat template
        # writes its special tokens as text, so there they must be parsed (as transformers does).
        # a named forget set measures the responses alone (forget.py), whatever training does
        on_prompt = cfg.train_on_prompt and not name.startswith(PREFIX)
        pairs = encode_examples(tokenizer, segments, on_prompt, split_special=template != "tokenizer",
                                max_length=cfg.max_length)
        pairs, stats["truncated"], stats["rejected"] = fit_length(
            pairs, [e.line for e in items], cfg.max_length, cfg.overlong, path)
        stats["template"], stats["examples"] = template, len(pairs)
        rows = Rows.from_pairs(pack(pairs, cfg.max_length) if cfg.packing and name == "train" else pairs)
    if is_forget_split(name):
        rows = rows.head(cfg.max_eval_samples)
    if len(rows) == 0:
        raise DataError(f"{path}: the {name} split has no usable example ({len(items)} records, "
                        f"{stats['rejected']} rejected); check the file or data.max_length")
    stats.update(rows=len(rows), tokens=rows.num_tokens, labelled_tokens=rows.num_labelled)
    return rows, stats
