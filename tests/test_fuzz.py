"""Fuzzing the two inputs a person hands loraq: queue files and dataset rows (hypothesis).

Whatever is generated, ``loraq submit --dry-run`` either accepts it (exit 0), or
refuses it with clear lines on stderr (exit 1 or 2): each line one printable line,
short, naming where the problem is. No traceback ever reaches the user, and the
command never crashes. The examples are run in this process through the CLI's own
``main`` (cheap: the tiny tokenizer is loaded per example from local files).
``LORAQ_FUZZ_EXAMPLES=1000`` runs a longer search.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraq.cli import main

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=int(os.environ.get("LORAQ_FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

#: Text that reaches for the places parsers and terminals break: controls, surrogates, YAML syntax.
TEXTS = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.sampled_from(list("\x00\x1b\x07\n\r\t\u202e\ud800\\\"'{}[]:&*!|>-#%@`$~ .aZ9")), max_size=20),
    st.sampled_from(["", ".", "..", "/", "~", "-rf", "CON", "nul.txt", "1", "#1", "x" * 300, "a\nb", "\x1b]0;t\x07",
                     "./data/sql.jsonl", "./models/tiny", "../../etc/passwd", "/dev/zero", "all-linear"]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), TEXTS)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(TEXTS, inner, max_size=4)), max_leaves=12)
KEYS = st.sampled_from(["name", "dataset", "base_model", "lora", "training", "validation", "max_retries", "priority",
                        "trust_remote_code", "revision", "format", "path", "r", "alpha", "dropout",
                        "target_modules", "epochs", "max_steps", "batch_size", "max_seq_len", "split", "seed"])


def job_like() -> st.SearchStrategy[dict[str, Any]]:
    """Mostly-valid jobs with some fields replaced by anything: the checks past the schema get reached too."""
    base = st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["a", "b", "A", "job-1"]), TEXTS),
                                  "dataset": st.sampled_from(["./data/sql.jsonl", "./data/fuzz.jsonl",
                                                              "./data/support.jsonl"])})
    return st.builds(lambda job, extra: {**job, **extra}, base, st.dictionaries(KEYS, VALUES, max_size=3))


QUEUES = st.one_of(
    st.fixed_dictionaries({"defaults": st.just({"base_model": "./models/tiny",
                                                "training": {"max_steps": 2, "max_seq_len": 64}}),
                           "jobs": st.lists(job_like(), min_size=1, max_size=3)}),
    st.dictionaries(st.one_of(KEYS, st.sampled_from(["jobs", "defaults", "pause_after_failures"])), VALUES,
                    max_size=4),
    VALUES,
)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def assert_accepted_or_clearly_refused(code: int, err: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    assert code in (0, 1, 2), (code, err)
    lines = err.strip().splitlines()
    if code != 0:
        assert lines, "a refusal says why"
    for line in lines:
        assert line.isprintable(), repr(line)
        assert len(line) < 1500, line[:300]


@pytest.fixture
def project(workdir: Path) -> Path:
    return workdir


@FUZZ
@given(doc=QUEUES)
def test_any_queue_file_is_accepted_or_refused_in_clear_lines(project: Path, doc: Any) -> None:
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, UnicodeEncodeError):
        text = json.dumps(doc, default=str)
    (project / "data" / "fuzz.jsonl").write_text('{"prompt": "q", "completion": "a"}\n' * 12)
    queue = project / "queue.yaml"
    queue.write_text(text, encoding="utf-8", errors="surrogatepass")
    home = project / ".loraq"
    code, _, err = run_cli("--home", str(home), "submit", str(queue), "--dry-run")
    assert_accepted_or_clearly_refused(code, err)
    assert not home.exists()  # a dry run writes nothing


@FUZZ
@given(text=st.text(max_size=400))
def test_any_queue_text_is_accepted_or_refused_in_clear_lines(project: Path, text: str) -> None:
    queue = project / "queue.yaml"
    queue.write_bytes(text.encode("utf-8", "surrogatepass"))
    code, _, err = run_cli("--home", str(project / ".loraq"), "submit", str(queue), "--dry-run")
    assert_accepted_or_clearly_refused(code, err)


ROW_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXTS),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXTS, inner, max_size=3)), max_leaves=8)
ROWS = st.one_of(
    st.fixed_dictionaries({"prompt": TEXTS, "completion": TEXTS}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "bot", ""]), "content": ROW_VALUES}),
        max_size=4)}),
    st.fixed_dictionaries({"instruction": TEXTS, "output": TEXTS}, optional={"input": ROW_VALUES}),
    st.dictionaries(st.one_of(TEXTS, st.sampled_from(["text", "prompt", "messages"])), ROW_VALUES, max_size=3),
    ROW_VALUES,
)


@FUZZ
@given(rows=st.lists(ROWS, min_size=0, max_size=6), raw=st.one_of(st.none(), st.binary(max_size=60)),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_any_dataset_rows_are_accepted_or_refused_in_clear_lines(project: Path, rows: list[Any], raw: bytes | None,
                                                                 suffix: str) -> None:
    good = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(12)]
    dataset = project / "data" / f"fuzz{suffix}"
    if suffix == ".csv":
        lines = ["prompt,completion", *(f"{r['prompt']},{r['completion']}" for r in good)]
        body = ("\n".join(lines) + "\n" + "\n".join(json.dumps(r, default=str) for r in rows)).encode(
            "utf-8", "surrogatepass")
    elif suffix == ".json":
        body = json.dumps(good + rows, default=str).encode("utf-8", "surrogatepass")
    else:
        body = "".join(json.dumps(r, default=str) + "\n" for r in good + rows).encode("utf-8", "surrogatepass")
    dataset.write_bytes(body + (raw or b""))
    queue = project / "queue.yaml"
    queue.write_text("defaults: {base_model: ./models/tiny, training: {max_steps: 2, max_seq_len: 64}}\n"
                     f"jobs:\n  - {{name: fuzz, dataset: ./data/fuzz{suffix}}}\n")
    code, _, err = run_cli("--home", str(project / ".loraq"), "submit", str(queue), "--dry-run")
    assert_accepted_or_clearly_refused(code, err)
    shutil.rmtree(project / ".loraq", ignore_errors=True)
