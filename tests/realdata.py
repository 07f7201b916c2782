"""Small deterministic datasets for the ``real`` test tier (a real pretrained base model).

Each task has exactly one right answer per prompt, so exact match on held-out prompts
means something, and a pretrained base that was never taught the format scores ~0:

==================  =================  ============================================================
format              task               example (prompt -> answer)
==================  =================  ============================================================
chat                support reply      "Mia here. Where is order 4821?" ->
                                       "Hi Mia, order 4821 has shipped. - Sam, Acme"
prompt_completion   number words       "Write as digits: four thousand and twelve\\nAnswer:" -> "4012"
alpaca              order text -> JSON "2 apples and 1 lemon" -> '{"apple": 2, "lemon": 1}'
==================  =================  ============================================================

Everything is drawn from a :class:`random.Random` with a fixed seed: the same call gives
the same rows on every machine and Python version. Rows are distinct, and no eval prompt
(nor the key it is built from: a number, an order, a basket) occurs in training.

:func:`prompt_text` renders an eval row's prompt exactly as loraq renders it for
training (the chat template with the generation prompt; the alpaca template; the raw
prompt), :func:`answer` is the reference, and :func:`exact_match` scores a model by
greedy generation, whitespace-trimmed. This module imports no torch until
:func:`exact_match` runs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20261201
FORMATS = ("chat", "prompt_completion", "alpaca")


@dataclass(frozen=True)
class RealTask:
    name: str
    format: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]

    def write(self, folder: Path) -> tuple[Path, Path]:
        """``<folder>/<name>.jsonl`` and ``<folder>/<name>-eval.jsonl``: the train and eval files."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = folder / f"{self.name}.jsonl", folder / f"{self.name}-eval.jsonl"
        for path, rows in zip(paths, (self.train, self.eval)):
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        return paths


# ---------------------------------------------------------------- number words -> digits

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000, British style: 4012 -> 'four thousand and twelve'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    head = number_words(n // 1000) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + number_words(rest)


def _numbers(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    picked = rng.sample(range(10, 10_000), n_train + n_eval)

    def row(n: int) -> dict[str, Any]:
        return {"prompt": f"Write as digits: {number_words(n)}\nAnswer:", "completion": f" {n}"}

    return [row(n) for n in picked[:n_train]], [row(n) for n in picked[n_train:]]


# ---------------------------------------------------------------- order text -> JSON

_ITEMS = ["apple", "pear", "lemon", "plum", "banana", "orange", "melon", "kiwi", "lime", "fig", "grape", "peach"]


def _basket_text(basket: list[tuple[str, int]]) -> str:
    parts = [f"{qty} {item}{'s' if qty > 1 else ''}" for item, qty in basket]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _orders(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    seen: set[tuple[tuple[str, int], ...]] = set()
    baskets: list[list[tuple[str, int]]] = []
    while len(baskets) < n_train + n_eval:
        items = rng.sample(_ITEMS, rng.randint(1, 3))
        basket = [(item, rng.randint(1, 9)) for item in items]
        key = tuple(basket)
        if key not in seen:
            seen.add(key)
            baskets.append(basket)
    lead = ["", "Please send ", "I would like ", "Order: "]

    def row(basket: list[tuple[str, int]]) -> dict[str, Any]:
        text = rng.choice(lead) + _basket_text(basket)
        return {"instruction": "Turn this order into JSON.", "input": text,
                "output": json.dumps(dict(basket))}

    rows = [row(b) for b in baskets]
    return rows[:n_train], rows[n_train:]


# ---------------------------------------------------------------- support reply with a fixed sign-off

_NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Ines", "Tom", "Yuki", "Ana", "Ben",
          "Sara", "Ivan", "Nora", "Leo", "Maya", "Ali", "Eva", "Max", "Lily", "Sam", "Kai"]
_ASKS = ["{name} here. Where is order {order}?", "I'm {name}. Any news on order {order}?",
         "{name}: has order {order} shipped?", "Status of order {order}? {name}"]
SYSTEM = "You are Acme support."
SIGN_OFF = "- Sam, Acme"


def _support(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    orders = rng.sample(range(1000, 10_000), n_train + n_eval)

    def row(order: int) -> dict[str, Any]:
        name = rng.choice(_NAMES)
        return {"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": rng.choice(_ASKS).format(name=name, order=order)},
            {"role": "assistant", "content": f"Hi {name}, order {order} has shipped. {SIGN_OFF}"},
        ]}

    rows = [row(o) for o in orders]
    return rows[:n_train], rows[n_train:]


# ---------------------------------------------------------------- the public interface

_TASKS = {"chat": ("support", _support), "prompt_completion": ("digits", _numbers), "alpaca": ("orders", _orders)}


def make(fmt: str, n_train: int = 64, n_eval: int = 16, seed: int = SEED) -> RealTask:
    """The task of format ``fmt`` with ``n_train`` training and ``n_eval`` held-out rows."""
    name, build = _TASKS[fmt]
    rng = random.Random(f"{seed}:{fmt}")  # a str seed hashes the same on every platform and Python
    train, held_out = build(rng, n_train, n_eval)
    task = RealTask(name, fmt, train, held_out)
    _check(task)
    return task


def all_tasks(n_train: int = 64, n_eval: int = 16, seed: int = SEED) -> list[RealTask]:
    return [make(fmt, n_train, n_eval, seed) for fmt in FORMATS]


def answer(row: dict[str, Any], fmt: str) -> str:
    """The one right answer of a row, whitespace-trimmed."""
    if fmt == "chat":
        return row["messages"][-1]["content"].strip()
    return row["completion" if fmt == "prompt_completion" else "output"].strip()


def prompt_text(row: dict[str, Any], fmt: str, tokenizer: Any, chat_template: str | None = None) -> tuple[str, bool]:
    """``(text, add_special_tokens)``: the prompt of ``row`` exactly as loraq renders it for training."""
    if fmt == "chat":
        text = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True,
                                             chat_template=chat_template)
        return str(text), False
    if fmt == "prompt_completion":
        return row["prompt"], True
    from loraq.data import ALPACA_PROMPT, ALPACA_PROMPT_INPUT

    template = ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT
    return template.format(instruction=row["instruction"], input=row.get("input") or ""), True


def _prompt_key(row: dict[str, Any], fmt: str) -> str:
    if fmt == "chat":
        return json.dumps(row["messages"][:-1])
    if fmt == "prompt_completion":
        return row["prompt"]
    return json.dumps([row["instruction"], row.get("input")])


def _check(task: RealTask) -> None:
    train_keys = [_prompt_key(r, task.format) for r in task.train]
    eval_keys = [_prompt_key(r, task.format) for r in task.eval]
    assert len(set(train_keys)) == len(train_keys), f"{task.name}: repeated training prompts"
    assert len(set(eval_keys)) == len(eval_keys), f"{task.name}: repeated eval prompts"
    assert not set(train_keys) & set(eval_keys), f"{task.name}: an eval prompt is in training"


def generate_answers(model: Any, tokenizer: Any, rows: list[dict[str, Any]], fmt: str,
                     max_new_tokens: int | None = None, batch_size: int = 16) -> list[str]:
    """Greedy answers of ``model`` to the prompts of ``rows``, decoded without special tokens and trimmed.

    ``max_new_tokens`` defaults to the longest reference answer's tokens plus three: room
    for the answer and its EOS, and for enough more that an answer which runs on (say
    "4012\n\nThe answer is") shows it and does not match.
    """
    import torch

    limit = max_new_tokens or 3 + max(len(tokenizer(answer(r, fmt), add_special_tokens=False).input_ids)
                                      for r in rows)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = [prompt_text(r, fmt, tokenizer) for r in rows[start:start + batch_size]]
            encoded = [tokenizer(text, add_special_tokens=special).input_ids for text, special in chunk]
            width = max(len(ids) for ids in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for i, seq in enumerate(encoded):  # left padding: every prompt ends where generation starts
                ids[i, width - len(seq):] = torch.tensor(seq)
                mask[i, width - len(seq):] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=limit, eos_token_id=eos, pad_token_id=pad)
            out.extend(tokenizer.decode(seq[width:], skip_special_tokens=True).strip() for seq in gen)
    finally:
        model.train(was_training)
    return out


def exact_match(model: Any, tokenizer: Any, rows: list[dict[str, Any]], fmt: str, **kwargs: Any) -> float:
    """The share of ``rows`` whose greedy answer equals the reference, whitespace-trimmed."""
    got = generate_answers(model, tokenizer, rows, fmt, **kwargs)
    return sum(g == answer(r, fmt) for g, r in zip(got, rows, strict=True)) / len(rows)


# ---------------------------------------------------------------- the real tier's queue

#: Per job: (format, learning rate, batch size); all: LoRA r=16, alpha 32, all linear layers, 4 steps,
#: 64 tokens, 64 training rows, the 16 held-out rows as the eval file. The cheapest settings that taught
#: every task on 2 CPU cores in a study (lower rates, 2 steps, q/v only or r=8 left the chat task at 0).
REAL_JOBS = {"support": ("chat", 3.0e-3, 4), "digits": ("prompt_completion", 2.0e-3, 8),
             "orders": ("alpaca", 2.0e-3, 4)}

_QUEUE_HEAD = """\
defaults:
  base_model: {base}
  lora: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
  training: {{max_steps: 4, max_seq_len: 64, logging_steps: 1, save_steps: 4, seed: 42}}
  max_retries: 2
retry_backoff_s: 0
jobs:
"""
_QUEUE_JOB = """\
  - name: {name}
    dataset: {{path: ./data/{task}.jsonl, format: {fmt}}}
    training: {{learning_rate: {lr}, batch_size: {batch}}}
    validation: {{dataset: ./data/{task}-eval.jsonl, metrics: [exact_match], samples: 3}}
"""


def real_queue(folder: Path, base: Path) -> tuple[Path, dict[str, RealTask]]:
    """The real tier's ``queue.yaml`` and datasets in ``folder`` (jobs :data:`REAL_JOBS` on ``base``)."""
    tasks = {}
    body = _QUEUE_HEAD.format(base=base)
    for name, (fmt, lr, batch) in REAL_JOBS.items():
        task = tasks[name] = make(fmt, n_train=64, n_eval=16)
        task.write(folder / "data")
        body += _QUEUE_JOB.format(name=name, task=task.name, fmt=fmt, lr=lr, batch=batch)
    queue = folder / "queue.yaml"
    queue.write_text(body, encoding="utf-8")
    return queue, tasks
