"""Tokenisation, loss masks, length limits, packing, text blocks and batch collation.

An example's ids are built segment by segment (`templates.Segment`): prompt segments get label
-100, response segments (and their EOS) get their own ids as labels, so the mask is exact; the
full string is never re-tokenised. Text data is tokenised per document, joined with EOS and cut
into max_length blocks whose labels are their ids.

Rows are kept flat (`Rows`: one int32 array of ids, one of labels, and row offsets) so that a
corpus of tens of millions of tokens becomes a `datasets.Dataset` without a Python list per
token (pyarrow list arrays are built straight from the numpy buffers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch

from dirtune.data.records import DataError
from dirtune.data.templates import Segment

IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips
# A text segment that continues the string is encoded as SENTINEL + text, minus the sentinel's
# ids: that gives the ids the text would get inside the full string (a leading space becomes
# SentencePiece's "▁", no dummy prefix is added). "\n" never merges with the next character in
# SentencePiece (it is a byte-fallback token); where the prefix check fails we encode plainly.
SENTINEL = "\n"

Pair = tuple[list[int], list[int]]  # (input_ids, labels) of one example


def special_ids(tokenizer: Any) -> tuple[int | None, int]:
    """(bos, eos) ids; a tokenizer without EOS cannot end responses or documents."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS token; dirtune needs one to end responses and documents")
    return getattr(tokenizer, "bos_token_id", None), eos


def pad_id_of(tokenizer: Any) -> int:
    """The pad id for collation: the tokenizer's pad token, else EOS (LLaMA has no pad token;
    padded positions are masked out of attention and loss, so the id itself does not matter)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else special_ids(tokenizer)[1]


def encode_texts(tokenizer: Any, texts: Sequence[str], continuation: bool = False,
                 split_special: bool = True) -> list[list[int]]:
    """Ids of each text without added special tokens. `continuation`: as the text reads after
    other text (see SENTINEL). `split_special`: '</s>' written in the text stays text."""
    if not texts:
        return []
    kw = {"add_special_tokens": False, "split_special_tokens": split_special}
    if not continuation:
        return list(tokenizer(list(texts), **kw)["input_ids"])
    base = tokenizer(SENTINEL, **kw)["input_ids"]
    out = []
    for text, ids in zip(texts, tokenizer([SENTINEL + t for t in texts], **kw)["input_ids"]):
        if ids[: len(base)] == base:
            out.append(list(ids[len(base):]))
        else:
            out.append(list(tokenizer(text, **kw)["input_ids"]))
    return out


CUT_MARGIN = 64  # tokens past max_length that a cut segment must still have (see char_budget)


def char_budget(tokenizer: Any, max_length: int) -> int:
    """Characters of a text segment worth tokenising when examples are cut to `max_length`.

    A token stands for at most as many characters as its longest vocabulary entry (a byte-level
    entry is written one character per byte, so never with fewer characters than it covers),
    unknown-word tokens aside; so a prefix of (max_length + CUT_MARGIN) x that many characters,
    doubled for safety, gives well over max_length tokens, and the first max_length of them are
    the whole text's: tokenisers are local, only the last tokens before a cut can differ.
    `encode_examples` checks the margin and tokenises the whole text where it is not there (an
    unknown-token run). Cutting a 10 MB record first keeps the tokeniser's per-token bookkeeping
    (several Python objects per token, gigabytes for millions of tokens) out of memory.
    """
    longest = getattr(tokenizer, "_dirtune_longest_piece", None)
    if longest is None:
        longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
        try:
            tokenizer._dirtune_longest_piece = longest  # the vocabulary is read once per tokenizer
        except AttributeError:
            pass
    return (max_length + CUT_MARGIN) * max(longest, 1) * 2


def encode_examples(tokenizer: Any, examples: Sequence[Sequence[Segment]], train_on_prompt: bool = False,
                    split_special: bool = True, max_length: Optional[int] = None) -> list[Pair]:
    """(input_ids, labels) of each segmented example. Labels are the ids on labelled segments
    (every segment when `train_on_prompt`) and IGNORE_INDEX elsewhere.

    With `max_length`, text past `char_budget` characters of a segment is not tokenised: the
    first max_length ids of every example are unchanged (what truncation keeps), and an example
    cut this way is still longer than max_length (what the overlong policy counts)."""
    bos, eos = special_ids(tokenizer)
    budget = char_budget(tokenizer, max_length) if max_length is not None else None
    fresh: list[str] = []
    cont: list[str] = []
    plans = []  # per example: [(source, index or id, labelled)], source in "id" | "fresh" | "cont"
    for segments in examples:
        plan, after_text = [], False
        for s in segments:
            if s.special is not None:
                if s.special == "bos" and bos is None:
                    continue  # a tokenizer without BOS: nothing to place
                plan.append(("id", bos if s.special == "bos" else eos, s.labelled))
                after_text = False
            elif s.text:
                queue = cont if after_text else fresh
                plan.append(("cont" if after_text else "fresh", len(queue), s.labelled))
                queue.append(s.text)
                after_text = True
        plans.append(plan)
    encoded = {"fresh": _encode_cut(tokenizer, fresh, False, split_special, budget, max_length),
               "cont": _encode_cut(tokenizer, cont, True, split_special, budget, max_length)}
    pairs = []
    for plan in plans:
        ids: list[int] = []
        labels: list[int] = []
        for source, value, labelled in plan:
            piece = [value] if source == "id" else encoded[source][value]
            ids += piece
            labels += piece if (labelled or train_on_prompt) else [IGNORE_INDEX] * len(piece)
        pairs.append((ids, labels))
    return pairs


def _encode_cut(tokenizer: Any, texts: list[str], continuation: bool, split_special: bool,
                budget: Optional[int], max_length: Optional[int]) -> list[list[int]]:
    """encode_texts of each text cut to `budget` characters; a cut text whose ids do not reach
    max_length + CUT_MARGIN is tokenised whole instead (see char_budget)."""
    if budget is None:
        return encode_texts(tokenizer, texts, continuation, split_special)
    out = encode_texts(tokenizer, [t[:budget] for t in texts], continuation, split_special)
    for i, text in enumerate(texts):
        if len(text) > budget and len(out[i]) < max_length + CUT_MARGIN:
            out[i] = encode_texts(tokenizer, [text], continuation, split_special)[0]
    return out


def fit_length(pairs: list[Pair], lines: Sequence[int], max_length: int, policy: str,
               source: str | Path = "data") -> tuple[list[Pair], int, int]:
    """Apply the overlong policy: (kept pairs, number truncated, number rejected).

    'truncate' cuts ids and labels to max_length; 'reject' raises DataError naming the lines.
    Either way an example left without a labelled token (its response cut away) is dropped and
    counted as rejected: it would only add a zero-token loss.
    """
    if policy not in ("truncate", "reject"):
        raise DataError(f"overlong policy {policy!r} is not known; accepted: truncate, reject")
    long = [line for (ids, _), line in zip(pairs, lines) if len(ids) > max_length]
    if long and policy == "reject":
        shown = ", ".join(str(n) for n in long[:10]) + (", ..." if len(long) > 10 else "")
        raise DataError(f"{source}: {len(long)} of {len(pairs)} examples are longer than "
                        f"data.max_length={max_length} tokens (lines {shown}); raise data.max_length "
                        "or set data.overlong: truncate")
    kept, rejected = [], 0
    for ids, labels in pairs:
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            rejected += 1
            continue
        kept.append((ids, labels))
    return kept, len(long), rejected


def pack(pairs: Sequence[Pair], max_length: int) -> list[Pair]:
    """Greedy, in order: append whole examples to the current row while it stays <= max_length.

    Each example keeps its own labels; examples in one row may attend to the ones before them
    (no block-diagonal mask): cheaper, and the usual choice for short instruction data. Examples
    are never split, so every response keeps its prompt.
    """
    rows: list[Pair] = []
    ids: list[int] = []
    labels: list[int] = []
    for a, b in pairs:
        if ids and len(ids) + len(a) > max_length:
            rows.append((ids, labels))
            ids, labels = [], []
        ids.extend(a)
        labels.extend(b)
    if ids:
        rows.append((ids, labels))
    return rows


def encode_documents(tokenizer: Any, texts: Sequence[str], batch: int = 256) -> list[np.ndarray]:
    """Ids of each document (int32), tokenised in batches to bound the Python lists alive."""
    out = []
    for start in range(0, len(texts), batch):
        out += [np.asarray(ids, dtype=np.int32) for ids in encode_texts(tokenizer, texts[start:start + batch])]
    return out


@dataclass
class Rows:
    """Variable-length token rows stored flat: row i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray      # (T,) int32
    labels: np.ndarray   # (T,) int32
    offsets: np.ndarray  # (n + 1,) int64, offsets[0] == 0, offsets[-1] == T

    @classmethod
    def from_pairs(cls, pairs: Sequence[Pair]) -> "Rows":
        lengths = np.fromiter((len(ids) for ids, _ in pairs), dtype=np.int64, count=len(pairs))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = lambda k: np.fromiter((t for pair in pairs for t in pair[k]), dtype=np.int32,  # noqa: E731
                                     count=int(offsets[-1]))
        return cls(flat(0), flat(1), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def head(self, n: Optional[int]) -> "Rows":
        """The first n rows (all when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        end = int(self.offsets[n])
        return Rows(self.ids[:end], self.labels[:end], self.offsets[: n + 1])

    def row(self, i: int) -> Pair:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b].tolist(), self.labels[a:b].tolist()

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_labelled(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))

    def to_dataset(self) -> datasets.Dataset:
        """Columns input_ids, attention_mask (all 1), labels: lists of int per row."""
        if self.num_tokens >= 2**31:
            raise DataError(f"{self.num_tokens} tokens in one split: more than a dataset column holds "
                            "(2**31); use data.max_samples")
        offsets = pa.array(self.offsets.astype(np.int32))
        column = lambda values: pa.ListArray.from_arrays(offsets, pa.array(values))  # noqa: E731
        return datasets.Dataset.from_dict({
            "input_ids": column(self.ids),
            "attention_mask": column(np.ones(self.num_tokens, dtype=np.int8)),
            "labels": column(self.labels),
        })


def text_blocks(docs: Sequence[np.ndarray], eos_id: int, max_length: int) -> Rows:
    """Documents joined as doc_1 EOS doc_2 EOS ... and cut into max_length blocks (labels = ids).
    The last, shorter block is kept when it has at least 2 tokens (one next-token target)."""
    stream = np.concatenate([part for doc in docs for part in (doc, np.array([eos_id], np.int32))]
                            or [np.zeros(0, np.int32)]).astype(np.int32)
    full = len(stream) // max_length
    offsets = np.arange(0, full * max_length + 1, max_length, dtype=np.int64)
    if len(stream) - full * max_length >= 2:
        offsets = np.append(offsets, len(stream))
    stream = stream[: offsets[-1]]
    return Rows(stream, stream, offsets)


def collate(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: input_ids with pad_id, attention_mask with 0, labels with
    IGNORE_INDEX. Returns int64 tensors of shape (B, T_max).

    Equal to transformers' DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100) on these
    columns; ours takes the pad id directly because LLaMA tokenizers have no pad token, which
    that collator needs.
    """
    width = max(len(row["input_ids"]) for row in batch)
    shape = (len(batch), width)
    out = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
           "attention_mask": torch.zeros(shape, dtype=torch.long),
           "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long)}
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        out["input_ids"][i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        mask = row.get("attention_mask")
        out["attention_mask"][i, :n] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
        out["labels"][i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
    return out
