"""Shared fixtures: where ../shared is, and a tiny random LLaMA checkpoint with a char tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ itself, for tiny.py: the one tiny-LLaMA builder, shared with the scripts run as subprocesses
# (pytest's importlib mode puts nothing on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import make_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "bench").is_dir():
        pytest.skip("../shared is not beside the checkout")
    return SHARED


@pytest.fixture
def tiny_llama():
    """make_tiny_llama, for tests that build models in memory."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer LLaMA (hidden 32) with random weights, saved with a character tokenizer."""
    from dirtune.data.synthetic import char_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = char_tokenizer()
    make_tiny_llama(tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict:
    """The demo's synthetic world: source text and an alpaca task with train/valid/test splits."""
    from dirtune.data.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("task"), seed=0, n_people=24, n_source_train=200,
                           n_source_valid=20)


# ---------------------------------------------------------------- a tiny GGUF file

GGUF_CHAT_TEMPLATE = (  # ChatML, as SmolLM2's file has it (written here, not copied)
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def llama_cpp_permute(w, n_heads: int):
    """q/k rows from transformers' rotate_half order to llama.cpp's interleaved pairs, as its
    converter stores them: (n_heads, 2, head_dim/2, in) -> (n_heads, head_dim/2, 2, in)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_tiny_gguf(path, qtype: str = "F32", tied: bool = False, seed: int = 0):
    """A 2-layer LLaMA (hidden 64, 4 heads, 2 kv heads) with a byte-level BPE tokenizer and a
    ChatML chat template, written with gguf.GGUFWriter the way llama.cpp lays a LLaMA out.

    Returns (path, the transformers model it was written from, the numpy tensors as stored).
    Weight matrices are stored as `qtype` ('F32' or 'Q8_0'); norms stay F32, as llama.cpp keeps them.
    """
    import gguf
    import numpy as np
    import torch
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(bytes_to_unicode().values())
    merges = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("l", "l"), ("o", "r")]
    tokens = specials + alphabet + [a + b for a, b in merges]
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(tokens) - len(specials))
    heads, kv_heads, hidden = 4, 2, 64
    model = make_tiny_llama(seed=seed, vocab_size=len(tokens), hidden_size=hidden, intermediate_size=128,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                            tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0).eval()
    with torch.no_grad():  # norms away from 1, so that a norm left unread would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(GGUF_CHAT_TEMPLATE)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not tied:
        names["lm_head.weight"] = "output.weight"
    for i in range(2):
        for hf, g in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                      ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                      ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                      ("post_attention_layernorm", "ffn_norm")]:
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    quant = gguf.GGMLQuantizationType[qtype]
    stored = {}
    for hf, g in names.items():
        t = sd[hf]
        if ".attn_q." in g:
            t = llama_cpp_permute(t, heads)
        elif ".attn_k." in g:
            t = llama_cpp_permute(t, kv_heads)
        t = np.ascontiguousarray(t)
        if t.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(t, quant)
            w.add_tensor(g, q, raw_dtype=quant)
            stored[g] = gguf.quants.dequantize(q, quant).reshape(t.shape)
        else:
            w.add_tensor(g, t)
            stored[g] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model, stored


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny LLaMA GGUF file (F32, untied) with a ChatML chat template; see write_tiny_gguf."""
    pytest.importorskip("gguf")
    path, _, _ = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path


@pytest.fixture(scope="session")
def gguf_writer():
    """write_tiny_gguf(path, qtype='F32', tied=False, seed=0) -> (path, source model, stored tensors)."""
    pytest.importorskip("gguf")
    return write_tiny_gguf
