"""Evaluation of a causal LM on encoded rows: the same measure for a base model and its adapter."""

from __future__ import annotations

from typing import Any

from ..data.encoding import IGNORE_INDEX
from .batching import Collator, ListDataset


def evaluate_loss(model: Any, dataset: ListDataset, collator: Collator, batch_size: int) -> float:
    """Mean loss per trainable token over ``dataset`` (the same measure for base and adapter)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total += float(loss)
            tokens += int((shift_labels != IGNORE_INDEX).sum())
    if was_training:
        model.train()
    return total / max(tokens, 1)
