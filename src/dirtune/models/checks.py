"""The checks a model and its tokenizer must pass together, and the one table of dtype names.

Imports only torch; loading.py and the converters use these, so they import none of those.
"""

from __future__ import annotations

import torch
from torch import nn

from dirtune.models.errors import ModelError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype names of the config and the CLI (model.dtype, method.reference_dtype, ...)."""
LONG_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""torch's spellings, which the Python API (DirectionPenalty) accepts too."""


def to_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> torch dtype; ModelError naming the accepted names otherwise."""
    if name not in DTYPES:
        raise ModelError(f"dtype {name!r} is not valid; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_tokenizer_matches(model: nn.Module, tokenizer) -> None:
    """ModelError unless every token id of `tokenizer` (and its bos/eos) has an embedding row."""
    rows = model.get_input_embeddings().weight.shape[0]
    name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
    if len(tokenizer) > rows:
        raise ModelError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"embedding has {rows} rows; use the tokenizer the model was trained with")
    for which in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, which, None)
        if tid is not None and not 0 <= tid < rows:
            raise ModelError(f"{name}: {which} {tid} is outside the model's embedding "
                             f"of {rows} rows (tokenizer has {len(tokenizer)} tokens)")
