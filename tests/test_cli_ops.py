"""Operating a queue through the command line: cancel, retry, pause, resume, logs, a damaged database.

As an operator would: real ``loraq`` processes, real trainers where a job has to
run, and the exit codes and messages the command-line contract promises.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import LORAQ
from crashutil import (
    ENV,
    STARTUP_S,
    Worker,
    attempts,
    completions,
    integrity,
    jobs,
    loraq,
    make_workdir,
    queue_file,
    wait_for,
    wait_gone,
)

QUICK = "max_steps: 6, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 3, logging_steps: 1, seed: 3"
LONG = "max_steps: 2000, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 50, eval_steps: 2000, logging_steps: 1, seed: 3"


@pytest.fixture
def work(tmp_path: Path, tiny_model: Path, demo_datasets: dict[str, Path]) -> Path:
    return make_workdir(tmp_path / "project", tiny_model, demo_datasets)


# ---------------------------------------------------------------- a damaged loraq.db


def damage_pages(db: Path) -> None:
    """Keep the header page (the file still says it is SQLite), overwrite every other page."""
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    for offset in range(page, len(data)):
        data[offset] = (offset * 151 + 7) % 256
    db.write_bytes(bytes(data))


def test_a_garbage_database_is_refused_with_what_to_do_and_left_untouched(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    db = home / "loraq.db"
    garbage = b"not a database, but a file someone copied over it\n" * 400
    db.write_bytes(garbage)
    for args in (["status"], ["status", "--json"], ["run", "--devices", "cpu"], ["show", "x"], ["cancel", "x"],
                 ["retry", "x"], ["pause"], ["resume"], ["logs", "x"], ["report"]):
        result = loraq(home, *args, check=False)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "damaged" in result.stderr and f"mv {db} {db}.damaged" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert db.read_bytes() == garbage, args
    assert sorted(p.name for p in home.iterdir()) == ["loraq.db"]


def test_damaged_pages_stop_run_and_every_command_without_a_traceback(work: Path) -> None:
    home = work / ".loraq"
    loraq(home, "submit", str(queue_file(work, ["a", "b"], training=QUICK)))
    db = home / "loraq.db"
    damage_pages(db)
    damaged = db.read_bytes()
    for args in (["run", "--devices", "cpu"], ["status"], ["show", "a"], ["cancel", "a"], ["report", "--format", "json"]):
        result = loraq(home, *args, check=False)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "damaged" in result.stderr and "Move it aside" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
    assert db.read_bytes() == damaged


# ---------------------------------------------------------------- pause, pause_after_failures, resume


def test_failures_pause_the_queue_status_says_why_and_resume_continues(work: Path, tmp_path: Path) -> None:
    home = work / ".loraq"
    queue = queue_file(work, ["good"], training=QUICK, extra="pause_after_failures: 2")
    text = queue.read_text().replace("jobs:\n", """jobs:
  - name: broken-1
    dataset: ./data/sql.jsonl
    lora: {target_modules: [no_such_proj]}
  - name: broken-2
    dataset: ./data/sql.jsonl
    lora: {target_modules: [no_such_proj]}
""")
    queue.write_text(text)
    loraq(home, "submit", str(queue))
    ran = Worker(home, log=tmp_path / "run1.log")
    assert ran.wait() == 1, ran.output()
    assert "queue paused: 2 attempts failed in a row" in ran.output()

    shown = loraq(home, "status").stdout
    assert "queue paused: 2 attempts failed in a row (pause_after_failures: 2)" in shown
    assert "loraq resume" in shown
    status = json.loads(loraq(home, "status", "--json").stdout)
    assert status["queue"]["paused"] is True and "pause_after_failures: 2" in status["queue"]["reason"]
    by_name = {j["name"]: j for j in status["jobs"]}
    assert [by_name[n]["status"] for n in ("broken-1", "broken-2", "good")] == ["failed", "failed", "pending"]
    assert by_name["broken-1"]["error_kind"] == "spec" and "no_such_proj" in by_name["broken-1"]["error"]
    details = loraq(home, "show", "broken-1").stdout
    assert "#1 failed, " in details and "spec: lora:" in details and "(permanent)" in details

    assert loraq(home, "resume").stdout.strip() == "queue resumed"
    assert "queue" not in json.loads(loraq(home, "status", "--json").stdout)
    ran = Worker(home, log=tmp_path / "run2.log")
    assert ran.wait() == 1, ran.output()  # the two broken jobs stay failed
    assert jobs(home)["good"]["status"] == "completed"

    # The operator's own pause, with a reason, and the verbs' exit codes.
    assert loraq(home, "pause", "--reason", "disk maintenance").returncode == 0
    assert "queue paused: disk maintenance" in loraq(home, "status").stdout
    retried = loraq(home, "retry", "broken-1")
    assert retried.stdout.strip() == "broken-1: pending"
    refused = loraq(home, "retry", "good", check=False)
    assert refused.returncode == 1 and "good" in refused.stderr and "completed" in refused.stderr
    assert loraq(home, "cancel", "nope", check=False).returncode == 1
    assert loraq(home, "cancel", "broken-1").stdout.strip() == "broken-1: cancelled"
    loraq(home, "resume")
    assert integrity(home) == "ok"


# ---------------------------------------------------------------- cancel a running job, follow its log


def test_cancel_stops_a_running_trainer_and_the_worker_moves_on_while_logs_follow(work: Path, tmp_path: Path) -> None:
    home = work / ".loraq"
    queue = queue_file(work, ["endless"], training=LONG)
    queue.write_text(queue.read_text() + "  - name: after\n    dataset: ./data/sql.jsonl\n    priority: -1\n"
                     f"    training: {{{QUICK}}}\n")
    loraq(home, "submit", str(queue))
    # Follow the log of a job that has not started yet: it waits for the first line.
    follow = subprocess.Popen([LORAQ, "--home", str(home), "logs", "endless", "-f"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV)
    worker = Worker(home, log=tmp_path / "run.log")
    wait_for(lambda: (jobs(home)["endless"]["progress_step"] or 0) >= 5, timeout=STARTUP_S, what="'endless' to train")
    (trainer,) = worker.trainers()
    cancelled = loraq(home, "cancel", "endless")
    assert cancelled.stdout.strip() == "endless: cancelled"
    # The worker sees the cancel at its next heartbeat, aborts the trainer, and runs the next job.
    assert worker.wait() == 0, worker.output()
    wait_gone([trainer.pid])
    out, err = follow.communicate(timeout=60)  # it ends by itself once the job has ended
    assert follow.returncode == 0, err
    assert "job endless attempt 1:" in out and "step 5/2000" in out

    state = jobs(home)
    assert state["endless"]["status"] == "cancelled" and (state["endless"]["progress_step"] or 0) < 2000
    assert state["after"]["status"] == "completed"
    (attempt,) = attempts(home, "endless")
    assert (attempt["outcome"], attempt["reason"]) == ("cancelled", "cancelled")
    assert completions(home) == {"endless": 0, "after": 1}
    assert not (home / "adapters" / "endless").exists()
    assert "lost" in worker.output()  # it reports why it stopped the job
    # Finished jobs cannot be cancelled; the log of a finished job prints and returns.
    refused = loraq(home, "cancel", "endless", "after", check=False)
    assert refused.returncode == 1 and "endless" in refused.stderr and "after" in refused.stderr
    assert "aborted on request" in loraq(home, "logs", "endless").stdout
    assert "done:" in loraq(home, "logs", "after", "-f").stdout
    missing = loraq(home, "logs", "endless", "--attempt", "7", check=False)
    assert missing.returncode == 1 and "no log for attempt 7" in missing.stderr
