"""Meta release -> transformers: a fake two-shard release written from a tiny model converts back to it."""

from __future__ import annotations

import json

import pytest
import torch

from dirtune.models.convert_meta import convert_meta, meta_intermediate_size, permute_rotary
from dirtune.models.errors import ModelError
from dirtune.models.loading import find_weight_files, load_model, load_tokenizer

DIM, HEADS, KV_HEADS, LAYERS, MULTIPLE_OF, VOCAB = 32, 4, 2, 2, 16, 320
IDS = torch.tensor([[1, 7, 300, 12, 99, 4, 250, 31]])


META_WORDS = "the cat dog sat on a mat and ran to big small red blue house tree Lily Tom park".split()


def unpermute(w, n_heads):
    """Inverse of permute_rotary: rotate_half row order back to interleaved pairs."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, 2, hd // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def write_meta_release(train_spm, model, folder, n_shards=2, tokenizer_in_parent=False, ffn_dim_multiplier=None):
    """Write `model` the way Meta's model-parallel checkpoints are laid out."""
    folder.mkdir(parents=True)
    sd = model.state_dict()
    meta = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1),
            "norm.weight": (sd["model.norm.weight"], None),
            "output.weight": (sd["lm_head.weight"], 0),
            "rope.freqs": (torch.zeros(DIM // HEADS // 2), None)}  # Meta stores it; the converter ignores it
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        meta[f"layers.{i}.attention.wq.weight"] = (unpermute(sd[p + "self_attn.q_proj.weight"], HEADS), 0)
        meta[f"layers.{i}.attention.wk.weight"] = (unpermute(sd[p + "self_attn.k_proj.weight"], KV_HEADS), 0)
        meta[f"layers.{i}.attention.wv.weight"] = (sd[p + "self_attn.v_proj.weight"], 0)
        meta[f"layers.{i}.attention.wo.weight"] = (sd[p + "self_attn.o_proj.weight"], 1)
        meta[f"layers.{i}.feed_forward.w1.weight"] = (sd[p + "mlp.gate_proj.weight"], 0)
        meta[f"layers.{i}.feed_forward.w2.weight"] = (sd[p + "mlp.down_proj.weight"], 1)
        meta[f"layers.{i}.feed_forward.w3.weight"] = (sd[p + "mlp.up_proj.weight"], 0)
        meta[f"layers.{i}.attention_norm.weight"] = (sd[p + "input_layernorm.weight"], None)
        meta[f"layers.{i}.ffn_norm.weight"] = (sd[p + "post_attention_layernorm.weight"], None)
    for r in range(n_shards):
        shard = {k: (w.clone() if axis is None else w.chunk(n_shards, dim=axis)[r].clone())
                 for k, (w, axis) in meta.items()}
        torch.save(shard, folder / f"consolidated.{r:02d}.pth")
    params = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS,
              "multiple_of": MULTIPLE_OF, "norm_eps": 1e-5, "vocab_size": -1}
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    (folder / "params.json").write_text(json.dumps(params))
    train_spm((folder.parent if tokenizer_in_parent else folder) / "tokenizer.model", META_WORDS)
    return folder


@pytest.fixture
def tiny_model(tiny_llama):
    """`tiny_model(ffn_dim_multiplier=None)`: a tiny LLaMA of the sizes above, seeded with 0."""
    def build(ffn_dim_multiplier=None):
        return tiny_llama(vocab_size=VOCAB, hidden_size=DIM,
                          intermediate_size=meta_intermediate_size(DIM, MULTIPLE_OF, ffn_dim_multiplier),
                          num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                          rms_norm_eps=1e-5, tie_word_embeddings=False).eval()

    return build


@pytest.mark.parametrize("n_shards,in_parent,mult", [(2, False, None), (1, True, 1.5)])
def test_fake_release_converts_to_the_same_model(tmp_path, train_spm, n_shards, in_parent, mult, tiny_model):
    model = tiny_model(mult)
    src = write_meta_release(train_spm, model, tmp_path / "rel" / "llama-tiny", n_shards, in_parent, mult)
    out = convert_meta(src, tmp_path / "hf", dtype="fp32")
    loaded = load_model(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)
    assert loaded.config.num_key_value_heads == KV_HEADS
    assert loaded.config.intermediate_size == model.config.intermediate_size
    tok = load_tokenizer(out)
    assert len(tok) == 300 and tok("the cat").input_ids[0] == 1


def test_dtype_and_sharded_output(tmp_path, train_spm, tiny_model):
    src = write_meta_release(train_spm, tiny_model(), tmp_path / "rel")
    out = convert_meta(src, tmp_path / "hf", dtype="bf16", max_shard_bytes=20_000)
    assert len(find_weight_files(out)) > 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["max_position_embeddings"] == 4096
    loaded = load_model(str(out), dtype="bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_intermediate_size_as_meta_computes_it():
    assert meta_intermediate_size(4096, 256) == 11008            # LLaMA 2 7B
    assert meta_intermediate_size(5120, 256) == 13824            # LLaMA 2 13B
    assert meta_intermediate_size(8192, 4096, 1.3) == 28672      # LLaMA 2 70B


def test_permutation_turns_interleaved_rope_into_rotate_half():
    torch.manual_seed(0)
    n_heads, hd, dim, pos = 2, 8, 16, 5.0
    w, x = torch.randn(n_heads * hd, dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    angle = pos * 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)   # (hd/2,)
    cos, sin = angle.cos(), angle.sin()
    # Meta: rotate pairs (2j, 2j+1) of each head
    z = (w @ x).view(n_heads, hd // 2, 2)
    meta = torch.stack([z[..., 0] * cos - z[..., 1] * sin, z[..., 0] * sin + z[..., 1] * cos], -1)
    # transformers: x * cos + rotate_half(x) * sin with cos/sin repeated over both halves
    y = (permute_rotary(w, n_heads) @ x).view(n_heads, hd)
    c2, s2 = torch.cat([cos, cos]), torch.cat([sin, sin])
    hf = y * c2 + torch.cat([-y[:, hd // 2:], y[:, :hd // 2]], -1) * s2
    torch.testing.assert_close(permute_rotary(meta.reshape(-1, 1), n_heads).view(n_heads, hd), hf)


def test_missing_pieces_name_the_path(tmp_path, train_spm, tiny_model):
    src = write_meta_release(train_spm, tiny_model(), tmp_path / "rel")
    (src / "params.json").rename(src / "p.bak")
    with pytest.raises(ModelError, match=r"rel[/\\]params.json: params.json not found"):
        convert_meta(src, tmp_path / "hf")
    (src / "p.bak").rename(src / "params.json")
    (src / "tokenizer.model").unlink()
    with pytest.raises(ModelError, match="tokenizer.model not found"):
        convert_meta(src, tmp_path / "hf")
    for f in src.glob("consolidated.*.pth"):
        f.unlink()
    with pytest.raises(ModelError, match=r"rel: no consolidated\.\*\.pth"):
        convert_meta(src, tmp_path / "hf")
    with pytest.raises(ModelError, match="nowhere: Meta release folder not found"):
        convert_meta(tmp_path / "nowhere", tmp_path / "hf")


def test_params_that_contradict_the_weights(tmp_path, train_spm, tiny_model):
    src = write_meta_release(train_spm, tiny_model(), tmp_path / "rel")
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps(dict(params, multiple_of=64)))
    with pytest.raises(ModelError, match="FFN size of 128 but the weights have 96"):
        convert_meta(src, tmp_path / "hf")
    (src / "params.json").write_text(json.dumps(dict(params, vocab_size=1000)))
    with pytest.raises(ModelError, match="vocab_size 1000 but tok_embeddings has 320 rows"):
        convert_meta(src, tmp_path / "hf")
    (src / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "n_heads"}))
    with pytest.raises(ModelError, match="missing key 'n_heads'"):
        convert_meta(src, tmp_path / "hf")
