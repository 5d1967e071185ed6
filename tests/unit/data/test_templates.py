"""templates.py: the rendered strings, which segments carry the loss, template choice and errors."""

from __future__ import annotations

import pytest

from dirtune.data.records import Alpaca, Chat, DataError, Text
from dirtune.data.templates import Segment, prompt_segments, render, resolve_template


def as_string(segments: list[Segment]) -> str:
    """The full text a model would see, with <s>/</s> for the special tokens."""
    return "".join({"bos": "<s>", "eos": "</s>"}.get(s.special, s.text) for s in segments)


def labelled_text(segments: list[Segment]) -> str:
    return "".join({"bos": "<s>", "eos": "</s>"}.get(s.special, s.text) for s in segments if s.labelled)


def test_alpaca_llama2_with_input():
    segs = render(Alpaca(" Add. ", "1 2\n", " 3 ", 1), "llama2")
    assert as_string(segs) == "<s>[INST] Add.\n\n1 2 [/INST] 3</s>"
    assert labelled_text(segs) == " 3</s>"


def test_alpaca_llama2_without_input():
    assert as_string(render(Alpaca("Hi", "", "Hello", 1), "llama2")) == "<s>[INST] Hi [/INST] Hello</s>"


def test_alpaca_plain_with_and_without_input():
    with_input = render(Alpaca("Add", "1 2", "3", 1), "plain")
    assert as_string(with_input) == "<s>### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n3</s>"
    assert labelled_text(with_input) == "3</s>"
    assert as_string(render(Alpaca("Add", "  ", "3", 1), "plain")) == \
        "<s>### Instruction:\nAdd\n\n### Response:\n3</s>"


def test_empty_response_leaves_only_the_eos_labelled():
    segs = render(Alpaca("Hi", "", "  ", 1), "llama2")
    assert labelled_text(segs) == "</s>"
    assert as_string(segs) == "<s>[INST] Hi [/INST]</s>"


def test_chat_llama2_multi_turn_with_system():
    chat = Chat((("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"),
                 ("user", "Bye"), ("assistant", "Bye!"), ("user", "dropped: no answer")), 1)
    segs = render(chat, "llama2")
    assert as_string(segs) == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello</s>"
                               "<s>[INST] Bye [/INST] Bye!</s>")
    assert labelled_text(segs) == " Hello</s> Bye!</s>"


def test_chat_llama2_without_system():
    chat = Chat((("user", "Hi"), ("assistant", "Hello")), 1)
    assert as_string(render(chat, "llama2")) == "<s>[INST] Hi [/INST] Hello</s>"


@pytest.mark.parametrize("roles", [("assistant",), ("user", "user", "assistant"),
                                   ("user", "assistant", "system", "user", "assistant")])
def test_chat_llama2_needs_alternating_roles(roles):
    chat = Chat(tuple((r, "x") for r in roles), 7)
    with pytest.raises(DataError, match=r"f\.jsonl: line 7: template llama2 needs messages in the order "
                                        r"\[system,\] user, assistant"):
        render(chat, "llama2", source="f.jsonl")


def test_chat_tokenizer_template_splits_prompt_and_response(chat_tok):
    chat = Chat((("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2"),
                 ("user", "dropped")), 1)
    segs = render(chat, "tokenizer", chat_tok)
    full = chat_tok.apply_chat_template([{"role": r, "content": c} for r, c in chat.messages[:5]], tokenize=False)
    assert as_string(segs) == full
    assert [s.text for s in segs if s.labelled] == [" A1 </s> ", " A2 </s> "]


def test_alpaca_through_the_tokenizer_template_is_one_user_turn(chat_tok):
    segs = render(Alpaca("Add", "1 2", "3", 1), "tokenizer", chat_tok)
    assert as_string(segs) == "<|user|> Add\n\n1 2 </s> <|assistant|> 3 </s> "
    assert labelled_text(segs) == " 3 </s> "


def test_non_prefix_chat_template_is_refused(make_tok):
    # the generation prompt comes first, so the prompt is not a prefix of the full rendering
    tok = make_tok("{% if add_generation_prompt %}ASK {% endif %}"
                   "{% for m in messages %}{{ m['content'] }} {% endfor %}")
    chat = Chat((("user", "a"), ("assistant", "b")), 3)
    with pytest.raises(DataError, match=r"line 3: the tokenizer's chat template does not render"):
        render(chat, "tokenizer", tok)


def test_chat_template_errors_become_data_errors(make_tok):
    tok = make_tok("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"line 2: the tokenizer's chat template failed: roles must alternate"):
        render(Chat((("user", "a"), ("assistant", "b")), 2), "tokenizer", tok)


@pytest.mark.parametrize("fmt, template, has_template, expected", [
    ("alpaca", "auto", True, "tokenizer"),  # alpaca too: the model is prompted as it was tuned
    ("alpaca", "auto", False, "llama2"),
    ("chat", "auto", True, "tokenizer"),
    ("chat", "auto", False, "llama2"),
    ("alpaca", "plain", False, "plain"),
    ("alpaca", "tokenizer", True, "tokenizer"),
    ("text", "llama2", False, None),
])
def test_resolve_template(fmt, template, has_template, expected, word_tok, chat_tok):
    assert resolve_template(fmt, template, chat_tok if has_template else word_tok) == expected


def test_resolve_template_errors(word_tok):
    with pytest.raises(DataError, match="template 'tokenizer' needs a tokenizer with a chat template"):
        resolve_template("chat", "tokenizer", word_tok)
    with pytest.raises(DataError, match="template 'plain' is for alpaca records"):
        resolve_template("chat", "plain", word_tok)
    with pytest.raises(DataError, match="template 'vicuna' is not known; accepted: auto, llama2, plain, tokenizer"):
        resolve_template("alpaca", "vicuna", word_tok)


def test_render_refuses_text_examples():
    with pytest.raises(TypeError, match="alpaca or chat"):
        render(Text("x", 1), "llama2")


def test_prompt_segments_stop_where_the_reply_starts(chat_tok):
    history = [("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")]
    segs = prompt_segments(history, "llama2")
    assert as_string(segs) == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1</s><s>[INST] U2 [/INST]"
    segs = prompt_segments(history, "tokenizer", chat_tok)
    want = chat_tok.apply_chat_template([{"role": r, "content": c} for r, c in history], tokenize=False,
                                        add_generation_prompt=True)
    assert as_string(segs) == want == "<|system|> S </s> <|user|> U1 </s> <|assistant|> A1 </s> <|user|> U2 </s> <|assistant|>"
