"""Answer extraction, exact match, record loading and batched greedy generation."""

import json

import pytest
import torch

from dirtune.bench.tasks import (
    evaluate_generation, exact_match, gsm8k_answer, load_records, prompt_text, training_prompt,
)


@pytest.mark.parametrize("text, answer", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("#### 18.00", "18"),
    ("#### $7.5", "7.5"),
    ("first 3 then #### 4 and later 9", "4"),           # the number after ####, not the last
    ("The answer is $1,000.", "1000"),                  # no ####: the last number
    ("It is 2. Then 3.", "3"),
    ("no digits at all", None),
    ("the total is 12 #### unknown", "12"),  # nothing numeric after ####: the last number
])
def test_gsm8k_answer(text, answer):
    assert gsm8k_answer(text) == answer


def test_exact_match():
    assert exact_match(["1", None, "3"], ["1", "2", "4"]) == pytest.approx(1 / 3)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1"):
        exact_match(["1", "2"], ["1"])


def test_load_records_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"question": "q1", "answer": "#### 1"}] * 3))
    assert len(load_records(tmp_path / "a.json", 2)) == 2
    (tmp_path / "b.jsonl").write_text('{"instruction": "i", "input": "x", "output": "o"}\n\nnot json\n')
    assert prompt_text(load_records(tmp_path / "b.jsonl", 1)[0]) == "i\n\nx"
    with pytest.raises(ValueError, match=r"b\.jsonl:3"):
        load_records(tmp_path / "b.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_records(tmp_path / "missing.jsonl")


class CharTokenizer:
    """Enough of a tokenizer for generate(): one id per character, pad 0, eos 2."""

    pad_token_id, eos_token, unk_token = 0, "</s>", "<unk>"

    def __init__(self):
        self.padding_side = "right"

    def __call__(self, texts, return_tensors="pt", padding=True):
        ids = [[1] + [3 + ord(c) % 120 for c in t] for t in texts]
        width = max(map(len, ids))
        rows, masks = [], []
        for r in ids:
            pad = [0] * (width - len(r))
            rows.append(pad + r if self.padding_side == "left" else r + pad)
            masks.append([0] * len(pad) + [1] * len(r) if self.padding_side == "left"
                         else [1] * len(r) + [0] * len(pad))
        return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(int(i)) for i in r if i > 2) for r in rows]


def test_batched_generation_equals_one_by_one(tiny_llama):
    model = tiny_llama(vocab_size=128, num_key_value_heads=4, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    records = [{"question": "a", "answer": "#### 1"},
               {"question": "a much longer question", "answer": "#### 2"},
               {"question": "mid size", "answer": "#### 3"}]
    tok = CharTokenizer()
    batched = evaluate_generation(model, tok, records, prompt_text, max_new_tokens=6, batch_size=3)
    single = evaluate_generation(model, tok, records, prompt_text, max_new_tokens=6, batch_size=1)
    assert [s["generation"] for s in batched["samples"]] == [s["generation"] for s in single["samples"]]
    assert batched["n"] == 3 and [s["gold"] for s in batched["samples"]] == ["1", "2", "3"]
    assert tok.padding_side == "right"  # restored


def test_training_prompt_renders_as_training_does_up_to_the_response():
    synthetic = pytest.importorskip("dirtune.data.synthetic")
    tok = synthetic.char_tokenizer()
    gsm = {"question": "How many?", "answer": "#### 3"}
    assert training_prompt("auto", tok)(gsm) == "[INST] How many? [/INST]"
    plain = training_prompt("plain", tok)({"instruction": "Do", "input": "x", "output": "o"})
    assert plain == "### Instruction:\nDo\n\n### Input:\nx\n\n### Response:\n"


@pytest.mark.parametrize("chat_template", [None, "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
                                                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"])
def test_training_prompt_gives_the_ids_training_gave(chat_template):
    """What generation is fed (prompt_fn's text, encoded as generate() encodes it) is exactly
    the unlabelled start of the training example, with and without a chat template."""
    synthetic = pytest.importorskip("dirtune.data.synthetic")
    from dirtune.data.records import Alpaca
    from dirtune.data.templates import render, resolve_template
    from dirtune.data.tokenize import IGNORE_INDEX, encode_examples

    tok = synthetic.char_tokenizer()
    tok.chat_template = chat_template
    record = {"question": "How many apples?", "answer": "#### 3"}
    template = resolve_template("alpaca", "auto", tok)
    assert template == ("tokenizer" if chat_template else "llama2")
    segments = render(Alpaca(record["question"], "", record["answer"], 1), template, tok)
    ids, labels = encode_examples(tok, [segments], split_special=template != "tokenizer")[0]
    n_prompt = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    prompt_fn = training_prompt("auto", tok)
    text = prompt_fn(record)
    fed = tok(text, add_special_tokens=getattr(prompt_fn, "add_special_tokens", True)).input_ids
    assert fed == ids[:n_prompt]
    if chat_template:  # the chat template's own markers, no BOS the template did not write
        assert text == "<|user|>\nHow many apples?</s>\n<|assistant|>\n" and fed[0] != tok.bos_token_id
    else:
        assert text == "[INST] How many apples? [/INST]" and fed[0] == tok.bos_token_id
