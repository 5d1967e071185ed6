"""Loading and writing transformers checkpoints and tokenizers, from local folders only.

Everything here reads local files (`local_files_only=True`): nothing reaches the hub. A missing
folder, config, weights file or tokenizer raises `ModelError` naming the path. A model path may
also be a .gguf file (llama.cpp's format), read through transformers (convert_gguf.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from dirtune.models.checks import DTYPES, check_tokenizer_matches, to_dtype
from dirtune.models.convert_gguf import is_gguf
from dirtune.models.errors import ModelError

__all__ = [
    "DTYPES",
    "ModelError",
    "check_tokenizer_matches",
    "count_parameters",
    "find_weight_files",
    "load_model",
    "load_sentencepiece",
    "load_tokenizer",
    "save_tokenizer_from_sentencepiece",
    "write_checkpoint",
]

WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Beside a checkpoint, SentencePiece's own file is named this.
SPM_FILE = "tokenizer.model"

PathLike = Union[str, Path]


# ---------------------------------------------------------------- models

def find_weight_files(path: PathLike) -> list[Path]:
    """The weight files of a checkpoint folder, in the order of WEIGHT_PATTERNS (may be empty)."""
    path = Path(path)
    found: list[Path] = []
    for pattern in WEIGHT_PATTERNS:
        found += sorted(p for p in path.glob(pattern) if p.is_file())
    return found


def _check_checkpoint_dir(path: Path, *, need_weights: bool) -> None:
    if path.is_file():
        raise ModelError(f"{path}: is a file; expected a transformers checkpoint folder or a .gguf file")
    if not path.is_dir():
        raise ModelError(f"{path}: model folder not found")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (is this a transformers checkpoint folder?)")
    if need_weights and not find_weight_files(path):
        raise ModelError(f"{path}: no model weights ({', '.join(WEIGHT_PATTERNS)}) found")


def load_model(path: PathLike, *, dtype: str = "fp32", attn_implementation: str = "sdpa",
               device: Optional[Union[str, torch.device]] = None, from_scratch: bool = False) -> nn.Module:
    """The causal LM in `path` (a LlamaForCausalLM for LLaMA checkpoints).

    `path` is a transformers checkpoint folder or a .gguf file (dequantized to `dtype` in
    memory at every load; see convert_gguf).

    Weights are loaded in `dtype` ('fp32', 'bf16', 'fp16') with `attn_implementation`. With
    `from_scratch=True` only config.json is read and the weights are randomly initialised
    (seed torch before calling); this is how source models are pretrained. `device` moves
    the model there after loading (default: stay on the CPU).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    # absolute, so that adapters saved from this model record a base path usable from anywhere
    path = Path(path).expanduser().resolve()
    torch_dtype = to_dtype(dtype)
    if is_gguf(path):  # read (and dequantized) in memory each time; nothing is written
        from dirtune.models.convert_gguf import load_gguf_config, load_gguf_model

        if from_scratch:
            model = AutoModelForCausalLM.from_config(load_gguf_config(path), dtype=torch_dtype,
                                                     attn_implementation=attn_implementation)
        else:
            model = load_gguf_model(path, torch_dtype, attn_implementation)
        return model.to(device) if device is not None else model
    _check_checkpoint_dir(path, need_weights=not from_scratch)
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
    try:
        if from_scratch:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: could not load the model: {e}") from e
    if device is not None:
        model = model.to(device)
    return model


def count_parameters(model: nn.Module) -> dict:
    """{'total': all parameters, 'trainable': those with requires_grad} (tied weights once)."""
    total = trainable = 0
    for p in model.parameters():  # .parameters() yields a shared (tied) tensor only once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable}


def write_checkpoint(out_dir: PathLike, config, names_shapes: Iterable[tuple[str, tuple]],
                     get: Callable[[str], torch.Tensor], dtype: torch.dtype,
                     max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a transformers checkpoint (config.json, generation_config.json, safetensors shards).

    Tensors are produced one at a time by `get(name)`, cast to `dtype` and written shard by
    shard, so memory holds at most one shard: this is how a 70B release converts on a host
    with less memory than the model. One shard is `model.safetensors`; more are
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, as
    `save_pretrained` names them.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names_shapes = list(names_shapes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    total = 0
    for name, shape in names_shapes:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name in names:
            # contiguous + clone: safetensors needs owned, non-overlapping storage
            tensors[name] = get(name).to(dtype).contiguous().clone()
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.dtype = dtype
    config.architectures = config.architectures or ["LlamaForCausalLM"]
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    return out


# ---------------------------------------------------------------- tokenizers

def _finish_tokenizer(tok):
    """Pad with unk (or eos when there is no unk), pad on the right.

    unk rather than eos: padding positions are masked anyway, and a pad id distinct from eos
    keeps collators that mask `labels == pad_token_id` from also masking the real eos.
    """
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = "right"
    return tok


def load_sentencepiece(model_file: PathLike):
    """A sentencepiece.SentencePieceProcessor, or ModelError naming the file."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as e:
        raise ModelError(f"{model_file}: not a SentencePiece model ({e}); "
                         "LLaMA 3's tiktoken tokenizer.model is not supported") from None


def _spm_proto(model_file: Path):
    """The parsed ModelProto of a SentencePiece file (vocabulary, scores, normalizer spec)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # older sentencepiece wheels: transformers ships the same schema
        from transformers.utils import sentencepiece_model_pb2_new as pb
    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def _tokenizer_from_sentencepiece(model_file: Path):
    """A fast tokenizer whose ids equal SentencePieceProcessor.encode, with BOS prepended.

    Built here rather than by transformers' own conversion, which differs between transformers
    5 releases (one splits words SentencePiece keeps whole). SentencePiece BPE merges, at each
    step, the adjacent pair whose merged piece has the highest score; a `tokenizers` BPE whose
    merges are ranked by that score (ties: lower id first) merges the same way.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    load_sentencepiece(model_file)  # a readable error for files that are not SentencePiece
    proto = _spm_proto(model_file)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # 1 unigram, 2 bpe, 3 word, 4 char
        raise ModelError(f"{model_file}: SentencePiece model type {trainer.model_type} is not supported; "
                         "only BPE (type 2, as LLaMA's tokenizers are)")
    NORMAL, USER_DEFINED = 1, 4
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    unk = trainer.unk_piece or "<unk>"
    tok = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], unk_token=unk,
                        fuse_unk=True, byte_fallback=trainer.byte_fallback))
    # SentencePiece's normalisation, in its order: character map, extra spaces, dummy prefix, "▁"
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))  # Prepend leaves an empty text empty, as SentencePiece
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if trainer.byte_fallback else [])
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    user = [AddedToken(p.piece, normalized=False, special=False)
            for p in proto.pieces if p.type == USER_DEFINED]
    if user:
        tok.add_tokens(user)

    def piece(i: int):
        return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=piece(trainer.unk_id), bos_token=piece(trainer.bos_id),
        eos_token=piece(trainer.eos_id), pad_token=piece(trainer.pad_id),
        add_bos_token=trainer.bos_id >= 0, add_eos_token=False, clean_up_tokenization_spaces=False,
    )
    fast.name_or_path = str(model_file)
    return fast


def load_tokenizer(path: PathLike):
    """The tokenizer in `path`: a transformers tokenizer folder, or one holding only tokenizer.model.

    `path` may also be a SentencePiece .model file or a .gguf file (the tokenizer stored in it).
    The result adds BOS (when the tokenizer does), pads on the right,
    and has a pad token (unk, or eos without unk).
    """
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".model":
        return _finish_tokenizer(_tokenizer_from_sentencepiece(path))
    if is_gguf(path):
        from dirtune.models.convert_gguf import load_gguf_tokenizer

        return _finish_tokenizer(load_gguf_tokenizer(path))
    if not path.is_dir():
        raise ModelError(f"{path}: tokenizer folder not found")
    has_hf = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    if not has_hf:
        if (path / SPM_FILE).is_file():
            return _finish_tokenizer(_tokenizer_from_sentencepiece(path / SPM_FILE))
        raise ModelError(f"{path}: no tokenizer ({', '.join(TOKENIZER_FILES)}) found")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: could not load the tokenizer: {e}") from e
    return _finish_tokenizer(tok)


def save_tokenizer_from_sentencepiece(model_file: PathLike, out_dir: PathLike):
    """Write a transformers tokenizer folder (tokenizer.json + config) built from a .model file.

    The .model itself is copied beside it. Returns the tokenizer.
    """
    model_file = Path(model_file).expanduser()
    if not model_file.is_file():
        raise ModelError(f"{model_file}: SentencePiece model file not found")
    tok = _finish_tokenizer(_tokenizer_from_sentencepiece(model_file))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    if model_file.resolve() != (out / SPM_FILE).resolve():
        shutil.copyfile(model_file, out / SPM_FILE)
    return tok
