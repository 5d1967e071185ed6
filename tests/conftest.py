"""Shared fixtures: where ../shared is, and a tiny random LLaMA checkpoint with a char tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "bench").is_dir():
        pytest.skip("../shared is not beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer LLaMA (hidden 32) with random weights, saved with a character tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dirtune.data.synthetic import char_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict:
    """The demo's synthetic world: source text and an alpaca task with train/valid/test splits."""
    from dirtune.data.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("task"), seed=0, n_people=24, n_source_train=200,
                           n_source_valid=20)
