"""`dirtune eval`: token-level loss and perplexity of a checkpoint on a dataset."""

from __future__ import annotations

import math

import torch

from dirtune.data import build_datasets, collate
from dirtune.models.lora import load_for_inference
from dirtune.train.config import DataConfig


@torch.no_grad()
def evaluate_loss(checkpoint: str, data_file: str, *, max_length: int = 512, batch_size: int = 8,
                  format: str = "auto", base: str | None = None) -> dict:
    """Mean loss over every labelled token of `data_file` (all records: no split), and exp of it."""
    model, tokenizer = load_for_inference(checkpoint, base=base)
    model.eval()
    bundle = build_datasets(DataConfig(train_file=data_file, valid_ratio=0.0, format=format,
                                       max_length=max_length), tokenizer)
    data = bundle.train
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))], bundle.pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]  # token t predicts t+1
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                ignore_index=-100, reduction="sum")
        total += float(nll)
        tokens += int((labels != -100).sum())
    loss = total / max(tokens, 1)
    return {"checkpoint": str(checkpoint), "data": str(data_file), "examples": len(data), "tokens": tokens,
            "loss": loss, "perplexity": math.exp(loss) if loss < 50 else float("inf")}
