"""Loading checkpoints and tokenizers from local folders; the errors a person sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import LlamaForCausalLM

from dirtune.models.loading import (ModelError, check_tokenizer_matches, count_parameters,
                                    find_weight_files, load_model, load_tokenizer,
                                    save_tokenizer_from_sentencepiece, write_checkpoint)

WORDS = "the cat dog sat on a mat and ran to big small red blue house tree Lily Tom park play happy sun".split()


@pytest.fixture
def tiny_dir(tmp_path, tiny_llama):
    model = tiny_llama(vocab_size=320, max_position_embeddings=64).eval()
    out = tmp_path / "tiny"
    model.save_pretrained(out)
    return model, out


IDS = torch.tensor([[1, 5, 17, 99, 3, 250, 42]])


def test_round_trip_gives_same_logits(tiny_dir):
    model, path = tiny_dir
    loaded = load_model(str(path), attn_implementation="eager").eval()
    assert isinstance(loaded, LlamaForCausalLM)
    assert loaded.config._attn_implementation == "eager"
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=1e-6)


def test_dtype_from_config(tiny_dir):
    _, path = tiny_dir
    loaded = load_model(str(path), dtype="bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_from_scratch_needs_only_config_and_is_seeded(tiny_dir, tmp_path):
    model, path = tiny_dir
    only_config = tmp_path / "cfg_only"
    only_config.mkdir()
    (only_config / "config.json").write_text((path / "config.json").read_text())
    cfg = str(only_config)
    torch.manual_seed(1)
    a = load_model(cfg, from_scratch=True)
    torch.manual_seed(1)
    b = load_model(cfg, from_scratch=True)
    wa, wb = a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, model.model.layers[0].self_attn.q_proj.weight)
    assert a.config.hidden_size == 32


@pytest.mark.parametrize("case", ["no_dir", "no_config", "no_weights"])
def test_missing_pieces_name_the_path(tiny_dir, tmp_path, case):
    _, path = tiny_dir
    if case == "no_dir":
        path = tmp_path / "nowhere"
        expect = "model folder not found"
    elif case == "no_config":
        (path / "config.json").unlink()
        expect = "no config.json"
    else:
        (path / "model.safetensors").unlink()
        expect = "no model weights (model.safetensors, model-*.safetensors, pytorch_model*.bin)"
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert str(path) in str(e.value) and expect in str(e.value)


def test_sharded_checkpoint_writer(tiny_dir, tmp_path):
    model, _ = tiny_dir
    sd = {k: v for k, v in model.state_dict().items()}
    out = write_checkpoint(tmp_path / "sharded", model.config, [(k, v.shape) for k, v in sd.items()],
                           sd.__getitem__, torch.float32, max_shard_bytes=20_000)
    files = find_weight_files(out)
    assert len(files) > 2 and files[0].name.startswith("model-00001-of-")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    loaded = load_model(str(out)).eval()
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=1e-6)


def test_tokenizer_from_sentencepiece_only_folder(tmp_path, train_spm):
    folder = tmp_path / "sp"
    folder.mkdir()
    train_spm(folder / "tokenizer.model", WORDS)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = load_tokenizer(folder)
    text = "Lily and Tom ran to the big  red house.\nThe sun!"
    assert tok(text).input_ids == [1] + sp.encode(text)
    assert tok.pad_token == "<unk>" and tok.pad_token_id == 0 and tok.padding_side == "right"
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == sp.decode(sp.encode(text))


def test_save_tokenizer_from_sentencepiece_round_trip(tmp_path, train_spm):
    model_file = train_spm(tmp_path / "m.model", WORDS)
    out = tmp_path / "tok"
    save_tokenizer_from_sentencepiece(model_file, out)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()
    tok = load_tokenizer(out)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    text = "the happy dog sat on a mat"
    assert tok(text).input_ids == [1] + sp.encode(text)
    assert tok.padding_side == "right" and tok.pad_token_id == 0
    batch = tok(["a b c", "a"], padding=True)
    assert batch["input_ids"][1][-1] == 0 and batch["attention_mask"][1][-1] == 0


def test_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(ModelError, match="tok_missing: tokenizer folder not found"):
        load_tokenizer(tmp_path / "tok_missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="empty: no tokenizer"):
        load_tokenizer(empty)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelError, match="bad.model: not a SentencePiece model"):
        load_tokenizer(bad)


def test_check_tokenizer_matches(tmp_path, train_spm, tiny_llama):
    tok = load_tokenizer(train_spm(tmp_path / "m.model", WORDS))  # 300 tokens
    check_tokenizer_matches(tiny_llama(vocab_size=320), tok)
    with pytest.raises(ModelError) as e:
        check_tokenizer_matches(tiny_llama(vocab_size=200), tok)
    assert "300 tokens" in str(e.value) and "200 rows" in str(e.value)


def test_count_parameters_counts_tied_once_and_trainable(tiny_llama):
    model = tiny_llama(vocab_size=320, tie_word_embeddings=True)
    counts = count_parameters(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert counts == {"total": sum(unique.values()), "trainable": sum(unique.values())}
    model.get_input_embeddings().weight.requires_grad_(False)
    assert count_parameters(model)["trainable"] == counts["total"] - 320 * 32


SHARED = Path(__file__).resolve().parents[3].parent / "shared"
PARITY_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello\n\nworld  two  spaces", " leading space",
                "trailing  ", "émoji 🙂 ü 12345 日本語", "", "   ", "x" * 40, "Tab\there, \u00a0nbsp"]


@pytest.mark.parametrize("name", ["tokenizer.model", "tok512.model"])
def test_real_llama_tokenizers_encode_like_sentencepiece(name, tmp_path):
    model_file = SHARED / "bench" / name
    if not model_file.is_file():
        pytest.skip(f"{model_file} is absent")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    save_tokenizer_from_sentencepiece(model_file, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert len(tok) == sp.get_piece_size()
    for text in PARITY_TEXTS:
        ids = tok(text).input_ids
        assert ids == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), text
