"""Convert Meta's original LLaMA / LLaMA 2 release (consolidated.*.pth) to a transformers folder.

Meta's layout, as its reference model.py writes it:
    params.json         dim, n_layers, n_heads, [n_kv_heads], multiple_of, [ffn_dim_multiplier],
                        norm_eps, vocab_size (-1: from the tokenizer), [rope_theta]
    consolidated.NN.pth one file per model-parallel rank; a weight split across ranks is
                        concatenated on the axis its parallel layer splits:
                          wq wk wv w1 w3 output (column parallel)   dim 0
                          wo w2 (row parallel), tok_embeddings      dim 1
                          norms                                      replicated
    tokenizer.model     SentencePiece (here or in the parent folder, as Meta's download has it)

Meta's RoPE rotates interleaved pairs (x[2j], x[2j+1]); transformers' `rotate_half` rotates
(x[j], x[j + head_dim/2]). `permute_rotary` reorders the rows of wq/wk so that the two agree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

import torch

from dirtune.models.errors import ModelError
from dirtune.models.loading import (SPM_FILE, load_sentencepiece,
                                    save_tokenizer_from_sentencepiece, to_dtype, write_checkpoint)

__all__ = ["convert_meta", "meta_intermediate_size", "permute_rotary"]

PathLike = Union[str, Path]


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved-pair RoPE order to rotate_half order.

    w: (n_heads * head_dim, dim). Within each head, row 2j + c (pair j, c = 0 real / 1
    imaginary) moves to row c * head_dim/2 + j.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    # (n_heads, head_dim/2 pairs, 2, dim) -> (n_heads, 2, head_dim/2, dim)
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """The SwiGLU hidden size of Meta's FeedForward: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


# HF name suffix -> (Meta name suffix, concat axis across shards or None if replicated);
# q_proj / k_proj also get their rows permuted (see permute_rotary)
_LAYER_MAP = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
_TOP_MAP = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}


def _read_params(src: Path) -> dict:
    pfile = src / "params.json"
    if not pfile.is_file():
        raise ModelError(f"{pfile}: params.json not found (is {src} a Meta LLaMA release folder?)")
    try:
        params = json.loads(pfile.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{pfile}: not valid JSON (line {e.lineno}): {e.msg}") from None
    for key in ("dim", "n_layers", "n_heads", "multiple_of"):
        if key not in params:
            raise ModelError(f"{pfile}: missing key {key!r} (has {', '.join(sorted(params))})")
    return params


def _find_tokenizer(src: Path) -> Path:
    for cand in (src / SPM_FILE, src.parent / SPM_FILE):
        if cand.is_file():
            return cand
    raise ModelError(f"{src / SPM_FILE}: tokenizer.model not found (nor in {src.parent})")


def convert_meta(src_dir: PathLike, out_dir: PathLike, dtype: str = "bf16", *,
                 max_position_embeddings: Optional[int] = None,
                 max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `out_dir`: a transformers LlamaForCausalLM checkpoint and tokenizer from Meta's release.

    Shards are memory-mapped and the output is written shard by shard, so memory holds about
    one output shard. `max_position_embeddings` defaults to params.json's max_seq_len, else 4096
    (LLaMA 2's context). Returns `out_dir`.

    Long on purpose: one conversion read top to bottom: params, tokenizer, shards merged tensor by tensor, written; parts share its locals.
    """
    from transformers import LlamaConfig

    src = Path(src_dir).expanduser()
    if not src.is_dir():
        raise ModelError(f"{src}: Meta release folder not found")
    params = _read_params(src)
    shard_files = sorted(src.glob("consolidated.*.pth"))
    if not shard_files:
        raise ModelError(f"{src}: no consolidated.*.pth weight shards found")
    tok_file = _find_tokenizer(src)
    torch_dtype = to_dtype(dtype)
    # mmap: a shard is read from disk when a tensor is touched, not all at load
    shards = []
    for f in shard_files:
        try:
            shards.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except (RuntimeError, OSError, EOFError) as e:
            raise ModelError(f"{f}: could not read the weight shard: {e}") from None

    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads

    def parts(meta_name: str) -> list[torch.Tensor]:
        for f, shard in zip(shard_files, shards):
            if meta_name not in shard:
                raise ModelError(f"{f}: tensor {meta_name!r} missing")
        return [shard[meta_name] for shard in shards]

    vocab_size = parts("tok_embeddings.weight")[0].shape[0]
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab_size:
        raise ModelError(f"{src / 'params.json'}: vocab_size {params['vocab_size']} but "
                         f"tok_embeddings has {vocab_size} rows")
    intermediate = meta_intermediate_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
    w1_rows = sum(w.shape[0] for w in parts("layers.0.feed_forward.w1.weight"))
    if w1_rows != intermediate:
        raise ModelError(f"{src / 'params.json'}: dim/multiple_of/ffn_dim_multiplier give a FFN size "
                         f"of {intermediate} but the weights have {w1_rows}")
    sp = load_sentencepiece(tok_file)
    if sp.get_piece_size() > vocab_size:
        raise ModelError(f"{tok_file}: the tokenizer has {sp.get_piece_size()} tokens but the "
                         f"model's embedding {vocab_size} rows")

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=intermediate,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_position_embeddings or params.get("max_seq_len", 4096),
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        tie_word_embeddings=False, bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
    )

    sources: dict[str, tuple[str, Optional[int], int]] = {}  # HF name -> (Meta name, axis, heads)
    for hf, (meta, axis) in _TOP_MAP.items():
        sources[hf] = (meta, axis, 0)
    for i in range(n_layers):
        for hf, (meta, axis) in _LAYER_MAP.items():
            heads = {"self_attn.q_proj.weight": n_heads, "self_attn.k_proj.weight": n_kv_heads}.get(hf, 0)
            sources[f"model.layers.{i}.{hf}"] = (f"layers.{i}.{meta}", axis, heads)

    def get(name: str) -> torch.Tensor:
        meta, axis, heads = sources[name]
        ws = parts(meta)
        w = ws[0] if axis is None or len(ws) == 1 else torch.cat(ws, dim=axis)
        return permute_rotary(w, heads) if heads else w

    def shape(name: str) -> tuple:
        meta, axis, _ = sources[name]
        ws = parts(meta)
        out = list(ws[0].shape)
        if axis is not None:
            out[axis] = sum(w.shape[axis] for w in ws)
        return tuple(out)

    names_shapes = [(n, shape(n)) for n in sources]  # checks every tensor exists before writing
    out = write_checkpoint(out_dir, config, names_shapes, get, torch_dtype,
                           max_shard_bytes=max_shard_bytes)
    save_tokenizer_from_sentencepiece(tok_file, out)
    return out
