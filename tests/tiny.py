"""The tiny random LLaMA the tests build. A plain module, not a conftest, so that the scripts the
tests run as subprocesses (tests/faultinject.py, tests/integration/_sharded_worker.py) build the
same model: tests/conftest.py hands it to tests as the `tiny_llama` fixture."""

from __future__ import annotations


def make_tiny_llama(tokenizer=None, seed: int = 0, **overrides):
    """A 2-layer LLaMA (hidden 32, 4 heads, 2 KV heads) with random weights seeded by `seed`;
    its vocabulary and special ids from `tokenizer` (default: 64 tokens); `overrides` change
    LlamaConfig fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = {} if tokenizer is None else dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **ids, **overrides}))
