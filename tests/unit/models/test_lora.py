"""LoRA via PEFT: what is trainable, target errors, merging, LoRA+ groups, loading for inference."""

from __future__ import annotations

import io
import random

import pytest
import sentencepiece as spm
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from dirtune.models.errors import ModelError
from dirtune.models.loading import load_model, save_tokenizer_from_sentencepiece
from dirtune.models.param_groups import lora_param_groups
from dirtune.models.lora import (apply_lora, generate_text, load_for_inference,
                                 merge_lora, prepare_full_finetune)
from dirtune.train.config import FinetuneConfig

IDS = torch.tensor([[1, 7, 200, 12, 99, 4, 150, 31]])


@pytest.fixture
def tiny_model(tiny_llama):
    """`tiny_model(tie=False)`: a tiny LLaMA with 320 tokens, seeded with 0, in eval mode."""
    return lambda tie=False: tiny_llama(vocab_size=320, tie_word_embeddings=tie).eval()


def lora_cfg(**kw):
    return FinetuneConfig(**{"lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, **kw})


def randomize_b(model):
    """LoRA starts with B = 0 (a no-op); give B values so that the adapters change the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture
def base_dir(tmp_path, tiny_model):
    """A tiny base checkpoint with a tokenizer, loaded back through load_model (as training does)."""
    words = "the cat dog sat on a mat and ran to big red house tree Lily Tom park".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + "." for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    (tmp_path / "sp.model").write_bytes(buf.getvalue())
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    save_tokenizer_from_sentencepiece(tmp_path / "sp.model", base)
    return base


def test_only_adapters_train_and_start_as_the_base(tiny_model):
    model = tiny_model()
    with torch.no_grad():
        before = model(IDS).logits
    peft_model = apply_lora(model, lora_cfg(lora_targets=["q_proj", "v_proj", "down_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x 3 targets x (A, B)
    assert len(trainable) == 12
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, before, rtol=0, atol=0)


def test_bad_target_names_it_and_what_exists(tiny_model):
    with pytest.raises(ModelError) as e:
        apply_lora(tiny_model(), lora_cfg(lora_targets=["q_proj", "qproj", "mlp.gate"]))
    msg = str(e.value)
    assert "qproj, mlp.gate match no linear module" in msg
    assert "q_proj" in msg.split("are")[1] and "down_proj" in msg and "lm_head" in msg
    # a dotted suffix of a real module name is a valid target (PEFT's rule)
    apply_lora(tiny_model(), lora_cfg(lora_targets=["mlp.gate_proj"]))


def test_merge_gives_the_lora_model_logits(tiny_model):
    peft_model = apply_lora(tiny_model(), lora_cfg())
    randomize_b(peft_model)
    with torch.no_grad():
        adapted = peft_model(IDS).logits
        assert not torch.allclose(adapted, tiny_model()(IDS).logits, atol=1e-3)
        merged = merge_lora(peft_model)
        assert not isinstance(merged, PeftModel)
        torch.testing.assert_close(merged(IDS).logits, adapted, rtol=0, atol=1e-5)
    with pytest.raises(ModelError, match="no LoRA adapters"):
        merge_lora(tiny_model())


@pytest.mark.parametrize("ratio", [None, 16.0])
def test_loraplus_groups(ratio, tiny_model):
    peft_model = apply_lora(tiny_model(), lora_cfg(use_dora=True))
    groups = {g["name"]: g for g in lora_param_groups(peft_model, lr=1e-3, weight_decay=0.1, loraplus_ratio=ratio)}
    assert set(groups) == {"lora_A", "lora_B", "no_decay"}
    assert groups["lora_A"]["lr"] == 1e-3 and groups["lora_A"]["weight_decay"] == 0.1
    assert groups["lora_B"]["lr"] == pytest.approx(1e-3 * (ratio or 1.0))
    assert groups["no_decay"]["weight_decay"] == 0.0  # DoRA magnitudes
    n_trainable = sum(p.requires_grad for p in peft_model.parameters())
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable
    torch.optim.AdamW(list(groups.values()))  # torch accepts the groups as they are


def test_load_for_inference_adapter_and_merged_agree(base_dir, tmp_path):
    peft_model = apply_lora(load_model(str(base_dir)), lora_cfg())
    randomize_b(peft_model)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    merged_dir = tmp_path / "merged"
    merge_lora(peft_model).save_pretrained(merged_dir)
    save_tokenizer_from_sentencepiece(tmp_path / "sp.model", merged_dir)

    a_model, a_tok = load_for_inference(adapter)
    m_model, m_tok = load_for_inference(merged_dir)
    assert isinstance(a_model, PeftModel) and not a_model.training
    assert a_tok("the cat").input_ids == m_tok("the cat").input_ids
    with torch.no_grad():
        torch.testing.assert_close(a_model(IDS).logits, m_model(IDS).logits, rtol=0, atol=1e-5)
        base_logits = load_model(str(base_dir))(IDS).logits
        assert not torch.allclose(a_model(IDS).logits, base_logits, atol=1e-3)

    moved = tmp_path / "moved_base"
    base_dir.rename(moved)
    with pytest.raises(ModelError, match="base model folder .* not found; pass the base model folder"):
        load_for_inference(adapter)
    b_model, _ = load_for_inference(adapter, base=moved)
    with torch.no_grad():
        torch.testing.assert_close(b_model(IDS).logits, m_model(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_prepare_full_finetune(tie, tiny_model):
    model = tiny_model(tie)
    for p in model.parameters():
        p.requires_grad_(False)
    prepare_full_finetune(model, train_embeddings=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == ({"model.embed_tokens.weight"} if tie else {"model.embed_tokens.weight", "lm_head.weight"})
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad
    prepare_full_finetune(model, train_embeddings=True)
    assert all(p.requires_grad for p in model.parameters())


def test_generate_text_returns_only_the_continuation(base_dir):
    model, tok = load_for_inference(base_dir)
    model.train()
    a = generate_text(model, tok, "the cat", max_new_tokens=6)
    b = generate_text(model, tok, "the cat", max_new_tokens=6)
    assert isinstance(a, str) and a == b and model.training  # greedy is deterministic; mode restored
    ids = model.generate(**tok("the cat", return_tensors="pt"), max_new_tokens=6, do_sample=False,
                         pad_token_id=tok.pad_token_id)[0]
    assert tok.decode(ids, skip_special_tokens=True) == "the cat" + a


CHATML = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@pytest.fixture
def record_generate(monkeypatch):
    """Every input_ids tensor LlamaForCausalLM.generate is called with, as lists."""
    seen = []
    original = LlamaForCausalLM.generate

    def generate(self, *args, **kw):
        seen.append(kw["input_ids"][0].tolist())
        return original(self, *args, **kw)

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    return seen


@pytest.mark.parametrize("with_template", [False, True])
def test_generate_cli_templates_the_prompt_unless_raw(tiny_checkpoint, tmp_path, record_generate,
                                                      capsys, with_template):
    from transformers import AutoTokenizer

    from dirtune.cli import main

    ckpt = tiny_checkpoint
    if with_template:  # the same model, its tokenizer given a chat template
        ckpt = tmp_path / "with-template"
        ckpt.mkdir()
        for f in tiny_checkpoint.iterdir():
            (ckpt / f.name).write_bytes(f.read_bytes())
        tok = AutoTokenizer.from_pretrained(ckpt)
        tok.chat_template = CHATML
        tok.save_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert main(["generate", str(ckpt), "Who is Ann?", "--max-new-tokens", "3", "--raw"]) == 0
    assert main(["generate", str(ckpt), "Who is Ann?", "--max-new-tokens", "3"]) == 0
    raw, templated = record_generate
    assert raw == tok("Who is Ann?").input_ids  # as given, with the tokenizer's BOS
    if with_template:
        assert templated == tok("<|user|>Who is Ann?</s><|assistant|>", add_special_tokens=False).input_ids
    else:
        assert templated == tok("[INST] Who is Ann? [/INST]").input_ids
        assert templated[0] == tok.bos_token_id
    assert templated != raw
    assert len(capsys.readouterr().out.splitlines()) >= 2


def test_conversation_keeps_and_resets_history(tiny_checkpoint, record_generate):
    from dirtune.models.lora import Conversation

    model, tok = load_for_inference(tiny_checkpoint)
    tok.chat_template = CHATML
    chat = Conversation(model, tok, system="Be brief.", max_new_tokens=4)
    first = chat.reply("Hi")
    chat.reply("And you?")
    assert chat.turns == [("Hi", first), ("And you?", chat.turns[1][1])]
    second_prompt = tok.decode(record_generate[1])
    want = f"<|system|>Be brief.</s><|user|>Hi</s><|assistant|>{first}</s><|user|>And you?</s><|assistant|>"
    assert second_prompt == want
    chat.reset()
    chat.reply("Again")
    assert tok.decode(record_generate[2]) == "<|system|>Be brief.</s><|user|>Again</s><|assistant|>"
