"""Prompt rendering: an example becomes a list of segments, each either prompt or response.

Templates (values are stripped of surrounding whitespace, as Meta's reference code does):

    llama2, alpaca   <s>[INST] {instruction}\\n\\n{input} [/INST] {output}</s>   (no "\\n\\n{input}" when empty)
    llama2, chat     <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant}</s><s>[INST] {user} ...
    plain, alpaca    <s>### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{output}</s>
                     (the Input block is left out when the input is empty)
    tokenizer        the tokenizer's own chat template (alpaca records become one user turn)
    auto             tokenizer when the tokenizer has a chat template, else llama2

The response segments (and the EOS that ends each) carry the loss; `tokenize.py` turns the
segments into ids one by one, so the mask is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from dirtune.data.records import Alpaca, Chat, DataError, Example

TEMPLATES = ("llama2", "plain", "tokenizer")


@dataclass(frozen=True)
class Segment:
    """One piece of an example: text, or a special token ('bos'/'eos') placed by id.

    A text segment is tokenised as it reads inside the full string: as a continuation of the
    text segment before it, or afresh when it opens the example or follows a special token.
    """

    text: str = ""
    labelled: bool = False
    special: Optional[str] = None  # "bos" | "eos" | None


BOS = Segment(special="bos")
EOS_LABELLED = Segment(special="eos", labelled=True)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(fmt: str, template: str, tokenizer: Any, source: str | Path = "data") -> Optional[str]:
    """The template to use for `fmt` data: None for text; 'auto' picks the tokenizer's chat
    template when it has one (alpaca records too, as one user turn: the model is prompted the
    way it was instruction-tuned), else llama2."""
    if fmt == "text":
        return None
    if template not in ("auto", *TEMPLATES):
        raise DataError(f"{source}: template {template!r} is not known; accepted: auto, {', '.join(TEMPLATES)}")
    if template == "auto":
        return "tokenizer" if has_chat_template(tokenizer) else "llama2"
    if template == "tokenizer" and not has_chat_template(tokenizer):
        raise DataError(f"{source}: template 'tokenizer' needs a tokenizer with a chat template, and this "
                        "one has none; use template llama2 (or plain for alpaca records)")
    if template == "plain" and fmt == "chat":
        raise DataError(f"{source}: template 'plain' is for alpaca records; chat records accept "
                        "auto, llama2, tokenizer")
    return template


def render(example: Example, template: str, tokenizer: Any = None, source: str | Path = "data") -> list[Segment]:
    """The segments of one alpaca or chat example under `template` (see the module docstring)."""
    if isinstance(example, Alpaca):
        if template == "llama2":
            return alpaca_llama2(example)
        if template == "plain":
            return alpaca_plain(example)
        user = example.instruction.strip()
        if example.input.strip():
            user += "\n\n" + example.input.strip()
        chat = Chat((("user", user), ("assistant", example.output)), example.line)
        return chat_tokenizer(chat, tokenizer, source)
    if isinstance(example, Chat):
        if template == "llama2":
            return chat_llama2(example, source)
        return chat_tokenizer(example, tokenizer, source)
    raise TypeError(f"render() takes alpaca or chat examples, got {type(example).__name__}")


def prompt_segments(messages: Sequence[tuple[str, str]], template: str, tokenizer: Any = None,
                    source: str | Path = "prompt") -> list[Segment]:
    """The segments of a conversation ending in a user turn, up to where the model's reply
    starts, as training renders chat records under `template` (llama2 or tokenizer): what
    generation must be fed for the model to answer as it was trained to."""
    segments = render(Chat((*messages, ("assistant", "")), 0), template, tokenizer, source)
    end = len(segments)
    while end and segments[end - 1].labelled:  # the (empty) reply and the EOS after it
        end -= 1
    return segments[:end]


def _response(text: str, space: str) -> Segment:
    # An empty response adds no text (not a lone space): its loss is the EOS alone.
    text = text.strip()
    return Segment(space + text if text else "", labelled=True)


def alpaca_llama2(ex: Alpaca) -> list[Segment]:
    prompt = f"[INST] {ex.instruction.strip()}"
    if ex.input.strip():
        prompt += f"\n\n{ex.input.strip()}"
    return [BOS, Segment(prompt + " [/INST]"), _response(ex.output, " "), EOS_LABELLED]


def alpaca_plain(ex: Alpaca) -> list[Segment]:
    prompt = f"### Instruction:\n{ex.instruction.strip()}\n\n"
    if ex.input.strip():
        prompt += f"### Input:\n{ex.input.strip()}\n\n"
    return [BOS, Segment(prompt + "### Response:\n"), _response(ex.output, ""), EOS_LABELLED]


def chat_turns(ex: Chat, source: str | Path = "data") -> tuple[str, list[tuple[str, str]]]:
    """(system, [(user, assistant), ...]) for the llama2 template. Messages after the last
    assistant message carry no loss and are dropped; the order must be [system,] user, assistant, ..."""
    roles = [role for role, _ in ex.messages]
    last = max(i for i, role in enumerate(roles) if role == "assistant")
    messages = list(ex.messages[: last + 1])
    system = messages.pop(0)[1].strip() if messages[0][0] == "system" else ""
    expected = ["user", "assistant"] * (len(messages) // 2)
    if [role for role, _ in messages] != expected:
        raise DataError(f"{source}: line {ex.line}: template llama2 needs messages in the order "
                        f"[system,] user, assistant, user, assistant, ...; got {', '.join(roles)}")
    return system, [(messages[i][1], messages[i + 1][1]) for i in range(0, len(messages), 2)]


def chat_llama2(ex: Chat, source: str | Path = "data") -> list[Segment]:
    system, turns = chat_turns(ex, source)
    segments: list[Segment] = []
    for i, (user, assistant) in enumerate(turns):
        prompt = "[INST] "
        if i == 0 and system:
            prompt += f"<<SYS>>\n{system}\n<</SYS>>\n\n"
        prompt += f"{user.strip()} [/INST]"
        segments += [BOS, Segment(prompt), _response(assistant, " "), EOS_LABELLED]
    return segments


def chat_tokenizer(ex: Chat, tokenizer: Any, source: str | Path = "data") -> list[Segment]:
    """Segments from the tokenizer's chat template, rendered one prefix at a time: the prompt
    before assistant turn k is render(messages[:k], generation prompt) minus what came before,
    and the response is render(messages[:k+1]) minus that prompt. Templates whose renderings
    are not prefixes of each other cannot be split this way and raise DataError."""
    messages = [{"role": role, "content": content} for role, content in ex.messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    segments: list[Segment] = []
    done = ""
    for k in range(last + 1):
        if messages[k]["role"] != "assistant":
            continue
        prompt = _apply(tokenizer, messages[:k], True, ex, source)
        full = _apply(tokenizer, messages[: k + 1], False, ex, source)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(f"{source}: line {ex.line}: the tokenizer's chat template does not render "
                            "a conversation as a prefix of its continuation, so prompt and response "
                            "cannot be told apart; use template llama2")
        segments += [Segment(prompt[len(done):]), Segment(full[len(prompt):], labelled=True)]
        done = full
    return [s for s in segments if s.text]


def _apply(tokenizer: Any, messages: list[dict], generation_prompt: bool, ex: Chat, source: str | Path) -> str:
    if not messages:
        return ""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # the template is user code (Jinja); its own errors say what it wants
        raise DataError(f"{source}: line {ex.line}: the tokenizer's chat template failed: {e}") from None
    if not isinstance(text, str):
        raise DataError(f"{source}: line {ex.line}: the tokenizer's chat template returned "
                        f"{type(text).__name__}, expected text")
    return text
