"""``auto`` hyperparameters: ``training.epochs``, ``batch_size`` and ``learning_rate`` chosen from the data.

Resolved once, at submit, from the number of training rows and their token
lengths (what :mod:`loraq.data.check` measures with the base model's tokenizer).
The values are stored with the job, with the rule that gave each, and shown by
``submit --dry-run``, ``show`` and the report as ``epochs: auto → 7``. The README
("auto settings") gives the rules and what they are based on:

- **epochs**: the OpenAI fine-tuning guide's rule: 3 epochs, moved so that the
  training sees at least :data:`MIN_EXAMPLES` and at most :data:`MAX_EXAMPLES`
  examples, between 1 and 25 epochs.
- **batch size**: the examples per optimizer step are ~0.2% of the training rows
  as a power of two, between 1 and 256 (OpenAI's documented default for its
  fine-tuning API). The micro-batch is that many rows as long as a micro-batch
  stays within :data:`TOKENS_PER_MICRO_BATCH` tokens at the rows' 95th-percentile
  length; the rest is made up by ``grad_accum`` (so memory follows the tokens, and
  the optimizer step does not).
- **learning rate**: 2e-4 at 16 examples a step, the QLoRA paper's rate for LoRA
  on models up to 13B, scaled by the square root of the examples a step (the
  square-root rule for Adam), within [5e-5, 5e-4].

Standard library only.
"""

from __future__ import annotations

import math
from typing import Any

#: The OpenAI rule's bounds on the examples one training run sees.
TARGET_EPOCHS = 3
MIN_EXAMPLES = 100
MAX_EXAMPLES = 25_000
MIN_EPOCHS, MAX_EPOCHS = 1, 25
#: Examples an optimizer step sees: this share of the training rows, as a power of two, within the bounds.
BATCH_SHARE = 0.002
MIN_BATCH, MAX_BATCH = 1, 256
#: Tokens one micro-batch may hold (rows x the rows' 95th-percentile length).
TOKENS_PER_MICRO_BATCH = 16_384
#: The learning rate at REFERENCE_BATCH examples a step, and its bounds.
BASE_LR = 2.0e-4
REFERENCE_BATCH = 16
MIN_LR, MAX_LR = 5.0e-5, 5.0e-4


def epochs_for(n_train: int) -> tuple[int, str]:
    """Epochs for ``n_train`` rows, and the rule as it applied."""
    n = max(1, n_train)
    if n * TARGET_EPOCHS < MIN_EXAMPLES:
        epochs = min(MAX_EPOCHS, MIN_EXAMPLES // n)
        why = f"{n} rows x {TARGET_EPOCHS} epochs < {MIN_EXAMPLES} examples: min({MAX_EPOCHS}, {MIN_EXAMPLES} // {n})"
    elif n * TARGET_EPOCHS > MAX_EXAMPLES:
        epochs = max(MIN_EPOCHS, MAX_EXAMPLES // n)
        why = f"{n} rows x {TARGET_EPOCHS} epochs > {MAX_EXAMPLES:,} examples: max({MIN_EPOCHS}, {MAX_EXAMPLES} // {n})"
    else:
        epochs = TARGET_EPOCHS
        why = f"{n} rows: {TARGET_EPOCHS} epochs see {n * TARGET_EPOCHS} examples, within {MIN_EXAMPLES}-{MAX_EXAMPLES:,}"
    return epochs, why


def _power_of_two(x: float) -> int:
    """The power of two nearest ``x`` (in log scale), at least 1."""
    return 1 if x <= 1 else 2 ** round(math.log2(x))


def examples_per_step(n_train: int) -> int:
    return max(MIN_BATCH, min(MAX_BATCH, _power_of_two(BATCH_SHARE * n_train), _floor_power_of_two(max(1, n_train))))


def _floor_power_of_two(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def batch_for(n_train: int, row_tokens: int, grad_accum: int | None) -> tuple[int, int, str]:
    """``(micro-batch, grad_accum, rule)``; ``grad_accum`` given by the job is kept (the micro-batch adapts)."""
    step = examples_per_step(n_train)
    fits = max(1, _floor_power_of_two(TOKENS_PER_MICRO_BATCH // max(1, row_tokens)))
    if grad_accum is not None:
        micro = max(1, min(fits, step // grad_accum))
        why = (f"{step} examples a step (~{BATCH_SHARE:.1%} of {n_train} rows, a power of two in "
               f"{MIN_BATCH}-{MAX_BATCH}) over the job's grad_accum {grad_accum}")
        return micro, grad_accum, why + (f", at most {fits} rows of {row_tokens} tokens a micro-batch" if fits < step // grad_accum else "")
    micro = min(step, fits)
    why = f"{step} examples a step (~{BATCH_SHARE:.1%} of {n_train} rows, a power of two in {MIN_BATCH}-{MAX_BATCH})"
    if micro < step:
        why += (f": micro-batch {micro} (at most {TOKENS_PER_MICRO_BATCH:,} tokens at the p95 row length "
                f"{row_tokens}) x grad_accum {step // micro}")
    return micro, step // micro, why


def learning_rate_for(examples: int) -> tuple[float, str]:
    lr = BASE_LR * math.sqrt(examples / REFERENCE_BATCH)
    clamped = min(MAX_LR, max(MIN_LR, lr))
    lr = float(f"{clamped:.3g}")
    return lr, (f"{BASE_LR:g} x sqrt({examples} examples a step / {REFERENCE_BATCH}), "
                f"within [{MIN_LR:g}, {MAX_LR:g}]")


def resolve(training: dict[str, Any], n_train: int, row_tokens: int, *,
            grad_accum_given: bool) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The training settings with every ``auto`` replaced, and ``dotted key -> {value, rule}`` for each.

    ``training`` is a job's ``training`` section as JSON; ``row_tokens`` the rows'
    95th-percentile token count (cut at ``max_seq_len``). ``grad_accum_given``:
    whether the job set ``grad_accum`` itself (then ``batch_size: auto`` keeps it).
    """
    out = dict(training)
    resolved: dict[str, dict[str, Any]] = {}
    if out.get("epochs") == "auto":
        epochs, why = epochs_for(n_train)
        out["epochs"] = float(epochs)
        resolved["training.epochs"] = {"value": epochs, "rule": why}
    if out.get("batch_size") == "auto":
        micro, accum, why = batch_for(n_train, row_tokens, int(out.get("grad_accum", 1)) if grad_accum_given else None)
        out["batch_size"] = micro
        resolved["training.batch_size"] = {"value": micro, "rule": why}
        if accum != out.get("grad_accum", 1):
            resolved["training.grad_accum"] = {"value": accum, "rule": "with batch_size: auto"}
        out["grad_accum"] = accum
    if out.get("learning_rate") == "auto":
        batch = out["batch_size"] if out.get("batch_size") != "auto" else 1
        lr, why = learning_rate_for(int(batch) * int(out.get("grad_accum", 1)))
        out["learning_rate"] = lr
        resolved["training.learning_rate"] = {"value": lr, "rule": why}
    return out, resolved


def lines(resolved: dict[str, dict[str, Any]] | None) -> list[str]:
    """``epochs: auto → 7 (rule)``, one line each, for ``--dry-run``, ``show`` and the report."""
    return [f"{key.removeprefix('training.')}: auto → {entry['value']} ({entry['rule']})"
            for key, entry in (resolved or {}).items()]
