"""Reading datasets: every storage kind, format detection, and every row check with its line and category."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraq import data
from loraq.data import RowProblem
from loraq.errors import DataError

try:  # Parquet is an optional extra: without it only the Parquet cases skip
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover
    pa = pq = None

needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow (loraq[parquet]) is not installed")

GOOD = {
    "chat": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]},
    "prompt_completion": {"prompt": "2+2=", "completion": " 4"},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 2", "output": "4"},
    "text": {"text": "The red fox slept."},
}


class Raw:
    """A line written as is (bytes or text), for rows that are not valid JSON or UTF-8."""

    def __init__(self, content: str | bytes) -> None:
        self.content = content if isinstance(content, bytes) else content.encode()


def write(folder: Path, kind: str, rows: list[Any], name: str = "data") -> Path:
    """Write ``rows`` as ``kind``. JSON arrays: one element a line after '[', so row i is on line i + 2."""
    path = folder / f"{name}.{ {'jsonl': 'jsonl', 'json': 'json', 'csv': 'csv', 'parquet': 'parquet'}[kind]}"

    def line(row: Any) -> bytes:
        return row.content if isinstance(row, Raw) else json.dumps(row).encode()

    if kind == "jsonl":
        path.write_bytes(b"".join(line(r) + b"\n" for r in rows))
    elif kind == "json":
        path.write_bytes(b"[\n" + b",\n".join(line(r) for r in rows) + b"\n]\n")
    elif kind == "csv":
        columns = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
        out = [_csv_line(columns)]
        out += [r.content + b"\n" if isinstance(r, Raw) else _csv_line([str(r.get(c, "")) for c in columns]) for r in rows]
        path.write_bytes(b"".join(out))
    else:
        if pa is None:
            pytest.skip("pyarrow (loraq[parquet]) is not installed")
        columns = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist would take the first row's keys only
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return path


def _csv_line(fields: list[str]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    return buffer.getvalue().encode()


def problems_of(path: Path, fmt: str | None = None) -> list[RowProblem]:
    with pytest.raises(DataError) as info:
        data.load_dataset(path, fmt)
    problems = info.value.problems
    assert all(isinstance(p, RowProblem) for p in problems)
    return problems  # type: ignore[return-value]


# Where row 3 (the bad one) is reported: (line, row) per storage kind.
BAD_AT = {"jsonl": (3, None), "json": (4, 3), "csv": (4, 3), "parquet": (3, 3)}

ROW_CASES: list[tuple[str, str, Any, tuple[str, ...]]] = [
    # category, file format, the bad row, the storage kinds that can hold it
    ("not_object", "prompt_completion", ["2+2=", "4"], ("jsonl", "json")),
    ("not_object", "chat", {"messages": ["hi", "hello"]}, ("jsonl", "json")),
    ("missing_messages", "chat", {"messages": []}, ("jsonl", "json", "parquet")),
    ("missing_role", "chat", {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     ("jsonl", "json", "parquet")),
    ("missing_content", "chat", {"messages": [{"role": "user"}, {"role": "assistant", "content": "Yo"}]},
     ("jsonl", "json", "parquet")),
    ("unrecognized_role", "chat", {"messages": [{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     ("jsonl", "json", "parquet")),
    ("unrecognized_key", "chat", {"messages": [{"role": "user", "contnet": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     ("jsonl", "json")),
    ("no_assistant", "chat", {"messages": [{"role": "user", "content": "Hi"}]}, ("jsonl", "json", "parquet")),
    ("empty_example", "chat", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     ("jsonl", "json", "parquet")),
    ("empty_example", "chat", {"messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Yo", "weight": 0}]}, ("jsonl", "json", "parquet")),
    ("bad_weight", "chat", {"messages": [{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Yo", "weight": 2}]}, ("jsonl", "json", "parquet")),
    ("bad_weight", "chat", {"messages": [{"role": "user", "content": "Hi", "weight": 1},
                                         {"role": "assistant", "content": "Yo"}]}, ("jsonl", "json")),
    ("empty_example", "prompt_completion", {"prompt": "2+2=", "completion": ""}, ("jsonl", "json", "csv", "parquet")),
    ("empty_example", "alpaca", {"instruction": "Add.", "input": "", "output": " "}, ("jsonl", "json", "csv", "parquet")),
    ("empty_example", "text", {"text": ""}, ("jsonl", "json", "csv", "parquet")),
    ("format_mismatch", "prompt_completion", {"text": "a text row"}, ("jsonl", "json", "parquet")),
    ("format_mismatch", "chat", {"prompt": "p", "completion": "c"}, ("jsonl", "json")),
    ("missing_key", "alpaca", {"instruction": "Add."}, ("jsonl", "json")),
    ("wrong_type", "prompt_completion", {"prompt": 4, "completion": "four"}, ("jsonl", "json")),
    ("wrong_type", "chat", {"messages": [{"role": "user", "content": ["part"]}, {"role": "assistant", "content": "Yo"}]},
     ("jsonl", "json")),
]


@pytest.mark.parametrize(("category", "fmt", "bad", "kind"),
                         [(c, f, b, k) for c, f, b, kinds in ROW_CASES for k in kinds],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_each_row_error_names_its_line_and_category(tmp_path: Path, category: str, fmt: str, bad: Any, kind: str) -> None:
    rows = [GOOD[fmt], GOOD[fmt], bad, GOOD[fmt], GOOD[fmt]]
    path = write(tmp_path, kind, rows)
    problems = problems_of(path)
    assert [(p.category, p.line, p.row) for p in problems] == [(category, *BAD_AT[kind])]
    problem = problems[0]
    assert problem.message.startswith(f"[{category}] ")
    assert problem.file == str(path)
    assert problem.where.startswith(str(path))
    assert f"{path}:{BAD_AT[kind][0]}" in problem.where or (kind == "parquet" and "row 3" in problem.where)
    assert category in data.CATEGORIES


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_not_json_names_the_line(tmp_path: Path, kind: str) -> None:
    rows = [GOOD["text"], GOOD["text"], Raw('{"text": "cut off'), GOOD["text"]]
    problems = problems_of(write(tmp_path, kind, rows))
    assert [(p.category, p.line) for p in problems] == [("not_json", BAD_AT[kind][0])]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_invalid_utf8_names_the_line(tmp_path: Path, kind: str) -> None:
    bad = Raw(b'{"text": "caf\xe9"}' if kind != "csv" else b"caf\xe9")
    rows = [GOOD["text"], GOOD["text"], bad, GOOD["text"]]
    problems = problems_of(write(tmp_path, kind, rows))
    assert [(p.category, p.line) for p in problems] == [("invalid_utf8", BAD_AT[kind][0])]


@needs_pyarrow
def test_invalid_utf8_in_a_parquet_binary_column(tmp_path: Path) -> None:
    table = pa.table({"text": pa.array([b"fine", b"also fine", b"caf\xe9", b"ok"], type=pa.binary())})
    pq.write_table(table, tmp_path / "d.parquet")
    problems = problems_of(tmp_path / "d.parquet")
    assert [(p.category, p.row, p.where) for p in problems] == [("invalid_utf8", 3, f"{tmp_path / 'd.parquet'}: row 3")]
    # valid UTF-8 in a binary column reads as text
    dataset, _ = data.check_dataset(tmp_path / "d.parquet")
    assert dataset is not None and [r["text"] for r in dataset.rows] == ["fine", "also fine", "ok"]


def test_every_error_is_listed_at_once_up_to_twenty_with_a_count(tmp_path: Path) -> None:
    rows: list[Any] = [GOOD["text"]] + [{"text": ""}] * 25 + [Raw("nope")] * 3
    problems = problems_of(write(tmp_path, "jsonl", rows))
    assert len(problems) == data.MAX_LISTED_PROBLEMS + 1
    assert [p.line for p in problems[:3]] == [2, 3, 4]
    assert problems[-1].category == "more"
    assert "8 more problem(s)" in problems[-1].message


def test_errors_of_different_kinds_in_one_file_are_all_reported(tmp_path: Path) -> None:
    rows = [GOOD["chat"], Raw("{broken"), [1], {"messages": [{"role": "user", "content": "Hi"}]}, GOOD["chat"]]
    problems = problems_of(write(tmp_path, "jsonl", rows))
    assert [(p.category, p.line) for p in problems] == [("not_json", 2), ("not_object", 3), ("no_assistant", 4)]


@pytest.mark.parametrize(("fmt", "kind"), [(f, k) for f in GOOD for k in ("jsonl", "json", "csv", "parquet")
                                            if (f, k) != ("chat", "csv")])
def test_format_is_detected_in_every_storage_kind(tmp_path: Path, fmt: str, kind: str) -> None:
    dataset = data.load_dataset(write(tmp_path, kind, [GOOD[fmt]] * 3))
    assert dataset.format == fmt
    assert len(dataset) == 3
    assert dataset.rows[0]["messages" if fmt == "chat" else data.TRAINED_KEY[fmt]]


def test_detection_follows_the_majority_and_flags_the_rest(tmp_path: Path) -> None:
    rows = [GOOD["text"], GOOD["prompt_completion"], GOOD["prompt_completion"], GOOD["prompt_completion"]]
    problems = problems_of(write(tmp_path, "jsonl", rows))
    assert [(p.category, p.line) for p in problems] == [("format_mismatch", 1)]
    assert "prompt_completion" in problems[0].message


def test_a_given_format_is_checked_not_detected(tmp_path: Path) -> None:
    path = write(tmp_path, "jsonl", [GOOD["text"]] * 2)
    problems = problems_of(path, "prompt_completion")
    assert [(p.category, p.line) for p in problems] == [("format_mismatch", 1), ("format_mismatch", 2)]


def test_unknown_format_names_the_keys(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "jsonl", [{"question": "q", "answer": "a"}]))
    assert problems[0].category == "unknown_format"
    assert "['answer', 'question']" in problems[0].message


@pytest.mark.parametrize("header", ["messages", "prompt,messages"])
def test_chat_in_csv_is_a_clear_error(tmp_path: Path, header: str) -> None:
    path = tmp_path / "chat.csv"
    path.write_text(f"{header}\n\"[{{\"\"role\"\": \"\"user\"\"}}]\"\n")
    problems = problems_of(path)
    assert [(p.category, p.line) for p in problems] == [("chat_in_csv", 1)]
    assert "JSON Lines" in problems[0].message


def test_chat_format_given_for_a_csv_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "csv", [GOOD["text"]])
    assert [p.category for p in problems_of(path, "chat")] == ["chat_in_csv"]


def test_csv_ragged_rows_header_and_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"two\nlines",fine\nonly one field\n"a","b","c"\np,c\n')
    problems = problems_of(path)
    assert [(p.category, p.line, p.row) for p in problems] == [("csv_columns", 4, 2), ("csv_columns", 5, 3)]
    (tmp_path / "h.csv").write_text("text,text\na,b\n")
    assert [p.category for p in problems_of(tmp_path / "h.csv")] == ["csv_header"]


def test_csv_reads_long_fields_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    long_text = "word " * 60_000  # past the csv module's default 128 KiB field limit
    path.write_bytes(b"\xef\xbb\xbftext\n" + long_text.encode() + b"\n")
    assert data.load_dataset(path).rows == [{"text": long_text}]


def test_json_array_rows_know_their_lines_when_pretty_printed(tmp_path: Path) -> None:
    rows = [GOOD["text"], {"text": ""}, GOOD["text"]]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2))
    problems = problems_of(path)
    expected_line = json.dumps(rows, indent=2).splitlines().index("  {", 2) + 1
    assert [(p.category, p.line, p.row) for p in problems] == [("empty_example", expected_line, 2)]
    assert problems[0].where == f"{path}:{expected_line} (row 2)"


def test_json_documents_that_are_not_arrays(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('"just a string"')
    assert [p.category for p in problems_of(tmp_path / "a.json")] == ["not_array"]
    (tmp_path / "b.json").write_text('[{"text": "a"}, {"text": "b"}] trailing')
    assert [(p.category, p.line) for p in problems_of(tmp_path / "b.json")] == [("not_json", 1)]


def test_storage_is_sniffed_when_the_suffix_lies(tmp_path: Path) -> None:
    # datasets' to_json writes JSON Lines into .json; some tools write arrays into .jsonl
    (tmp_path / "lines.json").write_text(json.dumps(GOOD["text"]) + "\n" + json.dumps(GOOD["text"]) + "\n")
    assert len(data.load_dataset(tmp_path / "lines.json")) == 2
    (tmp_path / "array.jsonl").write_text(json.dumps([GOOD["text"]] * 3, indent=1))
    assert len(data.load_dataset(tmp_path / "array.jsonl")) == 3


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    row = {"text": "one\u2028two\u0085three"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n\n   \n" + json.dumps(GOOD["text"]) + "\n", encoding="utf-8")
    dataset = data.load_dataset(path)
    assert dataset.rows[0] == row
    assert dataset.lines == [1, 4]


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_hostile_json_is_not_json_not_a_crash(tmp_path: Path, kind: str) -> None:
    rows = [GOOD["text"], GOOD["text"], Raw("[" * 100_000 + "]" * 100_000), Raw('{"text": ' + "9" * 5000 + "}")]
    problems = problems_of(write(tmp_path, kind, rows))
    assert [p.category for p in problems][0] == "not_json"
    assert problems[0].line == BAD_AT[kind][0]
    assert "nested too deeply" in problems[0].message


def test_a_pretty_printed_object_in_jsonl_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD["text"], indent=2) + "\n")
    problems = problems_of(path)
    assert problems[0].category == "not_json"
    assert "one object on one line" in problems[0].message


@pytest.mark.parametrize(("name", "content", "category"), [
    ("d.txt", "x", "unsupported"),
    ("missing.jsonl", None, "missing_file"),
    ("empty.jsonl", "\n\n", "empty_file"),
    ("empty.json", "[]", "empty_file"),
    ("empty.csv", "", "empty_file"),
    ("header_only.csv", "text\n", "empty_file"),
])
def test_file_level_problems(tmp_path: Path, name: str, content: str | None, category: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    assert [p.category for p in problems_of(tmp_path / name)] == [category]


def test_a_folder_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").mkdir()
    assert [p.category for p in problems_of(tmp_path / "d.jsonl")] == ["missing_file"]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "parquet", [GOOD["text"]])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    problems = problems_of(path)
    assert [p.category for p in problems] == ["unsupported"]
    assert "loraq[parquet]" in problems[0].message


@needs_pyarrow
def test_a_damaged_parquet_file_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really")
    assert [p.category for p in problems_of(tmp_path / "d.parquet")] == ["unreadable"]


def test_parquet_chat_rows_with_optional_weights(tmp_path: Path) -> None:
    rows = [GOOD["chat"], {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A", "weight": 0},
                                        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "B", "weight": 1}]}]
    dataset = data.load_dataset(write(tmp_path, "parquet", rows))
    assert dataset.format == "chat" and len(dataset) == 2
    assert dataset.rows[0]["messages"][0]["weight"] is None  # a struct gives every message every field


def test_check_dataset_keeps_the_good_rows_beside_the_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "jsonl", [GOOD["text"], {"text": ""}, GOOD["text"]])
    dataset, problems = data.check_dataset(path)
    assert dataset is not None and dataset.lines == [1, 3] and len(dataset) == 2
    assert problems.count == 1
    assert dataset.sha256 == data.sha256_bytes(path.read_bytes())


def test_split_is_seeded_deterministic_and_disjoint() -> None:
    train, evaluation = data.split_indices(100, 0.1, seed=7)
    assert (train, evaluation) == data.split_indices(100, 0.1, seed=7)
    assert data.split_indices(100, 0.1, seed=8) != (train, evaluation)
    assert len(evaluation) == 10 and sorted(train + evaluation) == list(range(100))


def test_too_few_rows_to_split(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        data.check_split(tmp_path / "d.jsonl", 1, 0.1)
    problem = info.value.problems[0]
    assert isinstance(problem, RowProblem) and problem.category == "too_few_rows"
    assert "validation.dataset" in problem.message
    data.check_split(tmp_path / "d.jsonl", 2, 0.1)  # one train row, one eval row: allowed


def test_row_problem_is_a_problem_and_serialises() -> None:
    problem = RowProblem("d.jsonl:3", "[not_json] bad", category="not_json", file="d.jsonl", line=3)
    assert str(problem) == "d.jsonl:3: [not_json] bad"
    assert problem.to_json() == {"where": "d.jsonl:3", "category": "not_json", "file": "d.jsonl", "line": 3,
                                 "row": None, "message": "[not_json] bad"}
    assert str(DataError([problem])) == "d.jsonl:3: [not_json] bad"


KEYS = ["messages", "role", "content", "weight", "name", "prompt", "completion", "instruction", "input", "output", "text", "x"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2) | st.floats(allow_nan=False) | st.sampled_from(["", " ", "hi", "user", "assistant", "bot"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    max_leaves=12,
)
messages = st.lists(st.dictionaries(st.sampled_from(["role", "content", "weight", "name", "x"]),
                                    st.none() | st.sampled_from(["user", "assistant", "system", "tool", "", "hi", 0, 1, 2, True]),
                                    max_size=4), max_size=4)


@settings(max_examples=300, deadline=None)
@given(row=json_values | st.fixed_dictionaries({"messages": messages}), fmt=st.sampled_from(list(data.FORMAT_KEYS)))
def test_row_checks_never_crash_and_always_name_a_known_category(row: Any, fmt: str) -> None:
    problem = data.row_problem(row, fmt)
    if problem is not None:
        category, message = problem
        assert category in data.CATEGORIES and isinstance(message, str) and message
