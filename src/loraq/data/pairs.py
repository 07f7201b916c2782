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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .rows import PAIR_KEYS, Dataset, ProblemList, is_conversational, pair_problem

PREFERENCE_FORMATS = tuple(PAIR_KEYS)


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
