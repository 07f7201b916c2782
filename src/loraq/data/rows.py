"""Datasets: read rows, detect the format, check every row, and encode with loss masks.

Formats (detected from the rows when not given):

- ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI). Loss on
  assistant turns only (and only those with ``weight`` 1 when a weight is given).
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}``; loss on the completion.
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}``; loss on the output.
- ``text``: ``{"text": ...}``; loss on all of it.

Files: JSON Lines (``.jsonl``, ``.ndjson``), JSON arrays (``.json``), CSV (not for
chat: a conversation is a list) and Parquet (needs the ``loraq[parquet]`` extra).

Every problem is a :class:`RowProblem`: it names the file and line and carries a
stable ``category`` (see :data:`CATEGORIES`), shown to people as ``[category]``.

Rendering rows to text and tokenising them with loss masks is :mod:`.encoding`;
the package (:mod:`loraq.data`) exports the public names of both.

This module imports no torch: the submit path uses it to validate rows.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, Problem
from .encoding import TRAINED_KEY, is_trained

MAX_LISTED_PROBLEMS = 20
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
#: Keys a chat message may have; anything else is a typo or a feature loraq would silently drop.
MESSAGE_KEYS = frozenset({"role", "content", "weight", "name", "tool_call_id"})
FORMAT_KEYS = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
#: The field of each flat format that carries the loss.
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")

#: Every problem category, and what it means. Scripts and tests match on these names.
CATEGORIES = {
    "missing_file": "the dataset file is not there, or is a folder",
    "unreadable": "the file cannot be read (permissions, a damaged Parquet file)",
    "unsupported": "a file type loraq does not read, or a missing optional dependency",
    "empty_file": "the file has no rows",
    "invalid_utf8": "text that is not UTF-8",
    "not_json": "a line (or the file) is not valid JSON",
    "not_array": "a .json file that is not a JSON array of rows",
    "not_csv": "a CSV file the csv module cannot parse",
    "csv_header": "a CSV header with an empty or repeated column name",
    "csv_columns": "a CSV record with more or fewer fields than the header",
    "chat_in_csv": "a chat dataset stored as CSV (a conversation is a list: use JSON Lines)",
    "not_object": "a row (or message) that is not a JSON object",
    "unknown_format": "no row has the keys of any format",
    "format_mismatch": "a row with the keys of another format than the file's",
    "missing_key": "a row without a key its format needs",
    "wrong_type": "a value of the wrong type (e.g. a number where text belongs)",
    "empty_example": "a row with nothing to train on",
    "missing_messages": "a chat row without a non-empty 'messages' list",
    "missing_role": "a message without a role",
    "missing_content": "a message without content",
    "unrecognized_role": "a role other than system, user, assistant, tool",
    "unrecognized_key": "a message key loraq does not use (a typo, or a feature it would drop)",
    "bad_weight": "a message weight other than 0 or 1, or a weight on a non-assistant message",
    "no_assistant": "a chat row without an assistant message",
    "too_few_rows": "too few rows to split into train and eval",
    "template_error": "the tokenizer's chat template cannot render the row, or not prefix-stably",
    "untrainable": "no trainable token is left after truncation to max_seq_len",
    "tokenizer": "the base model's tokenizer cannot be loaded or used",
    "more": "the count of problems not listed",
    "repeated": "a shared file's problems, listed once under the first job that uses it",
}


@dataclass(frozen=True)
class RowProblem(Problem):
    """A problem in a dataset file; ``where`` reads ``file:line``, ``category`` is for scripts."""

    category: str = "invalid"
    file: str = ""
    line: int | None = None  # the line in the file; the row number in a Parquet file
    row: int | None = None  # the position among the file's records, 1-based (JSON arrays, CSV, Parquet)

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "category": self.category, "file": self.file, "line": self.line,
                "row": self.row, "message": self.message}


def where_in(path: Path | str, kind: str, line: int | None, row: int | None) -> str:
    """``file:line`` as an editor wants it, with the record number where lines and rows differ."""
    if kind == "parquet" and row is not None:
        return f"{path}: row {row}"
    if line is None:
        return str(path)
    if kind == "jsonl" or row is None or row == line:
        return f"{path}:{line}"
    return f"{path}:{line} (row {row})"


class ProblemList:
    """The problems of one file, all counted; the first :data:`MAX_LISTED_PROBLEMS` by line are listed."""

    def __init__(self, path: Path | str, kind: str = "jsonl") -> None:
        self.path = str(path)
        self.kind = kind
        self._found: list[tuple[int, int, str, str, int | None, int | None]] = []

    @property
    def count(self) -> int:
        return len(self._found)

    def add(self, category: str, message: str, *, line: int | None = None, row: int | None = None) -> None:
        # kept unformatted: a file may have a problem in every row, and only 20 are shown
        self._found.append((line or 0, len(self._found), category, message, line, row))

    def problems(self) -> list[Problem]:
        # reading finds broken lines before the row checks find the rest: list them in file order
        shown = sorted(self._found)[:MAX_LISTED_PROBLEMS]
        problems: list[Problem] = [
            RowProblem(where_in(self.path, self.kind, line, row), f"[{category}] {message}", category=category,
                       file=self.path, line=line, row=row)
            for _, _, category, message, line, row in shown
        ]
        if self.count > len(shown):
            rest = self.count - len(shown)
            problems.append(RowProblem(self.path, f"[more] ... and {rest} more problem(s) not listed",
                                       category="more", file=self.path))
        return problems

    def raise_if_any(self) -> None:
        if self.count:
            raise DataError(self.problems())


@dataclass(frozen=True)
class Dataset:
    path: Path
    format: str
    rows: list[dict[str, Any]]
    lines: list[int]  # the line (Parquet: the row number) of each row, 1-based
    sha256: str
    kind: str = "jsonl"  # how the file is stored: jsonl | json | csv | parquet
    records: list[int] = field(default_factory=list)  # each row's record number, 1-based

    def __len__(self) -> int:
        return len(self.rows)

    def locate(self, index: int) -> tuple[int, int | None]:
        """``(line, record)`` of row ``index``, for a problem about it."""
        return self.lines[index], (self.records[index] if self.records else None)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix)


# ---------------------------------------------------------------- reading

Record = tuple[int, int | None, Any]  # (line, record number or None, value)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_SPACE_BYTES = re.compile(rb"[ \t\n\r]*")


def _read_bytes(path: Path, out: ProblemList) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        out.add("missing_file", "dataset file not found")
    except IsADirectoryError:
        out.add("missing_file", "is a folder, expected a dataset file")
    except OSError as exc:
        out.add("unreadable", f"cannot read: {exc.strerror}")
    return None


def _decode_lines(raw: bytes, out: ProblemList) -> list[str | None]:
    """The file's lines; a line that is not UTF-8 is reported and given as None."""
    try:
        # split on "\n" only: str.splitlines would also split inside JSON strings at U+2028
        return list(raw.decode("utf-8").split("\n"))
    except UnicodeDecodeError:
        pass
    lines: list[str | None] = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad = chunk[exc.start:exc.start + 4]
            out.add("invalid_utf8", f"not UTF-8 text (byte {exc.start + 1} of the line: {bad!r})",
                    line=number)
            lines.append(None)
    return lines


def read_records(path: Path, raw: bytes, out: ProblemList) -> list[Record]:
    """Parse the file into records; problems go to ``out``."""
    if out.kind == "parquet":
        return _read_parquet(raw, out)
    if raw.startswith(codecs.BOM_UTF8):  # Excel and Notepad write one; it is not part of the data
        raw = raw[len(codecs.BOM_UTF8):]
    start = _JSON_SPACE_BYTES.match(raw).end()  # type: ignore[union-attr]
    first = raw[start:start + 1]
    if out.kind == "jsonl" and first == b"[":
        out.kind = "json"  # a JSON array saved as .jsonl: read it as what it is
    elif out.kind == "json" and first == b"{":
        out.kind = "jsonl"  # JSON Lines saved as .json (datasets' to_json does this)
    if out.kind == "jsonl":
        return _read_jsonl(_decode_lines(raw, out), out)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _decode_lines(raw, out)  # lists every line that is not UTF-8; the document as a whole is unusable
        return []
    return _read_csv(text, out) if out.kind == "csv" else _read_json_array(text, out)


def _read_jsonl(lines: list[str | None], out: ProblemList) -> list[Record]:
    records: list[Record] = []
    loads = json.loads
    for number, line in enumerate(lines, start=1):
        if line is None or not line or line.isspace():
            continue
        try:
            records.append((number, None, loads(line)))
        except (ValueError, RecursionError) as exc:
            hint = ""
            if line.strip() in ("{", "[", "}", "]", "},", "],"):
                hint = "; JSON Lines needs each row as one object on one line"
            out.add("not_json", f"not valid JSON: {_json_reason(exc)}{hint}", line=number)
    return records


def _json_reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)  # e.g. an integer with more digits than Python converts


def _read_json_array(text: str, out: ProblemList) -> list[Record]:
    """Parse ``[row, row, ...]`` element by element, so each row knows its line."""
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text).end()  # type: ignore[union-attr]
    if pos >= len(text):
        return []
    if text[pos] != "[":
        try:
            json.loads(text)
        except (ValueError, RecursionError) as exc:
            out.add("not_json", f"not valid JSON: {_json_reason(exc)}",
                    line=exc.lineno if isinstance(exc, json.JSONDecodeError) else 1)
        else:
            out.add("not_array", "a .json dataset must be a JSON array of rows, or JSON Lines (one row a line)", line=1)
        return []
    records: list[Record] = []
    line, counted = 1, 0

    def line_at(position: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, position)
        counted = position
        return line

    pos = _JSON_SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
    if pos < len(text) and text[pos] == "]":
        return []
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            out.add("not_json", f"not valid JSON: {_json_reason(exc)}",
                    line=exc.lineno if isinstance(exc, json.JSONDecodeError) else line_at(pos), row=len(records) + 1)
            return records
        records.append((line_at(pos), len(records) + 1, value))
        pos = _JSON_SPACE.match(text, end).end()  # type: ignore[union-attr]
        if pos < len(text) and text[pos] == ",":
            pos = _JSON_SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
            continue
        if pos < len(text) and text[pos] == "]" and _JSON_SPACE.match(text, pos + 1).end() == len(text):  # type: ignore[union-attr]
            return records
        out.add("not_json", "not valid JSON: expected ',' or the closing ']' of the array", line=line_at(pos))
        return records


def _read_csv(text: str, out: ProblemList) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[Record] = []
    # Long documents exceed the csv module's default 128 KiB field limit; lift it while we read.
    previous_limit = csv.field_size_limit(1 << 30)
    try:
        header = [name.strip() for name in next(reader, [])]
        if not header:
            return []
        if "messages" in header:
            out.add("chat_in_csv", "chat rows cannot be stored in CSV: a conversation is a list of messages. "
                    "Convert the file to JSON Lines, one {\"messages\": [...]} object a line", line=1)
            return []
        repeated = sorted(name for name, n in Counter(header).items() if n > 1 or not name)
        if repeated:
            out.add("csv_header", f"column names must be unique and non-empty: {repeated}", line=1)
            return []
        previous = reader.line_num
        for number, fields in enumerate(reader, start=1):
            line, previous = previous + 1, reader.line_num
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                out.add("csv_columns", f"has {len(fields)} field(s), the header has {len(header)}",
                        line=line, row=number)
                continue
            records.append((line, number, dict(zip(header, fields, strict=True))))
    except csv.Error as exc:
        out.add("not_csv", f"not valid CSV: {exc}", line=reader.line_num)
    finally:
        csv.field_size_limit(previous_limit)
    return records


def _read_parquet(raw: bytes, out: ProblemList) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        out.add("unsupported", "reading Parquet needs pyarrow: pip install 'loraq[parquet]'")
        return []
    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as exc:  # pyarrow raises many types for a damaged file
        out.add("unreadable", f"not a readable Parquet file: {exc}")
        return []
    rows = table.to_pylist()
    if not _has_binary(table.schema.types):
        return [(number, number, row) for number, row in enumerate(rows, start=1)]
    # Some writers store text as binary columns: read UTF-8 bytes as the text they are.
    records: list[Record] = []
    for number, row in enumerate(rows, start=1):
        try:
            records.append((number, number, _as_text(row)))
        except UnicodeDecodeError as exc:
            out.add("invalid_utf8", f"a binary value is not UTF-8 text (byte {exc.start + 1})", row=number)
    return records


def _has_binary(types: Sequence[Any]) -> bool:
    import pyarrow as pa

    for t in types:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            return True
        if (pa.types.is_list(t) or pa.types.is_large_list(t)) and _has_binary([t.value_type]):
            return True
        if pa.types.is_struct(t) and _has_binary([t.field(i).type for i in range(t.num_fields)]):
            return True
    return False


def _as_text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list):
        return [_as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_text(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- row checks


def detect_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    for name, keys in FORMAT_KEYS.items():
        # a null is no value: Parquet gives every row every column, null where a row has none
        if all(row.get(k) is not None for k in keys):
            return name
    return None


def detect_file_format(values: Sequence[Any]) -> str | None:
    """The format most rows have (the first seen wins a tie); None when no row has one."""
    counts = Counter(f for f in map(detect_format, values) if f is not None)
    return max(counts, key=counts.__getitem__) if counts else None


def _text_problem(value: Any, name: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        return None
    return "wrong_type", f"{name} must be a string, got {type(value).__name__}"


def row_problem(row: Any, fmt: str) -> tuple[str, str] | None:
    """The first thing wrong with ``row`` as a ``fmt`` row, as ``(category, message)``."""
    if not isinstance(row, dict):
        return "not_object", f"expected a JSON object, got {type(row).__name__}"
    if fmt == "chat":
        return _chat_problem(row)
    keys = FORMAT_KEYS[fmt]
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        other = detect_format(row)
        if other and other != fmt:
            return "format_mismatch", f"row has the keys of {other}, but the file is {fmt}"
        return "missing_key", f"missing {', '.join(repr(k) for k in missing)} for format {fmt}"
    for key in (*keys, "input"):
        if row.get(key) is not None and (problem := _text_problem(row[key], repr(key))):
            return problem
    trained = TRAINED_KEY[fmt]
    if not row[trained].strip():
        return "empty_example", f"{trained!r} is empty: nothing to train on"
    return None


def _message_problem(message: Any) -> tuple[str, str] | None:
    """What is wrong with one message; the text follows ``messages[i]``. Kept lean: it runs per message."""
    if not isinstance(message, dict):
        return "not_object", f" must be an object, got {type(message).__name__}"
    if not message.keys() <= MESSAGE_KEYS:
        unknown = sorted(k for k, v in message.items() if k not in MESSAGE_KEYS and v is not None)
        if unknown:
            return "unrecognized_key", f" has key(s) {unknown}; a message has {', '.join(sorted(MESSAGE_KEYS))}"
    role, content, weight = message.get("role"), message.get("content"), message.get("weight")
    if role is None:
        return "missing_role", " has no 'role'"
    if content is None:
        return "missing_content", " has no 'content' (or it is null)"
    if not isinstance(role, str) or role not in CHAT_ROLES:
        return "unrecognized_role", f".role {role!r} is not one of {', '.join(sorted(CHAT_ROLES))}"
    if not isinstance(content, str):
        return "wrong_type", f".content must be a string, got {type(content).__name__}"
    if weight is not None:
        if isinstance(weight, bool) or weight not in (0, 1):
            return "bad_weight", f".weight must be 0 or 1, got {weight!r}"
        if role != "assistant":
            return "bad_weight", f".weight is set on a {role} message; only assistant turns are weighted"
    return None


def _chat_problem(row: dict[str, Any]) -> tuple[str, str] | None:
    if row.get("messages") is None:
        other = detect_format(row)
        if other and other != "chat":
            return "format_mismatch", f"row has the keys of {other}, but the file is chat"
        return "missing_messages", "missing 'messages'"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "missing_messages", "'messages' must be a non-empty list of messages"
    has_assistant = trainable = False
    for index, message in enumerate(messages):
        if problem := _message_problem(message):
            category, text = problem
            return category, f"messages[{index}]{text}"
        if message["role"] == "assistant":
            has_assistant = True
            trainable = trainable or (is_trained(message) and bool(message["content"].strip()))
    if not has_assistant:
        return "no_assistant", "no assistant message: nothing to train on"
    if not trainable:
        return "empty_example", "no assistant message with content and weight 1: nothing to train on"
    return None


def check_dataset(path: str | Path, fmt: str | None = None) -> tuple[Dataset | None, ProblemList]:
    """Read and check every row. Returns the good rows (None if the file is unusable) and the problems."""
    path = Path(path)
    kind = file_kind(path)
    out = ProblemList(path, kind or "jsonl")
    if kind is None:
        out.add("unsupported", f"unknown dataset type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
        return None, out
    if kind == "csv" and fmt == "chat":
        out.add("chat_in_csv", "chat datasets cannot be CSV: a conversation is a list of messages; use JSON Lines")
        return None, out
    raw = _read_bytes(path, out)
    if raw is None:
        return None, out
    records = read_records(path, raw, out)
    if not records:
        if not out.count:
            out.add("empty_file", "no rows")
        return None, out
    if fmt is None:
        fmt = detect_file_format([value for _, _, value in records])
        if fmt is None:
            line, number, first = records[0]
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            out.add("unknown_format", f"cannot tell the format from keys {keys}; expected 'messages', "
                    "'prompt'+'completion', 'instruction'+'output' or 'text' (or set dataset.format)",
                    line=line, row=number)
            return None, out
    rows, lines, numbers = [], [], []
    for line, number, row in records:
        problem = row_problem(row, fmt)
        if problem:
            out.add(*problem, line=line, row=number)
        else:
            rows.append(row)
            lines.append(line)
            numbers.append(number if number is not None else line)
    dataset = Dataset(path=path, format=fmt, rows=rows, lines=lines, sha256=sha256_bytes(raw), kind=out.kind,
                      records=numbers)
    return dataset, out


def load_dataset(path: str | Path, fmt: str | None = None) -> Dataset:
    """Read and check every row of a dataset; raise :class:`DataError` listing the problems."""
    dataset, problems = check_dataset(path, fmt)
    problems.raise_if_any()
    assert dataset is not None
    return dataset


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
        raise DataError([RowProblem(str(path), f"[too_few_rows] {n} row(s) cannot be split into train and eval "
                                               f"(validation.split {fraction}); add rows or give validation.dataset",
                                    category="too_few_rows", file=str(path))])
