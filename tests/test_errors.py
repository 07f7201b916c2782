"""Errors classified honestly: the kinds a failure can have, and what loraq does with one it cannot name.

The policy itself (retried once at most; the same error twice fails the job; three
jobs in a row pause the queue) is the store's, proved instantly in test_store.py.
Here a real trainer process meets a real bug, and ``loraq run`` deals with it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import LORAQ, TINY_DEFAULTS, write_queue
from loraq.errors import FailureKind, LoraqError, classify, describe, raised_at
from loraq.queue.store import Store
from loraq.workspace import Home


@pytest.mark.parametrize(("error", "kind"), [
    (RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed"), FailureKind.IO),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"), FailureKind.IO),
    (OSError(5, "Input/output error"), FailureKind.IO),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), FailureKind.CUDA),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), FailureKind.OOM),
])
def test_faults_of_the_machine_are_classified_for_retry(error: BaseException, kind: FailureKind) -> None:
    assert classify(error) is kind and kind.retryable


@pytest.mark.parametrize("error", [
    ValueError("something else"),
    RuntimeError("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"),
    IndexError("index 28311552 is out of bounds for dimension 0 with size 28311552"),
])
def test_an_exception_loraq_does_not_recognise_is_internal(error: BaseException) -> None:
    assert classify(error) is FailureKind.INTERNAL


def test_the_place_a_bug_was_raised_is_the_innermost_frame_of_loraq() -> None:
    from loraq.protocol import decode

    try:
        decode(dict, {})  # a type the codec has no decoder for: raised inside loraq.protocol
    except LoraqError as exc:
        where = raised_at(exc)
    assert where is not None and where.startswith("loraq/protocol.py:")
    assert raised_at(ValueError("raised nowhere")) is None
    assert describe(KeyError("x")) == "KeyError: 'x'"


def test_every_kind_says_whether_it_is_retried() -> None:
    machine = {FailureKind.DIED, FailureKind.OOM, FailureKind.CUDA, FailureKind.IO, FailureKind.STALLED,
               FailureKind.LOST, FailureKind.INTERRUPTED}
    assert {k for k in FailureKind if k.retryable} == machine | {FailureKind.INTERNAL}


BUG = "LORAQ-TEST-BUG-7f3a"


@pytest.mark.slow
def test_a_bug_in_the_trainer_is_retried_once_then_fails_and_three_such_jobs_pause_the_queue(workdir: Path) -> None:
    """A real trainer hits an exception loraq does not recognise (injected: see train/faults.py)."""
    rows = [json.loads(line) for line in (workdir / "data" / "sql.jsonl").read_text().splitlines()]
    rows[0]["completion"] += f" {BUG}"
    (workdir / "data" / "buggy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    jobs = "".join(f"  - name: buggy-{i}\n    dataset: {{path: ./data/buggy.jsonl, format: prompt_completion}}\n"
                   for i in range(4))
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n" + jobs)
    home = workdir / ".loraq"
    env = os.environ | {"LORAQ_TEST_BUG_TRIGGER": BUG, "OMP_NUM_THREADS": "1"}
    subprocess.run([LORAQ, "--home", str(home), "submit", str(queue)], check=True, capture_output=True, env=env)
    ran = subprocess.run([LORAQ, "--home", str(home), "run", "--devices", "cpu"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert ran.returncode == 1, ran.stdout + ran.stderr

    source = (Path(__file__).parents[1] / "src" / "loraq" / "train" / "faults.py").read_text().splitlines()
    line = next(i for i, text in enumerate(source, 1) if 'raise RuntimeError(f"injected bug' in text)
    error = f"RuntimeError: injected bug: a row holds '{BUG}' (raised at loraq/train/faults.py:{line})"
    with Store.open(Home(home).db_path, create=False) as store:
        for name in ("buggy-0", "buggy-1", "buggy-2"):
            job = store.job(name)
            first, second = store.attempts(name)
            assert (job.status, job.error_kind) == ("failed", "internal"), job
            assert job.error == f"{error}; the same error as attempt 1, so it is not retried again"
            assert (first.outcome, first.error_kind, first.retryable, first.reason) == ("retry", "internal", 1, error)
            assert (second.outcome, second.retryable) == ("failed", 0)  # two attempts of the three it had (max_retries 2)
            assert "Traceback" in second.traceback and "injected_bug" in second.traceback
        assert store.job("buggy-3").status == "pending" and store.job("buggy-3").attempts == 0
        state = store.queue_state()
    assert state.paused and state.pause_reason.startswith("3 jobs in a row failed with the same internal error")
    assert f"last: buggy-2: {error}" in state.pause_reason
    assert "queue paused: 3 jobs in a row failed with the same internal error" in ran.stdout


def test_every_error_class_lives_in_errors_under_loraq_error() -> None:
    """One place for errors, one base class for the CLI to map to exit codes (STYLE.md rule 6)."""
    import ast
    import inspect

    import loraq
    from loraq import errors

    package = Path(loraq.__file__).parent
    elsewhere = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "errors.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and any(
                    isinstance(base, ast.Name) and base.id.endswith(("Error", "Exception")) for base in node.bases):
                elsewhere.append(f"{path.relative_to(package)}: {node.name}")
    assert not elsewhere, elsewhere
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == errors.__name__]
    assert {c.__name__ for c in classes} >= {"LeaseLost", "PublishConflict", "TrainerStartError", "ProtocolError",
                                             "TemplateError", "TrainingError"}
    assert all(issubclass(c, LoraqError) for c in classes), [c for c in classes if not issubclass(c, LoraqError)]
    assert {c.__name__ for c in classes} <= set(loraq.__all__)  # and the package exports every one
