"""llama2.c -> transformers: logits equal a llama2.c-layout reference forward; greedy text is the known story."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from dirtune.models.convert_llama2c import MAGIC, convert_llama2c, read_llama2c
from dirtune.models.errors import ModelError
from dirtune.models.loading import load_model, load_tokenizer
from dirtune.models.lora import generate_text

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
BIN = SHARED / "bench" / "stories260K.bin"
TOK = SHARED / "bench" / "tok512.model"
# llama2.c's test_all.py expects this from greedy decoding of stories260K from BOS
REFERENCE_START = "Once upon a time, there was a little girl named Lily"
TEXT = "Once upon a time, there was a little girl named Lily. She loved to play"

pytestmark = pytest.mark.skipif(not (BIN.is_file() and TOK.is_file()),
                                reason=f"{SHARED / 'bench'} with stories260K.bin and tok512.model is absent")


# ---------------------------------------------------------------- a reference written from llama2.c's layout

V0_ORDER = ["tok", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final",
            "freq_real", "freq_imag"]
V1_ORDER = ["rms_att", "rms_ffn", "rms_final", "tok", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def shapes(p):
    D, H, L, V, T = p["dim"], p["hidden"], p["layers"], p["vocab"], p["seq"]
    hs = D // p["heads"]
    KV = p["kv"] * hs
    return {"tok": (V, D), "rms_att": (L, D), "wq": (L, D, D), "wk": (L, KV, D), "wv": (L, KV, D),
            "wo": (L, D, D), "rms_ffn": (L, D), "w1": (L, H, D), "w2": (L, D, H), "w3": (L, H, D),
            "rms_final": (D,), "freq_real": (T, hs // 2), "freq_imag": (T, hs // 2), "wcls": (V, D)}


def read_v0(path):
    """Header dict and float64 arrays of a v0 file, parsed here independently of the converter."""
    dim, hidden, layers, heads, kv, vocab, seq = np.fromfile(path, dtype="<i4", count=7).tolist()
    p = dict(dim=dim, hidden=hidden, layers=layers, heads=heads, kv=kv, vocab=abs(vocab), seq=seq,
             shared=vocab > 0)
    flat = np.fromfile(path, dtype="<f4", offset=28).astype(np.float64)
    w, pos = {}, 0
    for name in V0_ORDER + ([] if p["shared"] else ["wcls"]):
        shape = shapes(p)[name]
        n = int(np.prod(shape))
        w[name] = flat[pos:pos + n].reshape(shape)
        pos += n
    assert pos == flat.size
    return p, w


def write_file(path, p, w, version):
    """Write arrays `w` as a llama2.c v0 or v1 file (wcls present in `w` means not shared)."""
    shared = "wcls" not in w
    with open(path, "wb") as f:
        if version == 0:
            vocab = p["vocab"] if shared else -p["vocab"]
            f.write(struct.pack("<7i", p["dim"], p["hidden"], p["layers"], p["heads"], p["kv"], vocab, p["seq"]))
            order = V0_ORDER
        else:
            head = struct.pack("<Ii7iB", MAGIC, 1, p["dim"], p["hidden"], p["layers"], p["heads"], p["kv"],
                               p["vocab"], p["seq"], int(shared))
            f.write(head + b"\0" * (256 - len(head)))
            order = V1_ORDER
        for name in order + ([] if shared else ["wcls"]):
            f.write(np.ascontiguousarray(w[name], dtype="<f4").tobytes())


def reference_logits(p, w, tokens):
    """llama2.c's forward (run.c / model.py) in float64: (T,) token ids -> (T, V) logits."""
    D, nh, nkv = p["dim"], p["heads"], p["kv"]
    hs = D // nh
    T = len(tokens)

    def rmsnorm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(x, n):  # x (T, n*hs): rotate pairs (x[2j], x[2j+1]) of each head by t * theta^(-2j/hs)
        freqs = 10000.0 ** (-np.arange(0, hs, 2) / hs)                   # (hs/2,)
        angle = np.arange(T)[:, None] * freqs[None, :]                    # (T, hs/2)
        z = x.reshape(T, n, hs // 2, 2)
        zc = (z[..., 0] + 1j * z[..., 1]) * np.exp(1j * angle)[:, None, :]  # (T, n, hs/2)
        return np.stack([zc.real, zc.imag], -1).reshape(T, n * hs)

    x = w["tok"][tokens]                                                  # (T, D)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(p["layers"]):
        h = rmsnorm(x, w["rms_att"][layer])
        q = rope(h @ w["wq"][layer].T, nh).reshape(T, nh, hs)
        k = rope(h @ w["wk"][layer].T, nkv).reshape(T, nkv, hs)
        v = (h @ w["wv"][layer].T).reshape(T, nkv, hs)
        out = np.empty((T, nh, hs))
        for head in range(nh):
            kvh = head // (nh // nkv)                                     # GQA: heads share kv heads
            s = q[:, head] @ k[:, kvh].T / np.sqrt(hs) + causal
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kvh]
        x = x + out.reshape(T, D) @ w["wo"][layer].T
        h = rmsnorm(x, w["rms_ffn"][layer])
        a = h @ w["w1"][layer].T
        x = x + ((a / (1 + np.exp(-a))) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    x = rmsnorm(x, w["rms_final"])
    return x @ w.get("wcls", w["tok"]).T


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = convert_llama2c(BIN, TOK, tmp_path_factory.mktemp("s260") / "hf")
    return load_model(str(out)).eval(), load_tokenizer(out), out


def tokens_of(text):
    return [1] + spm.SentencePieceProcessor(model_file=str(TOK)).encode(text)


def test_header_read_from_file():
    hdr, arrays = read_llama2c(BIN)
    assert (hdr.version, hdr.dim, hdr.hidden_dim, hdr.n_layers, hdr.n_heads, hdr.n_kv_heads,
            hdr.vocab_size, hdr.seq_len, hdr.shared_classifier) == (0, 64, 172, 5, 8, 4, 512, 512, True)
    assert sum(v.numel() for k, v in arrays.items() if not k.startswith("freq")) == 260_032


def test_logits_equal_llama2c_reference(converted):
    model, _, out = converted
    p, w = read_v0(BIN)
    tokens = tokens_of(TEXT)
    assert len(tokens) >= 18
    ref = reference_logits(p, w, tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    assert model.config.tie_word_embeddings and model.config.max_position_embeddings == 512


def test_greedy_story_is_the_reference(converted):
    model, tok, _ = converted
    assert tok("Once upon a time").input_ids == tokens_of("Once upon a time")
    from_bos = generate_text(model, tok, "", max_new_tokens=40)
    assert from_bos.startswith(REFERENCE_START), from_bos
    cont = generate_text(model, tok, "Once upon a time", max_new_tokens=20)
    assert ("Once upon a time" + cont).startswith(REFERENCE_START), cont


@pytest.mark.parametrize("version", [0, 1])
def test_unshared_classifier_and_v1_layout(tmp_path, version):
    p, w = read_v0(BIN)
    w = dict(w, wcls=np.random.default_rng(0).normal(0, 0.05, w["tok"].shape))  # a separate classifier
    path = tmp_path / f"v{version}.bin"
    write_file(path, p, w, version)
    out = convert_llama2c(path, TOK, tmp_path / "hf")
    model = load_model(str(out)).eval()
    assert not model.config.tie_word_embeddings
    tokens = tokens_of(TEXT)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    np.testing.assert_allclose(got, reference_logits(p, w, tokens), rtol=0, atol=1e-4)


def test_v1_shared_equals_v0(tmp_path, converted):
    model0, _, _ = converted
    p, w = read_v0(BIN)
    write_file(tmp_path / "v1.bin", p, w, version=1)
    model1 = load_model(str(convert_llama2c(tmp_path / "v1.bin", TOK, tmp_path / "hf")))
    for (n0, t0), (n1, t1) in zip(model0.state_dict().items(), model1.state_dict().items()):
        assert n0 == n1 and torch.equal(t0, t1), n0


@pytest.mark.parametrize("delta", [-4, 3])
def test_wrong_size_names_file_and_sizes(tmp_path, delta):
    data = BIN.read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:delta] if delta < 0 else data + b"\0" * delta)
    with pytest.raises(ModelError) as e:
        convert_llama2c(bad, TOK, tmp_path / "out")
    msg = str(e.value)
    assert str(bad) in msg and f"{len(data) + delta} bytes" in msg and f"implies {len(data)} bytes" in msg
    assert not (tmp_path / "out").exists()


def test_unsupported_version_and_garbage(tmp_path):
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(struct.pack("<Ii", MAGIC, 2) + b"\0" * 300)
    with pytest.raises(ModelError, match="version 2 is not supported"):
        convert_llama2c(v2, TOK, tmp_path / "o")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(struct.pack("<7i", 0, -1, 5, 3, 4, 512, 512))
    with pytest.raises(ModelError, match="junk.bin: not a llama2.c checkpoint"):
        convert_llama2c(junk, TOK, tmp_path / "o")
