"""Preference pairs (issue 23): the two formats, their row checks, and each pair as two supervised rows.

Formats (detected from the rows like the others, :data:`~loraq.data.rows.FORMAT_KEYS`):

- ``preference`` (TRL's): ``{"prompt", "chosen", "rejected"}``, three strings (plain text: rendered
  like ``prompt_completion``, the answer followed by EOS), or three lists of messages (conversational:
  the prompt's messages, then the chosen or rejected assistant turn, through the chat template);
- ``openai_preference`` (OpenAI's DPO files): ``{"input": {"messages": [...]}, "preferred_output":
  [assistant message], "non_preferred_output": [assistant message]}``, always conversational.

A pair trains as two rows of the supervised formats that share the prompt: ``prompt_completion``
for plain text, ``chat`` for messages (:func:`sides`). The loss mask of each is its answer, so the
tokens the SFT encoder trains on are exactly the answer tokens whose log-probabilities DPO sums;
the submit checks (template, token counts, truncation) and the trainer's encoding are the SFT ones,
run once per side.

A pair whose chosen and rejected answers are the same teaches nothing (DPO's gradient is zero,
ORPO's odds ratio is 1): it is a row error. Torch-free: submit uses it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .rows import Dataset, ProblemList, _message_problem

#: Each preference format's keys, and which one holds the prompt, the chosen and the rejected answer.
PAIR_KEYS = {
    "preference": ("prompt", "chosen", "rejected"),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),
}
PREFERENCE_FORMATS = tuple(PAIR_KEYS)


def is_conversational(row: dict[str, Any], fmt: str) -> bool:
    """Whether a pair is messages (chat) or plain text (prompt_completion)."""
    return fmt == "openai_preference" or isinstance(row.get("prompt"), list)


def _messages_problem(value: Any, name: str, *, answer: bool) -> tuple[str, str] | None:
    if not isinstance(value, list) or not value:
        return "wrong_type", f"{name} must be a non-empty list of messages"
    for index, message in enumerate(value):
        if problem := _message_problem(message):
            category, text = problem
            return category, f"{name}[{index}]{text}"
        if answer and message["role"] != "assistant":
            return "unrecognized_role", f"{name}[{index}] is a {message['role']} message; an answer is assistant turns"
    if answer and not any(m["content"].strip() for m in value):
        return "empty_example", f"{name} has no content: nothing to prefer"
    if not answer and value[-1].get("role") == "assistant":
        return "unrecognized_role", f"{name} ends with an assistant turn: the answer follows the prompt"
    return None


def pair_problem(row: dict[str, Any], fmt: str) -> tuple[str, str] | None:
    """The first thing wrong with ``row`` as a ``fmt`` pair, as ``(category, message)``; the message names the field."""
    prompt_key, chosen_key, rejected_key = PAIR_KEYS[fmt]
    missing = [k for k in PAIR_KEYS[fmt] if row.get(k) is None]
    if missing:
        return "missing_key", f"missing {', '.join(repr(k) for k in missing)} for format {fmt}"
    if fmt == "openai_preference":
        given = row["input"]
        if not isinstance(given, dict) or not isinstance(given.get("messages"), list):
            return "wrong_type", "'input' must be an object with 'messages', a list of messages"
        unknown = sorted(set(given) - {"messages", "tools", "parallel_tool_calls"})
        if unknown:
            return "unrecognized_key", f"'input' has key(s) {unknown}; it has 'messages'"
        if given.get("tools"):
            return "unsupported", "'input.tools': tool definitions are not trained by loraq"
        if problem := _messages_problem(given["messages"], "input.messages", answer=False):
            return problem
    elif isinstance(row["prompt"], list):
        if problem := _messages_problem(row["prompt"], "'prompt'", answer=False):
            return problem
    elif not isinstance(row["prompt"], str):
        return "wrong_type", f"'prompt' must be a string or a list of messages, got {type(row['prompt']).__name__}"
    conversational = is_conversational(row, fmt)
    for key in (chosen_key, rejected_key):
        value = row[key]
        if conversational:
            if problem := _messages_problem(value, repr(key), answer=True):
                return problem
        elif not isinstance(value, str):
            return "wrong_type", (f"{key!r} must be a string like 'prompt' (a list of messages goes with a prompt "
                                  f"that is a list of messages), got {type(value).__name__}")
        elif not value.strip():
            return "empty_example", f"{key!r} is empty: nothing to prefer"
    if _answer_text(row[chosen_key]) == _answer_text(row[rejected_key]):
        return "identical_pair", (f"{chosen_key!r} and {rejected_key!r} are the same answer: the pair prefers "
                                  "nothing (drop the row or fix one side)")
    return None


def _answer_text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    return json.dumps([[m.get("role"), m.get("content", "").strip()] for m in value if isinstance(m, dict)])


def _prompt_messages(row: dict[str, Any], fmt: str) -> list[dict[str, Any]]:
    messages = row["input"]["messages"] if fmt == "openai_preference" else row["prompt"]
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


def sides(row: dict[str, Any], fmt: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(chosen row, rejected row, their format)``: the pair as two supervised rows with the same prompt."""
    _, chosen_key, rejected_key = PAIR_KEYS[fmt]
    if not is_conversational(row, fmt):
        return ({"prompt": row["prompt"], "completion": row[chosen_key]},
                {"prompt": row["prompt"], "completion": row[rejected_key]}, "prompt_completion")
    prompt = _prompt_messages(row, fmt)
    return ({"messages": prompt + list(row[chosen_key])}, {"messages": prompt + list(row[rejected_key])}, "chat")


@dataclass(frozen=True)
class Sides:
    """A file of pairs as two datasets of supervised rows, row ``i`` of each from pair ``i``."""

    chosen: Dataset
    rejected: Dataset
    format: str  # prompt_completion | chat


def split_sides(dataset: Dataset, out: ProblemList | None = None) -> Sides | None:
    """``dataset`` (of pairs) as its chosen and rejected sides; ``None`` when it has no pair.

    A file holds plain-text pairs or conversational ones, not both (the two render differently:
    the second through the chat template); a pair of the kind the file's first pair is not is a
    problem in ``out`` and is left out.
    """
    if not dataset.rows:
        return None
    kind = is_conversational(dataset.rows[0], dataset.format)
    chosen: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    keep: list[int] = []
    fmt = "chat" if kind else "prompt_completion"
    for index, row in enumerate(dataset.rows):
        if is_conversational(row, dataset.format) != kind:
            if out is not None:
                line, record = dataset.locate(index)
                out.add("format_mismatch", f"a {'plain-text' if kind else 'conversational'} pair in a file of "
                        f"{'conversational' if kind else 'plain-text'} pairs (its first pair's kind): use one kind "
                        "per file", line=line, row=record)
            continue
        c, r, fmt = sides(row, dataset.format)
        chosen.append(c)
        rejected.append(r)
        keep.append(index)

    def subset(rows: list[dict[str, Any]]) -> Dataset:
        return replace(dataset, format=fmt, rows=rows, lines=[dataset.lines[i] for i in keep],
                       records=[dataset.records[i] for i in keep] if dataset.records else [])

    return Sides(chosen=subset(chosen), rejected=subset(rejected), format=fmt)


def select(sides_: Sides, indices: Sequence[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The chosen and rejected rows of the pairs at ``indices``."""
    return [sides_.chosen.rows[i] for i in indices], [sides_.rejected.rows[i] for i in indices]


__all__ = ["PAIR_KEYS", "PREFERENCE_FORMATS", "Sides", "is_conversational", "pair_problem", "select",
           "sides", "split_sides"]
