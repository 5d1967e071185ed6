"""Downstream metrics: answer extraction, exact match, and greedy generation on test records.

Records are JSON objects from a JSON list or a JSONL file, in GSM8K form {"question",
"answer"} (the answer ends "#### N") or alpaca form {"instruction", "input", "output"}.
torch/transformers/peft are imported inside the functions that need them, so the bench's
pure parts stay cheap to import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _normalise_number(text: str) -> Optional[str]:
    """'$1,234.00' -> '1234'; '-0.50' -> '-0.5'; None if it is not a number."""
    t = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        x = float(t)
    except ValueError:
        return None
    if x.is_integer():
        return str(int(x))
    return repr(x)


def gsm8k_answer(text: str) -> Optional[str]:
    """The final answer of a GSM8K solution: the number after the last '####', else the last
    number in the text; commas and '$' stripped, integral values written as integers."""
    if text is None:
        return None
    if "####" in text:
        m = _NUMBER.search(text.rsplit("####", 1)[1])
        if m:
            return _normalise_number(m.group())
    found = _NUMBER.findall(text)
    return _normalise_number(found[-1]) if found else None


def exact_match(preds: Sequence[Optional[str]], golds: Sequence[Optional[str]]) -> float:
    """Share of predictions equal to their gold answer (a None prediction is wrong)."""
    if len(preds) != len(golds):
        raise ValueError(f"exact_match: {len(preds)} predictions for {len(golds)} gold answers")
    if not golds:
        return 0.0
    return sum(p is not None and p == g for p, g in zip(preds, golds)) / len(golds)


def load_records(path: str | Path, limit: Optional[int] = None) -> list[dict]:
    """The first `limit` records of a JSON list or JSONL file; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: metric records file not found")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not a JSON object ({e.msg})") from None
            if limit is not None and len(records) >= limit:
                break
    return records[:limit] if limit is not None else records


def prompt_text(record: dict) -> str:
    """The question of a record: GSM8K 'question', or alpaca 'instruction' + 'input'."""
    if "question" in record:
        return record["question"]
    if "instruction" in record:
        extra = record.get("input") or ""
        return record["instruction"] + (f"\n\n{extra}" if extra else "")
    raise ValueError(f"record has neither 'question' nor 'instruction': keys {sorted(record)}")


def gold_text(record: dict) -> str:
    """The reference answer of a record: GSM8K 'answer' or alpaca 'output'."""
    for key in ("answer", "output"):
        if key in record:
            return record[key]
    raise ValueError(f"record has neither 'answer' nor 'output': keys {sorted(record)}")


def training_prompt(template: str, tokenizer: Any) -> Callable[[dict], str]:
    """prompt_fn that renders a record's prompt as training rendered it (dirtune.data's
    templates, `template` = the run's data.template), up to where the response starts.

    llama2/plain: the leading BOS is left to the tokenizer, which adds it when the prompt is
    encoded. A chat template writes its own special tokens (training encodes its text without
    adding any), so its prompt_fn carries `add_special_tokens = False` for `generate`."""
    from dirtune.data.records import Alpaca
    from dirtune.data.templates import render, resolve_template

    chosen = resolve_template("alpaca", template, tokenizer)

    def prompt_fn(record: dict) -> str:
        if "instruction" in record:
            ex = Alpaca(record["instruction"], record.get("input") or "", gold_text(record), 0)
        else:  # GSM8K: the question is the instruction, as dirtune.data reads it
            ex = Alpaca(prompt_text(record), "", gold_text(record), 0)
        text = ""
        for seg in render(ex, chosen, tokenizer):
            if seg.labelled:
                break
            text += seg.text  # special segments ('bos') carry no text
        if chosen == "tokenizer":
            return text
        bos = getattr(tokenizer, "bos_token", None)
        return text[len(bos):] if bos and text.startswith(bos) else text

    prompt_fn.add_special_tokens = chosen != "tokenizer"
    return prompt_fn


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int, add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of `prompts` (new text only), batched with left padding."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched decoding needs the prompts right-aligned
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    device = next(model.parameters()).device
    outputs: list[str] = []
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                            **({} if add_special_tokens else {"add_special_tokens": False}))
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def evaluate_generation(model: Any, tokenizer: Any, records: Sequence[dict],
                        prompt_fn: Callable[[dict], str], max_new_tokens: int = 256,
                        batch_size: int = 16,
                        answer_fn: Callable[[str], Optional[str]] = gsm8k_answer) -> dict:
    """Exact match of answer_fn(greedy generation) against answer_fn(gold) over `records`.

    Returns {"exact_match", "n", "samples": [{"prompt", "generation", "pred", "gold"}]}.
    """
    prompts = [prompt_fn(r) for r in records]
    gens = generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                    add_special_tokens=getattr(prompt_fn, "add_special_tokens", True))
    preds = [answer_fn(g) for g in gens]
    golds = [answer_fn(gold_text(r)) for r in records]
    samples = [{"prompt": p, "generation": g, "pred": a, "gold": b}
               for p, g, a, b in zip(prompts, gens, preds, golds)]
    return {"exact_match": exact_match(preds, golds), "n": len(records), "samples": samples}


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) from a save_pretrained folder: a PEFT adapter (adapter_config.json,
    on its recorded base model) or a full transformers checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if (p / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        from dirtune.models.convert_gguf import is_gguf

        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if is_gguf(base):  # peft cannot read a .gguf base model; dirtune's loader can
            from dirtune.models.lora import load_for_inference

            model, _ = load_for_inference(p, device=device)
            return model, AutoTokenizer.from_pretrained(str(p))

        model = AutoPeftModelForCausalLM.from_pretrained(str(p), dtype="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype="auto")
    return model.to(device), AutoTokenizer.from_pretrained(str(p))


METRICS: dict[str, Callable[[str], Optional[str]]] = {"gsm8k": gsm8k_answer}
