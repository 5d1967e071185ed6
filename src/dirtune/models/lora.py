"""LoRA through PEFT, full fine-tuning setup, loading a trained model for inference, generation.

PEFT does the adapting; this module adds what it lacks: a readable error when a target name
matches nothing, and one loader for adapter and full checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from dirtune.models.convert_gguf import is_gguf
from dirtune.models.errors import ModelError
from dirtune.models.loading import load_model, load_tokenizer

__all__ = [
    "Conversation",
    "apply_lora",
    "generate_text",
    "linear_module_names",
    "load_for_inference",
    "merge_lora",
    "prepare_full_finetune",
    "prompt_ids",
]

PathLike = Union[str, Path]
ADAPTER_CONFIG = "adapter_config.json"


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted distinct last name components of the model's nn.Linear modules (q_proj, lm_head, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name})


def _matches(module_name: str, target: str) -> bool:
    # PEFT's rule for a list of names: the full name, or its last dotted components
    return module_name == target or module_name.endswith("." + target)


def apply_lora(model: nn.Module, cfg_finetune):
    """`model` wrapped as a peft PeftModel with LoRA (or DoRA) adapters on `cfg_finetune.lora_targets`.

    Only the adapters are trainable; at initialisation B = 0, so the model computes exactly
    what the base model does. ModelError if a target name matches no linear module.
    """
    from peft import LoraConfig, get_peft_model

    targets = list(cfg_finetune.lora_targets)
    if not targets:
        raise ModelError("finetune.lora_targets: empty; name at least one linear module, "
                         f"e.g. {', '.join(linear_module_names(model))}")
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(_matches(name, t) for name in linear)]
    if missing:
        raise ModelError(f"finetune.lora_targets: {', '.join(missing)} match no linear module; "
                         f"the model's linear modules are {', '.join(linear_module_names(model))}")
    lora_config = LoraConfig(
        r=cfg_finetune.lora_r,
        lora_alpha=cfg_finetune.lora_alpha,
        lora_dropout=cfg_finetune.lora_dropout,
        target_modules=targets,
        use_dora=cfg_finetune.use_dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def merge_lora(model) -> nn.Module:
    """The base model with the adapters folded into its weights (W0 + s·B·A), PEFT removed."""
    if not hasattr(model, "merge_and_unload"):
        raise ModelError(f"the model ({type(model).__name__}) has no LoRA adapters to merge; "
                         "give a LoRA adapter folder (with adapter_config.json)")
    return model.merge_and_unload()


def prepare_full_finetune(model: nn.Module, train_embeddings: bool = False) -> nn.Module:
    """Make every weight trainable except the input embeddings and lm_head (unless train_embeddings)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if not train_embeddings:
        # tied embeddings are one tensor: freezing either freezes both
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                for p in emb.parameters():
                    p.requires_grad_(False)
    return model


def _resolve_base(adapter_dir: Path, base: str) -> Path:
    """The base model an adapter names (a folder or a .gguf file): as written, else relative to
    the adapter folder."""
    cand = Path(base).expanduser()
    if cand.exists() or cand.is_absolute():
        return cand
    beside = adapter_dir / cand
    return beside if beside.exists() else cand


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_for_inference(path: PathLike, *, base: Optional[PathLike] = None, dtype: str = "fp32",
                       device: Optional[Union[str, torch.device]] = None,
                       attn_implementation: str = "sdpa"):
    """(model in eval mode, tokenizer) from a full/merged checkpoint folder, a .gguf file, or a
    PEFT adapter folder.

    An adapter folder (adapter_config.json) is applied to its base model (a folder or a .gguf
    file): `base`, else the config's base_model_name_or_path (as written, else relative to the
    adapter folder). The tokenizer comes from `path` when it holds one, else from the base model.
    """
    path = Path(path).expanduser()
    if is_gguf(path):
        model = load_model(path, dtype=dtype, attn_implementation=attn_implementation, device=device)
        model.eval()
        return model, load_tokenizer(path)
    if path.is_file():
        raise ModelError(f"{path}: is a file; expected a checkpoint or adapter folder or a .gguf file")
    if not path.is_dir():
        raise ModelError(f"{path}: model or adapter folder not found")
    acfg = path / ADAPTER_CONFIG
    if not acfg.is_file():
        model = load_model(path, dtype=dtype, attn_implementation=attn_implementation, device=device)
        tokenizer = load_tokenizer(path)
    else:
        from peft import PeftModel

        if base is None:
            try:
                base_name = json.loads(acfg.read_text()).get("base_model_name_or_path")
            except json.JSONDecodeError as e:
                raise ModelError(f"{acfg}: not valid JSON (line {e.lineno}): {e.msg}") from None
            if not base_name:
                raise ModelError(f"{acfg}: no base_model_name_or_path; pass the base model folder")
            base = _resolve_base(path, base_name)
        else:
            base = Path(base).expanduser()
        if not (base.is_dir() or is_gguf(base) and base.is_file()):
            raise ModelError(f"{acfg}: base model folder {base} not found; pass the base model folder")
        base_model = load_model(base, dtype=dtype, attn_implementation=attn_implementation)
        model = PeftModel.from_pretrained(base_model, str(path))
        if device is not None:
            model = model.to(device)
        tokenizer = load_tokenizer(path if _has_tokenizer(path) else base)
    model.eval()
    return model, tokenizer


def prompt_ids(tokenizer, messages: Sequence[tuple[str, str]], template: str = "auto") -> list[int]:
    """The ids of a conversation ((role, text) pairs ending in a user turn) up to where the
    model's reply starts, exactly as training renders and tokenizes chat data under `template`
    ('auto': the tokenizer's chat template if it has one, else LLaMA-2 [INST])."""
    from dirtune.data.templates import prompt_segments, resolve_template
    from dirtune.data.tokenize import encode_examples

    chosen = resolve_template("chat", template, tokenizer, "prompt")
    segments = prompt_segments(messages, chosen, tokenizer)
    return encode_examples(tokenizer, [segments], split_special=chosen != "tokenizer")[0][0]


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, prompt: Union[str, Sequence[int]], max_new_tokens: int = 64,
                  greedy: bool = True, **generate_kwargs) -> str:
    """The text the model continues `prompt` with (the prompt itself not repeated).

    A text prompt is tokenized as the tokenizer does (BOS first for LLaMA); a list of ids
    (e.g. from `prompt_ids`) is used as it is. `greedy=False` samples, with any `generate`
    options (temperature, top_p, ...) passed through.
    """
    device = next(model.parameters()).device
    if isinstance(prompt, str):
        enc = tokenizer(prompt, return_tensors="pt").to(device)
    else:
        ids = torch.tensor([list(prompt)], device=device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
                             pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    finally:
        model.train(was_training)
    ids = out[0].tolist()
    n = enc["input_ids"].shape[1]
    # decode the whole and cut the prompt off: decoding only the new ids would lose the space
    # SentencePiece keeps on the first of them
    full = tokenizer.decode(ids, skip_special_tokens=True)
    head = tokenizer.decode(ids[:n], skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(ids[n:], skip_special_tokens=True)


class Conversation:
    """A chat with a model: the history of (user, reply) turns, rendered under the chat
    template (as `prompt_ids`) for every new reply."""

    def __init__(self, model: nn.Module, tokenizer, system: Optional[str] = None,
                 max_new_tokens: int = 256, template: str = "auto"):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system, self.max_new_tokens = system, max_new_tokens
        self.turns: list[tuple[str, str]] = []

    def messages(self, user: str) -> list[tuple[str, str]]:
        head = [("system", self.system)] if self.system else []
        return head + [m for u, r in self.turns for m in (("user", u), ("assistant", r))] + [("user", user)]

    def prompt_ids(self, user: str) -> list[int]:
        return prompt_ids(self.tokenizer, self.messages(user), self.template)

    def reply(self, user: str) -> str:
        """The model's greedy answer to `user`, after the turns so far; the turn is kept."""
        text = generate_text(self.model, self.tokenizer, self.prompt_ids(user), self.max_new_tokens).strip()
        self.turns.append((user, text))
        return text

    def reset(self) -> None:
        self.turns.clear()
