"""Datasets: read rows, detect the format, check every row, and encode with loss masks.

Formats (detected from the first row when not given):

- ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI). Loss on
  assistant turns only (and only those with ``weight`` 1 when a weight is given).
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}``; loss on the completion.
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}``; loss on the output.
- ``text``: ``{"text": ...}``; loss on all of it.

Encoding works on character spans: a row becomes one string plus the spans that
carry loss, the string is tokenised once with offsets, and a token carries a label
when it starts inside a trainable span. That is exact for any fast tokenizer and
any chat template that renders a conversation as a prefix of its continuation.

This module imports no torch: the submit path uses it to validate rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, Problem

IGNORE_INDEX = -100
MAX_LISTED_PROBLEMS = 20
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
FORMAT_KEYS = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Dataset:
    path: Path
    format: str
    rows: list[dict[str, Any]]
    lines: list[int]  # the line (or record) number of each row, 1-based
    sha256: str

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class _Collector:
    path: Path
    problems: list[Problem] = field(default_factory=list)
    count: int = 0

    def add(self, line: int | None, category: str, message: str) -> None:
        self.count += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            where = f"{self.path}:{line}" if line is not None else str(self.path)
            self.problems.append(Problem(where, f"[{category}] {message}"))

    def raise_if_any(self) -> None:
        if self.count:
            rest = self.count - len(self.problems)
            problems = list(self.problems)
            if rest > 0:
                problems.append(Problem(str(self.path), f"... and {rest} more problem(s) not listed"))
            raise DataError(problems)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError([Problem(str(path), "[missing_file] dataset file not found")]) from None
    except IsADirectoryError:
        raise DataError([Problem(str(path), "[missing_file] is a folder, expected a dataset file")]) from None
    except OSError as exc:
        raise DataError([Problem(str(path), f"[unreadable] cannot read: {exc.strerror}")]) from None


def read_records(path: Path, raw: bytes, out: _Collector) -> list[tuple[int, Any]]:
    """Parse the file into ``(line, record)`` pairs; problems go to ``out``."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, raw, out)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        out.add(line, "invalid_utf8", f"not UTF-8 text (byte {exc.start})")
        return []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        return [(i + 2, dict(row)) for i, row in enumerate(reader)]
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            out.add(exc.lineno, "not_json", f"not valid JSON: {exc.msg}")
            return []
        if not isinstance(doc, list):
            out.add(1, "not_array", "a .json dataset must be a JSON array of rows (or use .jsonl)")
            return []
        return [(i + 1, row) for i, row in enumerate(doc)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            out.add(number, "not_json", f"not valid JSON: {exc.msg} (column {exc.colno})")
    return records


def _read_parquet(path: Path, raw: bytes, out: _Collector) -> list[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        out.add(None, "unsupported", "reading Parquet needs pyarrow: pip install 'loraq[parquet]'")
        return []
    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as exc:  # pyarrow raises many types for a damaged file
        out.add(None, "unreadable", f"not a readable Parquet file: {exc}")
        return []
    return [(i + 1, row) for i, row in enumerate(table.to_pylist())]


def detect_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    for name, keys in FORMAT_KEYS.items():
        if all(k in row for k in keys):
            return name
    return None


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def row_problem(row: Any, fmt: str) -> tuple[str, str] | None:
    """The first thing wrong with ``row`` as a ``fmt`` row, as ``(category, message)``."""
    if not isinstance(row, dict):
        return "not_object", f"expected a JSON object, got {type(row).__name__}"
    if fmt == "chat":
        return _chat_problem(row)
    keys = FORMAT_KEYS[fmt]
    missing = [k for k in keys if k not in row]
    if missing:
        other = detect_format(row)
        if other and other != fmt:
            return "format_mismatch", f"row looks like {other}, but the file is {fmt}"
        return "missing_key", f"missing {', '.join(repr(k) for k in missing)} for format {fmt}"
    for key in (*keys, "input"):
        if key in row and row[key] is not None and not _is_text(row[key]):
            return "wrong_type", f"{key!r} must be a string, got {type(row[key]).__name__}"
    trained = {"prompt_completion": "completion", "alpaca": "output", "text": "text"}[fmt]
    if not row[trained].strip():
        return "empty_example", f"{trained!r} is empty: nothing to train on"
    return None


def _chat_problem(row: dict[str, Any]) -> tuple[str, str] | None:
    if "messages" not in row:
        other = detect_format(row)
        if other:
            return "format_mismatch", f"row looks like {other}, but the file is chat"
        return "missing_messages", "missing 'messages'"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "missing_messages", "'messages' must be a non-empty list"
    trainable = False
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return "not_object", f"messages[{index}] must be an object"
        if "role" not in message:
            return "missing_role", f"messages[{index}] has no 'role'"
        if "content" not in message:
            return "missing_content", f"messages[{index}] has no 'content'"
        role = message["role"]
        if role not in CHAT_ROLES:
            return "unrecognized_role", f"messages[{index}].role {role!r} is not one of {', '.join(sorted(CHAT_ROLES))}"
        if not _is_text(message["content"]):
            return "wrong_type", f"messages[{index}].content must be a string"
        weight = message.get("weight", 1)
        if weight not in (0, 1):
            return "bad_weight", f"messages[{index}].weight must be 0 or 1, got {weight!r}"
        if role == "assistant" and weight == 1 and message["content"].strip():
            trainable = True
    if not any(m.get("role") == "assistant" for m in messages):
        return "no_assistant", "no assistant message: nothing to train on"
    if not trainable:
        return "empty_example", "no assistant message with content and weight 1: nothing to train on"
    return None


def load_dataset(path: str | Path, fmt: str | None = None) -> Dataset:
    """Read and check every row of a dataset; raise :class:`DataError` listing the problems."""
    path = Path(path)
    out = _Collector(path)
    if path.suffix.lower() not in SUFFIXES:
        out.add(None, "unsupported", f"unknown dataset type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
        out.raise_if_any()
    raw = _read_bytes(path)
    records = read_records(path, raw, out)
    out.raise_if_any()
    if not records:
        out.add(None, "empty_file", "no rows")
        out.raise_if_any()
    if fmt is None:
        first_line, first = records[0]
        fmt = detect_format(first)
        if fmt is None:
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            out.add(first_line, "unknown_format",
                    f"cannot tell the format from keys {keys}; expected 'messages', 'prompt'+'completion', "
                    "'instruction'+'output' or 'text' (or set dataset.format)")
            out.raise_if_any()
    assert fmt is not None
    rows, lines = [], []
    for line, row in records:
        problem = row_problem(row, fmt)
        if problem:
            out.add(line, *problem)
        else:
            rows.append(row)
            lines.append(line)
    out.raise_if_any()
    return Dataset(path=path, format=fmt, rows=rows, lines=lines, sha256=sha256_bytes(raw))


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval split of ``n`` rows: ``(train, eval)`` index lists."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * fraction)) if fraction > 0 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def check_split(path: Path, n: int, fraction: float) -> None:
    if fraction <= 0:
        return
    n_eval = max(1, round(n * fraction))
    if n < 2 or n - n_eval < 1:
        raise DataError([Problem(str(path), f"[too_few_rows] {n} row(s) cannot be split into train and eval "
                                            f"(validation.split {fraction}); add rows or give validation.dataset")])


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    """A row as one string and the character spans that carry loss."""

    text: str
    spans: tuple[tuple[int, int], ...]
    add_special_tokens: bool = True


def render(row: dict[str, Any], fmt: str, tokenizer: Any) -> Rendered:
    eos = getattr(tokenizer, "eos_token", None) or ""
    if fmt == "text":
        text = row["text"] + eos
        return Rendered(text, ((0, len(text)),))
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"] + eos
        return Rendered(prompt + completion, ((len(prompt), len(prompt) + len(completion)),))
    if fmt == "alpaca":
        template = ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT
        prompt = template.format(instruction=row["instruction"], input=row.get("input") or "")
        output = row["output"] + eos
        return Rendered(prompt + output, ((len(prompt), len(prompt) + len(output)),))
    if fmt == "chat":
        return _render_chat(row["messages"], tokenizer)
    raise ValueError(f"unknown format {fmt!r}")


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used to find the assistant turns."""


def _render_chat(messages: Sequence[dict[str, Any]], tokenizer: Any) -> Rendered:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat_template; chat datasets need one")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]

    def apply(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt))

    full = apply(clean, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        before = apply(clean[:index], True) if index else ""
        upto = apply(clean[: index + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError(
                "the chat template does not render a conversation as a prefix of its continuation; "
                "loss masking by assistant turn needs that"
            )
        spans.append((len(before), len(upto)))
    return Rendered(full, tuple(spans), add_special_tokens=False)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def trainable(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def encode(row: dict[str, Any], fmt: str, tokenizer: Any, max_seq_len: int) -> Encoded:
    """Tokenise one row; labels are the token ids inside trainable spans, else -100."""
    rendered = render(row, fmt, tokenizer)
    enc = tokenizer(
        rendered.text,
        add_special_tokens=rendered.add_special_tokens,
        return_offsets_mapping=True,
        truncation=False,
    )
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = list(enc["offset_mapping"])
    labels = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        inside = end > start and any(lo <= start < hi for lo, hi in rendered.spans)
        labels.append(token if inside else IGNORE_INDEX)
    truncated = len(ids) > max_seq_len
    return Encoded(ids[:max_seq_len], labels[:max_seq_len], truncated)
