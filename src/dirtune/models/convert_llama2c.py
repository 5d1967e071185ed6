"""Convert a llama2.c checkpoint (.bin, fp32) to a transformers LlamaForCausalLM folder.

Two layouts exist (llama2.c's export.py):

v0 / legacy   header: 7 x int32  dim, hidden_dim, n_layers, n_heads, n_kv_heads,
                                 vocab_size (negative: classifier not shared), seq_len
              fp32, layer-stacked: tok_embeddings (V,D), rms_att (L,D), wq (L,D,D),
              wk (L,KV,D), wv (L,KV,D), wo (L,D,D), rms_ffn (L,D), w1 (L,H,D), w2 (L,D,H),
              w3 (L,H,D), rms_final (D), freq_cis_real (T,hs/2), freq_cis_imag (T,hs/2),
              [wcls (V,D)]
v1            header (256 bytes): uint32 magic "ak42" 0x616b3432, int32 version = 1, the same
              7 x int32 (vocab_size positive), uint8 shared_classifier, zero padding
              fp32: rms_att (L,D), rms_ffn (L,D), rms_final (D), tok_embeddings (V,D),
              wq, wk, wv, wo, w1, w2, w3 (stacked as above), [wcls (V,D)]

D = dim, H = hidden_dim, L = n_layers, V = vocab, KV = n_kv_heads * head_size, T = seq_len,
hs = head_size = D / n_heads. Matrices are stored (out, in), as nn.Linear holds them.
llama2.c's RoPE rotates interleaved pairs like Meta's, so wq/wk get Meta's permutation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from dirtune.models.convert_meta import permute_rotary
from dirtune.models.errors import ModelError
from dirtune.models.loading import (load_sentencepiece, save_tokenizer_from_sentencepiece,
                                    to_dtype, write_checkpoint)

__all__ = ["Llama2cHeader", "convert_llama2c", "read_llama2c", "read_llama2c_header"]

MAGIC = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256
V0_HEADER_BYTES = 7 * 4
PathLike = Union[str, Path]


@dataclass(frozen=True)
class Llama2cHeader:
    version: int  # 0 (legacy) or 1
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    @property
    def header_bytes(self) -> int:
        return V1_HEADER_BYTES if self.version == 1 else V0_HEADER_BYTES

    def tensor_shapes(self) -> list[tuple[str, tuple]]:
        """(name, shape) of every stored fp32 array, in file order."""
        D, H, L, V, KV = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.kv_dim
        mats = [("wq", (L, D, D)), ("wk", (L, KV, D)), ("wv", (L, KV, D)), ("wo", (L, D, D))]
        ffn = [("w1", (L, H, D)), ("w2", (L, D, H)), ("w3", (L, H, D))]
        if self.version == 0:
            freq = (self.seq_len, self.head_size // 2)
            order = ([("tok_embeddings", (V, D)), ("rms_att", (L, D))] + mats + [("rms_ffn", (L, D))]
                     + ffn + [("rms_final", (D,)), ("freq_cis_real", freq), ("freq_cis_imag", freq)])
        else:
            order = ([("rms_att", (L, D)), ("rms_ffn", (L, D)), ("rms_final", (D,)),
                      ("tok_embeddings", (V, D))] + mats + ffn)
        if not self.shared_classifier:
            order.append(("wcls", (V, D)))
        return order

    def expected_bytes(self) -> int:
        return self.header_bytes + 4 * sum(int(np.prod(s)) for _, s in self.tensor_shapes())

    def describe(self) -> str:
        return (f"llama2.c v{self.version}: dim={self.dim} hidden_dim={self.hidden_dim} "
                f"n_layers={self.n_layers} n_heads={self.n_heads} n_kv_heads={self.n_kv_heads} "
                f"vocab_size={self.vocab_size} seq_len={self.seq_len} "
                f"shared_classifier={self.shared_classifier}")


def read_llama2c_header(bin_path: PathLike) -> Llama2cHeader:
    """The header of a llama2.c checkpoint; ModelError if it is not one or its size is wrong."""
    path = Path(bin_path).expanduser()
    if not path.is_file():
        raise ModelError(f"{path}: llama2.c checkpoint not found")
    with path.open("rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < V0_HEADER_BYTES:
        raise ModelError(f"{path}: {len(head)} bytes, too short for a llama2.c header")
    if struct.unpack("<I", head[:4])[0] == MAGIC:
        version = struct.unpack("<i", head[4:8])[0]
        if version != 1:
            raise ModelError(f"{path}: llama2.c format version {version} is not supported "
                             "(only v0/legacy and v1 fp32; v2 is int8-quantised)")
        if len(head) < 8 + 7 * 4 + 1:
            raise ModelError(f"{path}: {len(head)} bytes, too short for a llama2.c v1 header")
        dim, hidden, layers, heads, kv, vocab, seq = struct.unpack("<7i", head[8:36])
        shared = bool(head[36])
    else:
        version = 0
        dim, hidden, layers, heads, kv, vocab, seq = struct.unpack("<7i", head[:28])
        shared, vocab = vocab > 0, abs(vocab)
    hdr = Llama2cHeader(version, dim, hidden, layers, heads, kv, vocab, seq, shared)
    sane = (min(dim, hidden, layers, heads, kv, vocab, seq) > 0 and dim % heads == 0
            and heads % kv == 0 and hdr.head_size % 2 == 0)
    if not sane:
        raise ModelError(f"{path}: not a llama2.c checkpoint (header reads {hdr.describe()})")
    actual = path.stat().st_size
    expected = hdr.expected_bytes()
    if actual != expected:
        raise ModelError(f"{path}: file is {actual} bytes but its header ({hdr.describe()}) "
                         f"implies {expected} bytes; the file is truncated or not this format")
    return hdr


def read_llama2c(bin_path: PathLike) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """The header and the stored arrays by llama2.c name (fp32, shapes as in tensor_shapes)."""
    hdr = read_llama2c_header(bin_path)
    flat = np.fromfile(Path(bin_path).expanduser(), dtype="<f4", offset=hdr.header_bytes)
    arrays, pos = {}, 0
    for name, shape in hdr.tensor_shapes():
        n = int(np.prod(shape))
        arrays[name] = torch.from_numpy(flat[pos:pos + n].reshape(shape))
        pos += n
    return hdr, arrays


def _hf_state_dict(hdr: Llama2cHeader, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llama2.c arrays -> transformers LlamaForCausalLM names (lm_head omitted when tied)."""
    sd = {"model.embed_tokens.weight": w["tok_embeddings"], "model.norm.weight": w["rms_final"]}
    for i in range(hdr.n_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = permute_rotary(w["wq"][i], hdr.n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute_rotary(w["wk"][i], hdr.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
        sd[p + "input_layernorm.weight"] = w["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
    if not hdr.shared_classifier:
        sd["lm_head.weight"] = w["wcls"]
    return sd


def convert_llama2c(bin_path: PathLike, tokenizer_model: PathLike, out_dir: PathLike,
                    dtype: str = "fp32") -> Path:
    """Write `out_dir`: the llama2.c model as a transformers LlamaForCausalLM, with its tokenizer.

    `tokenizer_model` is the SentencePiece .model the checkpoint was trained with (llama2.c's
    own tokenizer .bin cannot be converted). RMSNorm eps 1e-5 and RoPE theta 10000, as llama2.c
    trains; BOS 1, EOS 2. Returns `out_dir`.
    """
    from transformers import LlamaConfig

    torch_dtype = to_dtype(dtype)
    hdr, arrays = read_llama2c(bin_path)
    sp = load_sentencepiece(tokenizer_model)
    if sp.get_piece_size() > hdr.vocab_size:
        raise ModelError(f"{tokenizer_model}: the tokenizer has {sp.get_piece_size()} tokens but "
                         f"{bin_path} has vocab_size {hdr.vocab_size}")
    config = LlamaConfig(
        vocab_size=hdr.vocab_size, hidden_size=hdr.dim, intermediate_size=hdr.hidden_dim,
        num_hidden_layers=hdr.n_layers, num_attention_heads=hdr.n_heads,
        num_key_value_heads=hdr.n_kv_heads, max_position_embeddings=hdr.seq_len,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=hdr.shared_classifier, bos_token_id=1, eos_token_id=2,
    )
    sd = _hf_state_dict(hdr, arrays)
    out = write_checkpoint(out_dir, config, [(k, tuple(v.shape)) for k, v in sd.items()],
                           sd.__getitem__, torch_dtype)
    save_tokenizer_from_sentencepiece(tokenizer_model, out)
    return out
