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

Each of train_file, valid_file and test_file may name several files (a list); they must share a
format, and each is read and checked on its own (mixing.py): a held-out part by ratio takes its
share of every file, and data.train_weights mixes the training files in given shares.
data.columns (a record template) maps our field names to the files' own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import datasets

from dirtune.data import mixing
from dirtune.data.forget import PREFIX, is_forget_split, load_forget_sets
from dirtune.data.mixing import Group
from dirtune.data.records import ACCEPTED_FILES, DataError, Text, load_examples
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
            if s.get("mix"):
                lines.append("    mix (data.train_weights): " + ", ".join(
                    f"{m['file']} {m['used']} drawn from {m['records']} records" for m in s["mix"]))
        return "\n".join(lines)


def build_datasets(cfg_data: Any, tokenizer: Any) -> DataBundle:
    """Read, check, split, render and tokenise the files named by `cfg_data` (a DataConfig).
    Every problem with the data raises DataError naming the file (and line).

    Long on purpose: the data pipeline in order (read, split, render, tokenize, pack) as one readable sequence.
    """
    cfg = cfg_data
    for key in ("max_samples", "max_eval_samples"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise DataError(f"data.{key}: {value!r} is not valid; expected an integer >= 1 or null")
    special_ids(tokenizer)  # fail early on a tokenizer without EOS
    columns = dict(getattr(cfg, "columns", None) or {})

    fmt, train = _read(cfg.train_file, "data.train_file", cfg.format, columns)
    records_read = mixing.total(train)
    parts: dict[str, tuple[str, list[Group]]] = {}
    if cfg.test_ratio > 0 and not cfg.test_file:
        # a different seed from the validation split's, so the two hold-outs are not nested
        train, test = mixing.hold_out(train, cfg.test_ratio, cfg.seed + 1, "data.test_ratio")
        parts["test"] = (fmt, test)
    if cfg.valid_file:
        vfmt, valid = _read(cfg.valid_file, "data.valid_file", cfg.format, columns)
        records_read += mixing.total(valid)
        parts["valid"] = (vfmt, valid)
    elif cfg.valid_ratio > 0:
        train, valid = mixing.hold_out(train, cfg.valid_ratio, cfg.seed, "data.valid_ratio")
        parts["valid"] = (fmt, valid)
    mix_report = None
    weights = getattr(cfg, "train_weights", None)
    if weights is not None:
        # seed + 2: apart from the two hold-outs' seeds
        train, mix_report = mixing.mix(train, weights, cfg.max_samples, cfg.seed + 2)
    else:
        train = mixing.head(train, cfg.max_samples)
    parts = {"train": (fmt, train), **{k: parts[k] for k in ("valid", "test") if k in parts}}
    if "valid" in parts:
        f, v = parts["valid"]
        parts["valid"] = (f, mixing.head(v, cfg.max_eval_samples))
    if cfg.test_file:
        f, items = _read(cfg.test_file, "data.test_file", cfg.format, columns)
        records_read += mixing.total(items)
        parts["test"] = (f, items)
    if cfg.forget_file:
        path = _path(cfg.forget_file, "data.forget_file")
        f, items = load_examples(path, "auto", columns)
        records_read += len(items)
        parts["forget"] = (f, [(path, items[: cfg.max_eval_samples])])
    for name, path, f, items in load_forget_sets(getattr(cfg, "forget_files", None) or []):
        records_read += len(items)
        parts[name] = (f, [(path, items[: cfg.max_eval_samples])])

    sets, split_stats = {}, {}
    for name, (f, groups) in parts.items():
        rows, split_stats[name] = _tokenise(name, groups, f, cfg, tokenizer)
        sets[name] = rows.to_dataset()
    if mix_report is not None:
        split_stats["train"]["mix"] = mix_report
    stats = {"format": fmt, "template": split_stats["train"]["template"], "records": records_read}
    stats.update({k: sum(s[k] for s in split_stats.values()) for k in COUNTS})
    stats["splits"] = split_stats
    files = list(dict.fromkeys(f for _, groups in parts.values() for path, _ in groups for f in _files_of(path)))
    named = {k[len(PREFIX):]: v for k, v in sets.items() if k.startswith(PREFIX)}
    return DataBundle(train=sets["train"], valid=sets.get("valid"), test=sets.get("test"),
                      forget=sets.get("forget"), stats=stats, data_files=files, pad_id=pad_id_of(tokenizer),
                      forget_sets=named)


def _path(value: str, key: str) -> Path:
    if not value or not str(value).strip():
        raise DataError(f"{key} is not set; give a data file ({ACCEPTED_FILES}) or a list of them")
    return Path(value).expanduser()


def _read(value: Any, key: str, fmt: str, columns: dict) -> tuple[str, list[Group]]:
    """One split's files (a path or a list of paths) as groups, checked to share one format."""
    paths = [_path(v, key) for v in (value if isinstance(value, list) else [value])]
    if not paths:
        raise DataError(f"{key} is not set; give a data file ({ACCEPTED_FILES}) or a list of them")
    groups: list[Group] = []
    found = None
    for path in paths:
        f, items = load_examples(path, fmt, columns)
        if found is not None and f != found:
            raise DataError(f"{key}: {paths[0]} holds {found} records but {path} holds {f} records; "
                            "the files of one split must share one format")
        found = f
        groups.append((path, items))
    return found, groups


def _files_of(path: Path) -> list[Path]:
    """The files to hash for the manifest: the file itself, or a saved dataset folder's files."""
    path = path.resolve()
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _tokenise(name: str, groups: list[Group], fmt: str, cfg: Any, tokenizer: Any) -> tuple[Rows, dict]:
    """One split's rows and counts; each file is rendered and length-checked on its own, so that
    messages name it."""
    items = [e for _, group in groups for e in group]
    source = ", ".join(str(path) for path, _ in groups)
    stats = {"file": source, "format": fmt, "template": None, "records": len(items),
             "truncated": 0, "rejected": 0}
    if fmt == "text":
        docs = [t.text for t in items if isinstance(t, Text) and t.text.strip()]
        stats["rejected"] = len(items) - len(docs)
        stats["examples"] = len(docs)
        rows = text_blocks(encode_documents(tokenizer, docs), special_ids(tokenizer)[1], cfg.max_length)
    else:
        template = resolve_template(fmt, cfg.template, tokenizer, groups[0][0])
        # a named forget set measures the responses alone (forget.py), whatever training does
        on_prompt = cfg.train_on_prompt and not name.startswith(PREFIX)
        pairs = []
        for path, group in groups:
            segments = [render(e, template, tokenizer, path) for e in group]
            # llama2/plain place BOS/EOS by id, so '</s>' typed in a record stays text; a chat template
            # writes its special tokens as text, so there they must be parsed (as transformers does).
            encoded = encode_examples(tokenizer, segments, on_prompt, split_special=template != "tokenizer",
                                      max_length=cfg.max_length)
            kept, truncated, rejected = fit_length(encoded, [e.line for e in group], cfg.max_length,
                                                   cfg.overlong, path)
            pairs += kept
            stats["truncated"] += truncated
            stats["rejected"] += rejected
        stats["template"], stats["examples"] = template, len(pairs)
        rows = Rows.from_pairs(pack(pairs, cfg.max_length) if cfg.packing and name == "train" else pairs)
    if is_forget_split(name):
        rows = rows.head(cfg.max_eval_samples)
    if len(rows) == 0:
        raise DataError(f"{source}: the {name} split has no usable example ({len(items)} records, "
                        f"{stats['rejected']} rejected); check the file or data.max_length")
    stats.update(rows=len(rows), tokens=rows.num_tokens, labelled_tokens=rows.num_labelled)
    return rows, stats
