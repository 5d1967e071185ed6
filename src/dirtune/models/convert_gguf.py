"""Read a GGUF file (llama.cpp's format, as models are shared for local use) as a plain model.

transformers reads GGUF itself: `from_pretrained(folder, gguf_file=name)` dequantizes every
tensor to the dtype asked for, undoes the q/k row permutation llama.cpp applies for its RoPE
layout, and builds the tokenizer (with its chat template) from the file's metadata. What it
returns is still marked as a GGUF-quantized model, though: `save_pretrained` refuses to write
it and Trainer refuses to train it. So the plain class is rebuilt here from the config without
`quantization_config`, on the meta device, and handed the loaded tensors (no copy).

`.gguf` files are read in memory each time they are loaded (nothing is written beside them or
into a cache); `convert_gguf` writes a transformers checkpoint once, which then loads faster.
The `gguf` package is an optional extra (`pip install 'dirtune[gguf]'`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Union

import torch
from torch import nn

from dirtune.models.checks import check_tokenizer_matches, to_dtype
from dirtune.models.errors import ModelError

__all__ = ["GGUF_MAGIC", "convert_gguf", "is_gguf", "load_gguf_config", "load_gguf_model",
           "load_gguf_tokenizer"]

PathLike = Union[str, Path]
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def is_gguf(path: PathLike) -> bool:
    """Whether `path` names a .gguf file (by its suffix; the file need not exist, but a folder is no file)."""
    path = Path(path)
    return path.suffix.lower() == ".gguf" and not path.is_dir()


def _check_file(path: PathLike) -> Path:
    """The resolved path of a readable GGUF file, or ModelError saying what is wrong."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{path}: reading .gguf files needs the gguf package: pip install 'dirtune[gguf]'")
    return path


def _read(path: Path, what: str, load):
    """load(folder, name) with transformers' errors turned into one line naming the file."""
    try:
        return load(str(path.parent), path.name)
    except ImportError as e:  # gguf present but older than transformers accepts
        raise ModelError(f"{path}: reading .gguf files needs gguf>=0.10 ({e}): "
                         "pip install -U 'dirtune[gguf]'") from None
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise ModelError(f"{path}: could not read the {what} from the GGUF file: {e}") from None


def _plain_config(config, path: Path):
    # the rebuilt model is an ordinary one: no quantization_config, named after the file, so
    # that adapters trained on it record the .gguf as their base
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(path)
    return config


def load_gguf_config(path: PathLike):
    """The transformers config a GGUF file describes (no quantization_config)."""
    from transformers import AutoConfig

    path = _check_file(path)
    config = _read(path, "config",
                   lambda folder, name: AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True))
    return _plain_config(config, path)


def _dequantize_kwargs() -> dict:
    """Ask newer transformers (GgufConfig) to unpack every weight, never keep packed GGUF blocks."""
    import inspect

    try:
        from transformers import GgufConfig
    except ImportError:  # older releases always dequantize
        return {}
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_gguf_model(path: PathLike, dtype: torch.dtype = torch.float32,
                    attn_implementation: str = "sdpa") -> nn.Module:
    """The causal LM in a GGUF file, dequantized to `dtype`, as a plain (trainable, saveable) model."""
    from transformers import AutoModelForCausalLM

    path = _check_file(path)
    loaded = _read(path, "model", lambda folder, name: AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, attn_implementation=attn_implementation,
        local_files_only=True, **_dequantize_kwargs()))
    config = _plain_config(loaded.config, path)
    with torch.device("meta"):  # no second set of weights: the loaded tensors are reused below
        model = type(loaded)(config)
    try:
        model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    except RuntimeError as e:  # e.g. weights left packed by a transformers we do not know
        raise ModelError(f"{path}: the weights transformers read from the GGUF file do not fit a "
                         f"plain {type(loaded).__name__}: {str(e).splitlines()[0]}") from None
    # buffers outside the state dict (RoPE's inv_freq) are still on meta: take the loaded ones
    for name, buf in loaded.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module.register_buffer(leaf, buf, persistent=leaf not in module._non_persistent_buffers_set)
    model.tie_weights()  # assign=True gave lm_head its own Parameter; tie it back if the config ties
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ModelError(f"{path}: no weights in the GGUF file for {', '.join(on_meta[:5])}")
    model.generation_config = loaded.generation_config
    model.to(dtype)  # norms and anything transformers kept in float32
    model.eval()
    return model


def load_gguf_tokenizer(path: PathLike):
    """The tokenizer a GGUF file describes (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    path = _check_file(path)
    tok = _read(path, "tokenizer",
                lambda folder, name: AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True))
    tok.name_or_path = str(path)
    return tok


def convert_gguf(src: PathLike, out_dir: PathLike, dtype: str = "fp32") -> Path:
    """Write `out_dir`: a transformers checkpoint (config.json without quantization_config,
    safetensors, generation_config.json) and the tokenizer with its chat template.

    Everything is read before anything is written; an `out_dir` that already holds files is
    refused rather than overwritten. Returns `out_dir`.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    model = load_gguf_model(src, to_dtype(dtype))
    tokenizer = load_gguf_tokenizer(src)
    check_tokenizer_matches(model, tokenizer)
    model.config._name_or_path = ""  # the file's path means nothing beside the written copy
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
