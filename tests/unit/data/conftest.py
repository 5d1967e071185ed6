"""Tokenizers for the data tests: a word-level one built in memory, and tok512 (SentencePiece,
from ../shared/bench) when ../shared is beside the checkout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
WORDS = ("[ ] [/ INST << >> SYS ### Instruction Input Response : <| |> user assistant system "
         "the a an of to and is in it you that he was for on are with as I his they be at one have "
         "this from or had by hot word but what some we can out other were all there when up use "
         "your how said each she which do their time if will way about many then them write would "
         "like so these her long make thing see him two has look more day could go come did number "
         "sound no most people my over know water than call first who may down side been now find "
         "hello world answer question 0 1 2 3 4 5 6 7 8 9 . , ? ! ' \"").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_word_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="session")
def word_tok():
    """Word-level: whitespace/punctuation split, unknown words -> <unk>; no chat template."""
    return make_word_tokenizer()


@pytest.fixture(scope="session")
def chat_tok():
    """The word-level tokenizer with a small ChatML-like chat template."""
    return make_word_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def sp_tok(tmp_path_factory):
    """tok512 (SentencePiece BPE, vocab 512, BOS 1, EOS 2) as a transformers LlamaTokenizer."""
    model = SHARED / "bench" / "tok512.model"
    if not model.is_file():
        pytest.skip("../shared/bench/tok512.model is not beside the checkout")
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("tok512")
    shutil.copy(model, folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def make_tok():
    """make_word_tokenizer(chat_template=None): for tests that need another chat template."""
    return make_word_tokenizer
