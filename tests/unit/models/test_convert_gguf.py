"""GGUF -> transformers: tiny GGUF files written on the spot convert back to the weights they hold."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dirtune.cli import main  # noqa: E402
from dirtune.models.convert_gguf import convert_gguf, is_gguf, load_gguf_model  # noqa: E402
from dirtune.models.errors import ModelError  # noqa: E402
from dirtune.models.loading import load_model, load_tokenizer  # noqa: E402

HEADS, KV_HEADS = 4, 2
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, i, rest = hf.split(".", 3)  # model.layers.{i}.{module}.weight
    return f"blk.{i}.{LAYER_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def unpermute(w, n_heads):
    """llama.cpp's interleaved-pair q/k rows back to rotate_half order (the inverse of its permute)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def expected_weights(stored: dict, tied: bool) -> dict:
    """What transformers should hold: the stored (dequantized) tensors, q/k rows un-permuted."""
    out = {}
    for hf in [*GGUF_NAMES, *(f"model.layers.{i}.{m}.weight" for i in range(2) for m in LAYER_NAMES)]:
        g = gguf_name("model.embed_tokens.weight" if tied and hf == "lm_head.weight" else hf)
        w = stored[g]
        if ".attn_q." in g:
            w = unpermute(w, HEADS)
        elif ".attn_k." in g:
            w = unpermute(w, KV_HEADS)
        out[hf] = torch.from_numpy(w.copy())
    return out


@pytest.mark.parametrize("qtype,tied", [("F32", False), ("Q8_0", True)])
def test_converts_to_the_dequantized_weights(gguf_writer, tmp_path, qtype, tied):
    path, original, stored = gguf_writer(tmp_path / f"tiny-{qtype}.gguf", qtype, tied)
    out = convert_gguf(path, tmp_path / "hf", dtype="fp32")

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is tied
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert getattr(model, "hf_quantizer", None) is None

    sd = model.state_dict()
    want = expected_weights(stored, tied)
    for name, w in want.items():
        torch.testing.assert_close(sd[name], w, rtol=0, atol=0, msg=name)
    if qtype == "F32":  # stored exactly: the converted model is the one the file was written from
        ref = original.state_dict()
        for name in want:
            torch.testing.assert_close(sd[name], ref[name], rtol=0, atol=0, msg=name)
        ids = torch.tensor([[1, 40, 70, 200, 261, 9]])
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)
    else:  # quantized: the 8-bit rounding shows, but stays within a block's step
        q = sd["model.layers.0.self_attn.q_proj.weight"]
        ref = original.state_dict()["model.layers.0.self_attn.q_proj.weight"]
        assert not torch.equal(q, ref)
        assert (q - ref).abs().max() < ref.abs().max() / 100
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    text = "hello the world<|im_end|>"
    assert tok(text).input_ids == load_tokenizer(path)(text).input_ids
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_dtype_and_refuses_a_used_folder(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ModelError, match="already exists and is not an empty folder"):
        convert_gguf(tiny_gguf, out)
    assert sorted(p.name for p in out.iterdir()) == before


def test_gguf_as_model_path(tiny_gguf):
    model = load_model(str(tiny_gguf), dtype="bf16")
    assert getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.device.type for b in model.buffers()} == {"cpu"}
    # adapters trained on it record the file as their base
    assert model.name_or_path == str(tiny_gguf.resolve())
    tok = load_tokenizer(tiny_gguf)
    assert tok.pad_token is not None and tok.chat_template
    torch.manual_seed(3)
    scratch = load_model(str(tiny_gguf), from_scratch=True)
    assert scratch.config.num_key_value_heads == KV_HEADS
    assert not torch.equal(scratch.model.embed_tokens.weight, model.model.embed_tokens.weight.float())


def test_errors_are_one_line(tmp_path, monkeypatch, tiny_gguf):
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_gguf_model(tmp_path / "none.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match=r"not a GGUF file"):
        load_model(str(fake))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 8)
    with pytest.raises(ModelError, match="is a file; expected a transformers checkpoint folder or a .gguf file"):
        load_model(str(other))
    assert not is_gguf(tmp_path) and is_gguf(tiny_gguf)

    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match=r"needs the gguf package: pip install 'dirtune\[gguf\]'") as e:
        load_tokenizer(tiny_gguf)
    assert "\n" not in str(e.value)


def test_cli_convert_gguf(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["convert", "gguf", str(tiny_gguf), str(out), "--dtype", "fp16"]) == 0
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert main(["convert", "gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "x")]) == 2
    assert "missing.gguf: GGUF file not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_smollm2_answers_paris(shared_dir, tmp_path):
    """The real SmolLM2-135M-Instruct Q4_1 file converts to a model that still knows its facts,
    asked the way `dirtune chat` asks (its chat template)."""
    from dirtune.models.lora import Conversation, load_for_inference

    src = shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not src.is_file():
        pytest.skip(f"{src} is not there")
    out = convert_gguf(src, tmp_path / "smollm2", dtype="bf16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, tok = load_for_inference(out)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert "<|im_start|>" in tok.chat_template
    answer = Conversation(model, tok, max_new_tokens=16).reply("What is the capital of France?")
    assert "Paris" in answer, answer
