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
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, PathError, Problem
from ..escape import excerpt
from ..sandbox import Roots, open_regular, read_fd, resolve
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
    # preference pairs (issue 23, data/pairs.py): TRL's, and OpenAI's DPO rows
    "preference": ("prompt", "chosen", "rejected"),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),
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
    "identical_pair": "a preference pair whose chosen and rejected answers are the same",
    "too_few_rows": "too few rows to split into train and eval",
    "template_error": "the tokenizer's chat template cannot render the row, or not prefix-stably",
    "untrainable": "no trainable token is left after truncation to max_seq_len",
    "tokenizer": "the base model's tokenizer cannot be loaded or used",
    "outside_roots": "the file lies outside the allowed roots, or is not a regular file (a FIFO, a device)",
    "too_large": "a file, a row or a count of rows over a limit (each names the limit and how to raise it)",
    "changed": "the file changed since it was submitted (its rows were checked as they were)",
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
    size: int = 0  # the file's bytes, as read

    def __len__(self) -> int:
        return len(self.rows)

    def locate(self, index: int) -> tuple[int, int | None]:
        """``(line, record)`` of row ``index``, for a problem about it."""
        return self.lines[index], (self.records[index] if self.records else None)


@dataclass(frozen=True)
class ReadLimits:
    """How much of a dataset loraq reads, so a hostile or mistaken file costs bounded time and memory.

    Each limit can be changed for a home in its ``config.yaml``
    (``limits: {max_row_bytes: 4194304}``); the error that names a limit says so.
    """

    max_file_bytes: int = 4 << 30  # the whole file
    max_row_bytes: int = 1 << 20  # one row, as stored (a JSON line, a CSV record, a Parquet row's text)
    max_rows: int = 2_000_000  # rows in one file
    max_parquet_row_groups: int = 100_000  # row groups read from one Parquet file

    @classmethod
    def of(cls, overrides: dict[str, int] | None) -> ReadLimits:
        """Defaults with ``overrides`` (from config.yaml) laid over; an unknown name is an error."""
        overrides = overrides or {}
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise DataError([Problem("config.yaml: limits", f"unknown limit(s) {', '.join(unknown)}; known: "
                                                            f"{', '.join(cls.__dataclass_fields__)}")])
        return cls(**overrides)

    def over(self, name: str, value: int, what: str) -> str:
        """The message for ``what`` being over the limit ``name``."""
        return (f"{what} ({value:,}) is over the limit of {getattr(self, name):,}; raise it with "
                f"limits: {{{name}: N}} in the home's config.yaml")


DEFAULT_LIMITS = ReadLimits()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix)


# ---------------------------------------------------------------- reading

Record = tuple[int, int | None, Any]  # (line, record number or None, value)
#: Stands in for a row already reported (too large): it keeps its place, so later rows keep their numbers.
_OVERSIZED = object()
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_SPACE_BYTES = re.compile(rb"[ \t\n\r]*")


def _read_bytes(path: Path, out: ProblemList, roots: Roots | None, limits: ReadLimits,
                expect: tuple[int | None, str] | None) -> bytes | None:
    """The file's bytes, read from a descriptor checked to be a regular file inside ``roots``.

    ``expect`` is ``(size, sha256)`` from submit: a file whose size differs is refused
    before it is read, one whose digest differs before any row is parsed, so nothing
    of a swapped file reaches a message.
    """
    try:
        resolved = resolve(path, what="dataset")
        if not resolved.exists():
            out.add("missing_file", "dataset file not found")
            return None
        if resolved.is_dir():
            out.add("missing_file", "is a folder, expected a dataset file")
            return None
        fd, st = roots.open_file(path, what="dataset") if roots is not None else (
            open_regular(resolved, what="dataset", shown=path), None)
    except PathError as exc:
        out.add("outside_roots", str(exc))
        return None
    except OSError as exc:
        out.add("unreadable", f"cannot read: {exc.strerror or exc}")
        return None
    try:
        size = (st or os.fstat(fd)).st_size
        if expect is not None and expect[0] is not None and size != expect[0]:
            out.add("changed", f"the dataset changed since it was submitted ({expect[0]:,} bytes then, {size:,} now); "
                               "its rows were validated as they were. Restore the file, or submit the job again "
                               "under a new name")
            return None
        if size > limits.max_file_bytes:
            out.add("too_large", limits.over("max_file_bytes", size, "the file's size in bytes"))
            return None
        raw = read_fd(fd, limits.max_file_bytes + 1)
    except OSError as exc:
        out.add("unreadable", f"cannot read: {exc.strerror or exc}")
        return None
    finally:
        os.close(fd)
    if len(raw) > limits.max_file_bytes:  # it grew while being read
        out.add("too_large", limits.over("max_file_bytes", len(raw), "the file's size in bytes"))
        return None
    if expect is not None and sha256_bytes(raw) != expect[1]:
        out.add("changed", f"the dataset changed since it was submitted (sha256 {expect[1][:12]}… then, "
                           f"{sha256_bytes(raw)[:12]}… now); its rows were validated as they were. Restore the "
                           "file, or submit the job again under a new name")
        return None
    return raw


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


def read_records(path: Path, raw: bytes, out: ProblemList, limits: ReadLimits = DEFAULT_LIMITS) -> list[Record]:
    """Parse the file into records; problems go to ``out``. Rows over ``limits`` are reported, not kept."""
    if out.kind == "parquet":
        return _read_parquet(raw, out, limits)
    if raw.startswith(codecs.BOM_UTF8):  # Excel and Notepad write one; it is not part of the data
        raw = raw[len(codecs.BOM_UTF8):]
    start = _JSON_SPACE_BYTES.match(raw).end()  # type: ignore[union-attr]
    first = raw[start:start + 1]
    if out.kind == "jsonl" and first == b"[":
        out.kind = "json"  # a JSON array saved as .jsonl: read it as what it is
    elif out.kind == "json" and first == b"{":
        out.kind = "jsonl"  # JSON Lines saved as .json (datasets' to_json does this)
    if out.kind == "jsonl":
        # A cheap upper bound first: a file of 50 M short lines is refused before any is parsed.
        if raw.count(b"\n") + 1 > limits.max_rows and _count_rows(raw) > limits.max_rows:
            out.add("too_large", limits.over("max_rows", _count_rows(raw), "the number of rows"))
            return []
        return _read_jsonl(_decode_lines(raw, out), out, limits)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _decode_lines(raw, out)  # lists every line that is not UTF-8; the document as a whole is unusable
        return []
    records = _read_csv(text, out, limits) if out.kind == "csv" else _read_json_array(text, out, limits)
    return records


def _count_rows(raw: bytes) -> int:
    return sum(1 for line in raw.split(b"\n") if line.strip())


def _too_many(count: int, out: ProblemList, limits: ReadLimits) -> bool:
    """Whether ``count`` rows (read so far) is past ``max_rows``, reported once."""
    if count > limits.max_rows:
        out.add("too_large", limits.over("max_rows", count, "the number of rows (at least)"))
        return True
    return False


def _read_jsonl(lines: list[str | None], out: ProblemList, limits: ReadLimits) -> list[Record]:
    records: list[Record] = []
    loads = json.loads
    max_chars = limits.max_row_bytes
    for number, line in enumerate(lines, start=1):
        if line is None or not line or line.isspace():
            continue
        # characters are at most bytes: only a line long in characters can be long in bytes
        if len(line) > max_chars // 4 and len(line.encode("utf-8", "surrogatepass")) > max_chars:
            out.add("too_large", limits.over("max_row_bytes", len(line.encode("utf-8", "surrogatepass")),
                                             "the row's size in bytes"), line=number)
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


def _read_json_array(text: str, out: ProblemList, limits: ReadLimits) -> list[Record]:
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
        if end - pos > limits.max_row_bytes // 4 and len(text[pos:end].encode("utf-8", "surrogatepass")) > limits.max_row_bytes:
            out.add("too_large", limits.over("max_row_bytes", len(text[pos:end].encode("utf-8", "surrogatepass")),
                                             "the row's size in bytes"), line=line_at(pos), row=len(records) + 1)
            records.append((line_at(pos), len(records) + 1, _OVERSIZED))
        else:
            records.append((line_at(pos), len(records) + 1, value))
        if _too_many(len(records), out, limits):
            return []
        pos = _JSON_SPACE.match(text, end).end()  # type: ignore[union-attr]
        if pos < len(text) and text[pos] == ",":
            pos = _JSON_SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
            continue
        if pos < len(text) and text[pos] == "]" and _JSON_SPACE.match(text, pos + 1).end() == len(text):  # type: ignore[union-attr]
            return records
        out.add("not_json", "not valid JSON: expected ',' or the closing ']' of the array", line=line_at(pos))
        return records


def _read_csv(text: str, out: ProblemList, limits: ReadLimits) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[Record] = []
    # Long documents exceed the csv module's default 128 KiB field limit; lift it while we read.
    previous_limit = csv.field_size_limit(max(limits.max_row_bytes + 1, 1 << 17))
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
            size = sum(map(len, fields))
            if size > limits.max_row_bytes // 4 and sum(len(f.encode("utf-8", "surrogatepass")) for f in fields) > limits.max_row_bytes:
                out.add("too_large", limits.over("max_row_bytes", sum(len(f.encode("utf-8", "surrogatepass"))
                                                                      for f in fields), "the row's size in bytes"),
                        line=line, row=number)
                continue
            if _too_many(len(records) + 1, out, limits):
                return []
            records.append((line, number, dict(zip(header, fields, strict=True))))
    except csv.Error as exc:
        out.add("not_csv", f"not valid CSV: {exc}", line=reader.line_num)
    finally:
        csv.field_size_limit(previous_limit)
    return records


def _read_parquet(raw: bytes, out: ProblemList, limits: ReadLimits) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        out.add("unsupported", "reading Parquet needs pyarrow: pip install 'loraq[parquet]'")
        return []
    # The footer says how many rows and row groups the file holds, before any is read: a
    # 340 KB file can hold 50 M rows. Row groups are then read one at a time.
    try:
        parquet = pq.ParquetFile(io.BytesIO(raw))
        meta = parquet.metadata
    except Exception as exc:  # pyarrow raises many types for a damaged file
        out.add("unreadable", f"not a readable Parquet file: {excerpt(str(exc), 160)}")
        return []
    if meta.num_rows > limits.max_rows:
        out.add("too_large", limits.over("max_rows", meta.num_rows, "the number of rows"))
        return []
    if meta.num_row_groups > limits.max_parquet_row_groups:
        out.add("too_large", limits.over("max_parquet_row_groups", meta.num_row_groups, "the number of row groups"))
        return []
    binary = _has_binary(parquet.schema_arrow.types)
    records: list[Record] = []
    try:
        for group in range(meta.num_row_groups):
            # A row group is what pyarrow decompresses at once: bound it before reading it.
            stored = meta.row_group(group).total_byte_size
            if stored > limits.max_file_bytes:
                out.add("too_large", limits.over("max_file_bytes", stored, f"row group {group + 1}'s size in bytes"))
                return []
            for row in parquet.read_row_group(group).to_pylist():
                number = len(records) + 1
                if number > limits.max_rows:  # the footer lied about its rows
                    out.add("too_large", limits.over("max_rows", number, "the number of rows (at least)"))
                    return []
                if binary:
                    try:
                        row = _as_text(row)
                    except UnicodeDecodeError as exc:
                        out.add("invalid_utf8", f"a binary value is not UTF-8 text (byte {exc.start + 1})", row=number)
                        records.append((number, number, _OVERSIZED))
                        continue
                size = _text_size(row)
                if size > limits.max_row_bytes:
                    out.add("too_large", limits.over("max_row_bytes", size, "the row's size in bytes"), row=number)
                    row = _OVERSIZED
                records.append((number, number, row))
    except Exception as exc:  # a damaged row group
        out.add("unreadable", f"not a readable Parquet file: {excerpt(str(exc), 160)}")
        return []
    # Rows refused above keep their number (so the next row's is right) but are not rows.
    return [r for r in records if r[2] is not _OVERSIZED]


def _text_size(value: Any) -> int:
    """Bytes of text in a row (its strings, as UTF-8), the measure of a Parquet row's size."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _text_size(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    return 8


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
    if fmt in PAIR_KEYS:
        other = detect_format(row)
        if other is not None and other != fmt:
            return "format_mismatch", f"row has the keys of {other}, but the file is {fmt}"
        return pair_problem(row, fmt)
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
            return "unrecognized_key", f" has key(s) {excerpt(unknown)}; a message has {', '.join(sorted(MESSAGE_KEYS))}"
    role, content, weight = message.get("role"), message.get("content"), message.get("weight")
    if role is None:
        return "missing_role", " has no 'role'"
    if content is None:
        return "missing_content", " has no 'content' (or it is null)"
    if not isinstance(role, str) or role not in CHAT_ROLES:
        return "unrecognized_role", f".role {excerpt(role, 40)} is not one of {', '.join(sorted(CHAT_ROLES))}"
    if not isinstance(content, str):
        return "wrong_type", f".content must be a string, got {type(content).__name__}"
    if weight is not None:
        if isinstance(weight, bool) or weight not in (0, 1):
            return "bad_weight", f".weight must be 0 or 1, got {excerpt(weight, 40)}"
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


# ---------------------------------------------------------------- preference pairs (issue 23, data/pairs.py)

#: Each preference format's keys: the prompt, the chosen and the rejected answer.
PAIR_KEYS = {
    "preference": ("prompt", "chosen", "rejected"),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),
}


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


_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_problem(value: Any) -> tuple[str, str] | None:
    """A lone surrogate (JSON's ``"\\ud800"`` with no pair) is no character: no tokenizer or file can hold it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return "invalid_utf8", "holds a lone surrogate (an escaped \\ud800-\\udfff without its pair), which is not text"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def check_dataset(path: str | Path, fmt: str | None = None, *, roots: Roots | None = None,
                  limits: ReadLimits = DEFAULT_LIMITS,
                  expect: tuple[int | None, str] | None = None) -> tuple[Dataset | None, ProblemList]:
    """Read and check every row. Returns the good rows (None if the file is unusable) and the problems.

    Args:
        roots: the file is opened only as a regular file inside these (checked on the
            descriptor read, so a file swapped for a symlink, FIFO or device is refused).
        limits: bytes, rows and row groups read at most.
        expect: ``(size, sha256)`` of the file as submitted (the trainer's read):
            a changed file is refused before any row is parsed.
    """
    path = Path(path)
    kind = file_kind(path)
    out = ProblemList(path, kind or "jsonl")
    if kind is None:
        out.add("unsupported", f"unknown dataset type {excerpt(path.suffix, 40)}; use one of {', '.join(SUFFIXES)}")
        return None, out
    if kind == "csv" and fmt == "chat":
        out.add("chat_in_csv", "chat datasets cannot be CSV: a conversation is a list of messages; use JSON Lines")
        return None, out
    raw = _read_bytes(path, out, roots, limits, expect)
    if raw is None:
        return None, out
    records = [r for r in read_records(path, raw, out, limits) if r[2] is not _OVERSIZED]
    if not records:
        if not out.count:
            out.add("empty_file", "no rows")
        return None, out
    if fmt is None:
        fmt = detect_file_format([value for _, _, value in records])
        if fmt is None:
            line, number, first = records[0]
            keys = excerpt(sorted(map(str, first))) if isinstance(first, dict) else type(first).__name__
            out.add("unknown_format", f"cannot tell the format from keys {keys}; expected 'messages', "
                    "'prompt'+'completion', 'instruction'+'output', 'text', 'prompt'+'chosen'+'rejected' or "
                    "'input'+'preferred_output'+'non_preferred_output' (or set dataset.format)",
                    line=line, row=number)
            return None, out
    rows, lines, numbers = [], [], []
    for line, number, row in records:
        problem = _surrogate_problem(row) or row_problem(row, fmt)
        if problem:
            out.add(*problem, line=line, row=number)
        else:
            rows.append(row)
            lines.append(line)
            numbers.append(number if number is not None else line)
    dataset = Dataset(path=path, format=fmt, rows=rows, lines=lines, sha256=sha256_bytes(raw), kind=out.kind,
                      records=numbers, size=len(raw))
    return dataset, out


def load_dataset(path: str | Path, fmt: str | None = None, *, roots: Roots | None = None,
                 limits: ReadLimits = DEFAULT_LIMITS, expect: tuple[int | None, str] | None = None) -> Dataset:
    """Read and check every row of a dataset; raise :class:`DataError` listing the problems."""
    dataset, problems = check_dataset(path, fmt, roots=roots, limits=limits, expect=expect)
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
