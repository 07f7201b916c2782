"""A disk that fills in the middle of a run, for real: the home on a 2 MB tmpfs, filled while a job runs.

The worker runs in a child process inside a private mount namespace (``unshare``),
with a scripted executor (no torch): SQLite meets a real ``database or disk is
full``, the filesystem a real ENOSPC. The worker must keep running, retry its
writes with back-off, pause the queue with the reason, and count no attempt for the
machine's fault; once the disk is freed, the job ends exactly once. (Without user
namespaces the test is skipped; test_worker.py's fault-injected ENOSPC still runs.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CHILD = r'''
import json, os, sys, threading
from pathlib import Path

sys.path.insert(0, sys.argv[3])
import adapters
from test_faults import resolved_spec
from test_worker import ScriptedExecutor, started, trains
from loraq.errors import FailureKind, StoreFaultError
from loraq.protocol import Failed
from loraq.queue.store import NewJob, Store
from loraq.supervisor.worker import Worker, WorkerConfig
from loraq.workspace import Home

mnt, variant = Path(sys.argv[1]), sys.argv[2]
home = Home(mnt / "home")
home.ensure()
store = Store.open(home.db_path)
store.enqueue([NewJob(name="full", spec=resolved_spec("full"), base_key="tiny")], settings={"retry_backoff_s": 0})
filler = mnt / "filler"


def fill():
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    for size in (1 << 16, 512):
        try:
            while True:
                os.write(fd, b"\0" * size)
        except OSError:
            pass
    os.close(fd)
    try:  # the disk is full now, for SQLite too
        store.pause("probe")
    except StoreFaultError:
        pass
    else:
        raise SystemExit("the store could still be written with the disk full")
    threading.Timer(2.5, filler.unlink).start()  # the operator frees space a little later


def script(request):
    staging = Path(request.staging_dir)
    if request.attempt > 1:
        return trains()(request)
    if variant == "store":  # the disk fills after the adapter is staged: progress, heartbeats, publish meet it
        done = trains()(request)
        return [*done[:2], lambda: adapters.synthetic(staging), fill, *done[2:4], done[-1]]
    # the trainer itself meets the full disk (saving a checkpoint) and reports it
    return [started(), fill, Failed(failure=FailureKind.IO,
                                    message="RuntimeError: [Errno 28] No space left on device: checkpoint-2/optimizer.pt")]


seen = []
executor = ScriptedExecutor(script)
worker = Worker(home, store, executor, observer=lambda event: seen.append(str(event.kind)), clock=executor.clock,
                config=WorkerConfig(lease_s=60, heartbeat_s=0.05, poll_s=0.005))
summary = worker.run()
job = store.job("full")
attempts = store.attempts("full")
state = store.queue_state()
print(json.dumps({
    "status": job.status, "attempts": job.attempts, "paused": state.paused, "reason": state.pause_reason,
    "tries": [[a.outcome, a.error_kind, a.counted] for a in attempts],
    "completions": [e.to_state for e in store.events(job.id)].count("completed"),
    "seen": sorted(set(seen)), "integrity": store.integrity_check(),
    "adapter": sorted(p.name for p in home.adapter_dir("full").iterdir()) if home.adapter_dir("full").exists() else [],
}))
'''


def _in_tmpfs(mnt: Path, variant: str) -> dict:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare for a size-limited tmpfs")
    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("user namespaces are not allowed here")
    mnt.mkdir()
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
               'mount -t tmpfs -o size=2m tmpfs "$0" && exec "$@"', str(mnt),
               sys.executable, "-c", CHILD, str(mnt), variant, str(TESTS)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_disk_that_fills_under_the_store_pauses_the_queue_and_the_job_completes_once(tmp_path: Path) -> None:
    out = _in_tmpfs(tmp_path / "mnt", "store")
    assert "fault" in out["seen"] and "fault_cleared" in out["seen"]  # it kept running through the fault
    assert (out["status"], out["attempts"], out["completions"]) == ("completed", 1, 1), out
    assert out["tries"] == [["completed", None, 1]]
    assert out["paused"] and "cannot write the state database" in out["reason"]
    assert "loraq-manifest.json" in out["adapter"] and out["integrity"] == "ok"


def test_a_trainer_that_meets_a_full_disk_uses_no_attempt(tmp_path: Path) -> None:
    out = _in_tmpfs(tmp_path / "mnt", "trainer")
    assert (out["status"], out["attempts"], out["completions"]) == ("pending", 0, 0), out
    assert out["tries"] == [["retry", "io", 0]]  # ended, not counted
    assert out["paused"] and "No space left on device" in out["reason"] and "loraq resume" in out["reason"]
    assert out["integrity"] == "ok"
