"""tokenize.py: ids and exact loss masks, the overlong policy, packing, text blocks, collation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dirtune.data.records import Alpaca, Chat, DataError
from dirtune.data.templates import render
from dirtune.data.tokenize import (IGNORE_INDEX, Rows, collate, encode_examples, encode_texts, fit_length,
                                   pack, pad_id_of, special_ids, text_blocks)

SHARED = Path(__file__).resolve().parents[3].parent / "shared"


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_alpaca_llama2_ids_and_mask(word_tok):
    [(ids, labels)] = encode_examples(word_tok, [render(Alpaca("hello world", "", "the answer", 1), "llama2")])
    prompt = ids_of(word_tok, "[INST] hello world [/INST]")
    response = ids_of(word_tok, "the answer")
    assert ids == [word_tok.bos_token_id, *prompt, *response, word_tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * (1 + len(prompt)) + response + [word_tok.eos_token_id]


def test_train_on_prompt_labels_every_token(word_tok):
    segs = render(Alpaca("hello", "world", "answer", 1), "llama2")
    [(ids, labels)] = encode_examples(word_tok, [segs], train_on_prompt=True)
    assert labels == ids


def test_chat_mask_covers_each_assistant_turn_and_its_eos(word_tok):
    chat = Chat((("user", "hello"), ("assistant", "one two"), ("user", "what"), ("assistant", "three")), 1)
    [(ids, labels)] = encode_examples(word_tok, [render(chat, "llama2")])
    labelled = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    eos = word_tok.eos_token_id
    assert labelled == ids_of(word_tok, "one two") + [eos] + ids_of(word_tok, "three") + [eos]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))


def test_special_token_text_in_user_data_stays_text(word_tok):
    [(ids, _)] = encode_examples(word_tok, [render(Alpaca("say </s>", "", "ok", 1), "llama2")])
    assert ids.count(word_tok.eos_token_id) == 1  # only the EOS we placed


def test_segments_match_metas_per_turn_sentencepiece_encoding(sp_tok):
    """Meta encodes each turn as one string with BOS/EOS; the segment-wise ids must be the same."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SHARED / "bench" / "tok512.model"))
    chat = Chat((("user", "Once upon a time"), ("assistant", "there was a girl."),
                 ("user", "Then?"), ("assistant", "She played.")), 1)
    [(ids, labels)] = encode_examples(sp_tok, [render(chat, "llama2")])
    expected = ([1] + sp.encode("[INST] Once upon a time [/INST] there was a girl.") + [2]
                + [1] + sp.encode("[INST] Then? [/INST] She played.") + [2])
    assert ids == expected
    labelled = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert labelled == sp.encode("there was a girl.") + [2] + sp.encode("She played.") + [2]


def test_continuation_keeps_in_string_spacing(sp_tok):
    # "\nanswer" has no space before "answer": no SentencePiece dummy prefix "▁" may appear
    [fresh] = encode_texts(sp_tok, ["answer"])
    [cont] = encode_texts(sp_tok, ["answer"], continuation=True)
    [cont_space] = encode_texts(sp_tok, [" answer"], continuation=True)
    assert sp_tok.convert_ids_to_tokens(fresh)[0].startswith("▁")
    assert not sp_tok.convert_ids_to_tokens(cont)[0].startswith("▁")
    assert cont_space == fresh


def test_fit_length_truncates_and_counts():
    pairs = [([1, 2, 3], [-100, 2, 3]), ([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5])]
    kept, truncated, rejected = fit_length(pairs, [1, 2], 4, "truncate")
    assert kept == [([1, 2, 3], [-100, 2, 3]), ([1, 2, 3, 4], [-100, -100, 3, 4])]
    assert (truncated, rejected) == (1, 0)


def test_fit_length_drops_examples_whose_response_was_cut_away():
    pairs = [([1, 2, 3, 4], [-100, -100, -100, 4]), ([1, 2], [-100, 2])]
    kept, truncated, rejected = fit_length(pairs, [1, 2], 3, "truncate")
    assert kept == [([1, 2], [-100, 2])] and (truncated, rejected) == (1, 1)


def test_fit_length_reject_names_count_and_lines():
    pairs = [([0] * 5, [0] * 5)] * 3 + [([0] * 2, [0] * 2)]
    with pytest.raises(DataError, match=r"f\.json: 3 of 4 examples are longer than data\.max_length=4 tokens "
                                        r"\(lines 10, 20, 30\); raise data\.max_length or set data\.overlong"):
        fit_length(pairs, [10, 20, 30, 40], 4, "reject", "f.json")


def test_pack_keeps_examples_whole_and_in_order():
    pairs = [([i] * n, [-100] * (n - 1) + [i]) for i, n in enumerate([3, 4, 2, 5, 1], start=1)]
    rows = pack(pairs, max_length=6)
    assert [len(ids) for ids, _ in rows] == [3, 6, 6]
    assert sum((ids for ids, _ in rows), []) == sum((ids for ids, _ in pairs), [])
    assert sum((lab for _, lab in rows), []) == sum((lab for _, lab in pairs), [])


def test_text_blocks_join_with_eos_and_keep_a_usable_tail():
    docs = [np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)]
    rows = text_blocks(docs, eos_id=2, max_length=3)  # stream 5 6 7 2 8 9 2
    assert [rows.row(i)[0] for i in range(len(rows))] == [[5, 6, 7], [2, 8, 9]]  # tail [2] is too short
    rows = text_blocks(docs, eos_id=2, max_length=4)
    assert [rows.row(i)[0] for i in range(len(rows))] == [[5, 6, 7, 2], [8, 9, 2]]
    assert all(rows.row(i)[0] == rows.row(i)[1] for i in range(len(rows)))


def test_rows_to_dataset_round_trip():
    pairs = [([1, 2, 3], [-100, 2, 3]), ([4], [4])]
    rows = Rows.from_pairs(pairs)
    assert (len(rows), rows.num_tokens, rows.num_labelled) == (2, 4, 3)
    ds = rows.to_dataset()
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    assert ds[0] == {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]}
    assert ds[1]["labels"] == [4]


def test_collate_pads_right():
    batch = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
             {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_equals_transformers_seq2seq_collator(word_tok):
    from transformers import DataCollatorForSeq2Seq

    batch = [{"input_ids": [5, 6, 7, 9], "attention_mask": [1, 1, 1, 1], "labels": [-100, 6, 7, 9]},
             {"input_ids": [8, 4], "attention_mask": [1, 1], "labels": [-100, 4]}]
    ours = collate(batch, pad_id=word_tok.pad_token_id)
    theirs = DataCollatorForSeq2Seq(word_tok, label_pad_token_id=IGNORE_INDEX)([dict(b) for b in batch])
    for key in ours:
        assert torch.equal(ours[key], theirs[key].long()), key


def test_pad_id_falls_back_to_eos(sp_tok, word_tok):
    assert sp_tok.pad_token_id is None and pad_id_of(sp_tok) == sp_tok.eos_token_id
    assert pad_id_of(word_tok) == word_tok.pad_token_id


def test_tokenizer_without_eos_is_refused():
    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="the tokenizer has no EOS token"):
        special_ids(NoEos())


def _long_record(n_words: int) -> str:
    words = ["hello", "world", "the", "answer", "is", "forty", "two", "unknownword", "!"]
    return " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(n_words))


@pytest.mark.parametrize("tok_name", ["word_tok", "sp_tok"])
def test_a_long_record_is_cut_before_tokenising_with_the_same_kept_ids(tok_name, request):
    """Issue 13 item 11: a huge record peaked at 2 GB because all of it was tokenised before
    truncation. With max_length the tokeniser sees a bounded prefix, and what truncation keeps
    (the first max_length ids and labels) is exactly what the whole record gives."""
    from dirtune.data.tokenize import char_budget

    tok = request.getfixturevalue(tok_name)
    max_length = 48
    ex = render(Alpaca("summarise " + _long_record(400), "", _long_record(20_000), 1), "llama2")
    [whole] = encode_examples(tok, [ex])
    calls = []
    original = tok.__call__

    class Spy:  # records the longest text handed to the tokenizer
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, texts, **kw):
            calls.append(max(len(t) for t in ([texts] if isinstance(texts, str) else texts)))
            return original(texts, **kw)

    [cut] = encode_examples(Spy(), [ex], max_length=max_length)
    # + 1: a continuation segment is encoded after a one-character sentinel (encode_texts)
    assert max(calls) <= char_budget(tok, max_length) + 1 < len(_long_record(20_000))
    assert cut[0][:max_length] == whole[0][:max_length]
    assert cut[1][:max_length] == whole[1][:max_length]
    assert len(cut[0]) > max_length  # still counted as overlong


def test_a_cut_that_leaves_too_few_tokens_tokenises_the_whole_text(word_tok):
    # one unknown "word" of 50k characters is a single <unk>: the cut prefix would be one token
    # too, so the margin check falls back to the whole text and the ids stay exact
    text = "x" * 50_000 + " hello world" * 100
    ex = render(Alpaca("q", "", text, 1), "llama2")
    [whole] = encode_examples(word_tok, [ex])
    [cut] = encode_examples(word_tok, [ex], max_length=16)
    assert cut == whole
