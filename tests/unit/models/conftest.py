"""Fixtures of the models tests: a tiny LLaMA-like SentencePiece tokenizer trained on the spot."""

from __future__ import annotations

import io
import random

import pytest


@pytest.fixture
def train_spm():
    """`train_spm(path, words, vocab_size=300) -> path`: a SentencePiece BPE model (unk 0, bos 1,
    eos 2, byte fallback) trained on 400 seeded sentences of `words`."""
    import sentencepiece as spm

    def train(path, words, vocab_size=300):
        rng = random.Random(0)
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "." for _ in range(400)]
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
        path.write_bytes(buf.getvalue())
        return path

    return train
