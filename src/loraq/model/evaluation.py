"""Evaluation of a causal LM on encoded rows: the same measure for a base model and its adapter."""

from __future__ import annotations

from typing import Any

from ..data.encoding import IGNORE_INDEX
from .batching import Collator, EvalBatches, ListDataset, PackedCollator


def evaluate_loss(model: Any, dataset: ListDataset | EvalBatches, collator: Collator | PackedCollator,
                  batch_size: int = 1) -> float:
    """Mean loss per trainable token over ``dataset`` (the same measure for base and adapter).

    ``dataset`` is either planned micro-batches (:class:`EvalBatches`, one forward pass
    each, packed or padded as the collator lays them out) or plain rows, taken
    ``batch_size`` at a time. The sum is over every trainable token, so the figure does
    not depend on how the rows were batched.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if isinstance(dataset, EvalBatches):
        batches = [dataset[i] for i in range(len(dataset))]
    else:
        batches = [[dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                   for start in range(0, len(dataset), batch_size)]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for rows in batches:
            batch = collator(rows)
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            inputs.setdefault("use_cache", False)
            logits = model(**inputs).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total += float(loss)
            tokens += int((shift_labels != IGNORE_INDEX).sum())
    if was_training:
        model.train()
    return total / max(tokens, 1)


# ---------------------------------------------------------------- generation: exact match and samples

#: Eval rows whose prompts are answered for ``exact_match`` (the first ones): bounds its cost on a CPU.
EXACT_MATCH_MAX_ROWS = 256
#: Prompts answered at a time (left-padded into one batch).
GENERATE_BATCH = 16
#: New tokens beyond the longest reference (and its stop marker): room for an answer that
#: tokenises a little longer in context, and for one that runs on to show that it does.
ANSWER_MARGIN = 4
#: Characters of a sample's prompt, reference and answers kept in the job's result.
SAMPLE_CHARS = 2000


def answer_budget(tokenizer: Any, prompts: list[Any]) -> int:
    """``max_new_tokens`` for ``prompts``: the longest reference (with its stop marker), plus a margin."""
    def count(text: str | None) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    return ANSWER_MARGIN + max((count(p.reference) + count(p.stop) for p in prompts), default=0)


def generate_answers(model: Any, tokenizer: Any, prompts: list[Any], *, max_seq_len: int,
                     max_new_tokens: int | None = None, batch_size: int = GENERATE_BATCH) -> list[str]:
    """Greedy answers of ``model`` to ``prompts`` (:class:`loraq.data.Prompt`), cut where training ends an answer.

    Prompts are left-padded into batches and generated with the KV cache (generation
    is not training: only packed training batches must not use it). A prompt longer
    than ``max_seq_len`` keeps its last ``max_seq_len`` tokens, as much as training saw.
    An answer ends at the EOS token or the prompt's ``stop`` text (a chat template's
    end of turn); it is decoded without special tokens and whitespace-trimmed.
    """
    import torch
    from transformers import GenerationConfig

    if not prompts:
        return []
    # never longer than training let an answer be: a long reference cannot make generation run away
    limit = min(max_new_tokens or answer_budget(tokenizer, prompts), max_seq_len)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stops = {eos} if eos is not None else set()
    for p in prompts:  # a stop marker that is one token of its own ends generation there
        if p.stop:
            ids = tokenizer(p.stop, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                stops.add(ids[0])
    config = GenerationConfig(do_sample=False, max_new_tokens=limit, eos_token_id=sorted(stops) or None,
                              pad_token_id=pad, use_cache=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            encoded = [tokenizer(p.text, add_special_tokens=p.add_special_tokens)["input_ids"][-max_seq_len:]
                       for p in chunk]
            width = max(len(ids) for ids in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, seq in enumerate(encoded):  # left padding: every prompt ends where its answer starts
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
            with torch.no_grad():
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           generation_config=config)
            for p, seq in zip(chunk, generated[:, width:].tolist()):
                end = next((i for i, token in enumerate(seq) if token in stops), len(seq))
                text = tokenizer.decode(seq[:end], skip_special_tokens=True)
                if p.stop and p.stop in text:
                    text = text[:text.index(p.stop)]
                out.append(text.strip())
    finally:
        model.train(was_training)
    return out


def exact_match(answers: list[str], prompts: list[Any]) -> float:
    """The share of answers equal to their prompt's reference (both whitespace-trimmed)."""
    if not prompts:
        return float("nan")
    return sum(a.strip() == p.reference for a, p in zip(answers, prompts, strict=True)) / len(prompts)


def samples(prompts: list[Any], base: list[str], adapter: list[str], n: int) -> list[dict[str, str]]:
    """The first ``n`` prompts with the reference and both answers: what a person reads first after training."""
    def cut(text: str) -> str:
        return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + "…"

    return [{"prompt": cut(p.text), "reference": cut(p.reference), "base": cut(b), "adapter": cut(a)}
            for p, b, a in list(zip(prompts, base, adapter))[:n]]
