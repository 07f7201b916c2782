"""The worker's decisions, in-process and instant: a scripted executor stands in for trainers.

The real-process tests (test_crash.py) prove the same promises end to end; these
pin down each decision on its own, without torch, in milliseconds: the watchdog,
a lease lost while the trainer finishes, a cancel noticed at the next heartbeat,
and what reconcile may and may not delete. Nothing sleeps: the worker's clock is
the test's, and the scripted executor moves it by each poll's timeout.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

import adapters
from conftest import Clock
from loraq import checkpoints, fsutil
from loraq.executors.base import Slot
from loraq.protocol import Aborted, Done, Event, Exited, Message, Progress, Started, TrainRequest, TrainResult
from loraq.queue.store import COMPLETED, NewJob, Store, WorkerId
from loraq.supervisor.worker import Worker, WorkerConfig
from loraq.workspace import Home
from test_faults import dead_pid, hf_checkpoint, resolved_spec

Item = Event | Callable[[], None]


class ScriptedExecutor:
    """One slot; each submitted job plays the events (or side effects) ``script(request)`` returns.

    Each poll moves ``clock`` on by its timeout, as a real wait would.
    """

    def __init__(self, script: Callable[[TrainRequest], Iterable[Item]], *, ready: bool = True,
                 clock: Clock | None = None) -> None:
        self.slots = [Slot(index=0, device="cpu")]
        self.script, self.ready = script, ready
        self.clock = clock or Clock()
        self.pending: list[tuple[Slot, Item]] = []
        self.requests: list[TrainRequest] = []
        self.commands: list[tuple[str, int | None]] = []

    def start(self) -> None:
        for slot in self.slots:
            if slot.handle is None:
                slot.attach(object())
            if self.ready:
                slot.became_ready()

    def submit(self, slot: Slot, request: TrainRequest) -> None:
        slot.take(request.job_id)
        self.requests.append(request)
        self.pending.extend((slot, item) for item in self.script(request))

    def poll(self, timeout: float) -> list[tuple[Slot, Message]]:
        self.clock.advance(timeout)
        if not self.pending:
            return []
        slot, item = self.pending.pop(0)
        if callable(item):  # a side effect takes a poll of its own: the worker's timers run after it
            item()
            return []
        return [(slot, Message(item, job_id=slot.job_id, epoch=None))]

    def stop_job(self, slot: Slot, *, graceful: bool) -> None:
        self.commands.append(("stop" if graceful else "abort", slot.job_id))

    def kill(self, slot: Slot) -> None:
        self.commands.append(("kill", slot.job_id))
        self.pending = [(slot, Exited(returncode=-9, reason="trainer process killed by SIGKILL", was_ready=slot.ready,
                                      log="trainer-0.log"))]
        slot.detach()

    def recycle(self, slot: Slot) -> None: ...

    def shutdown(self) -> None: ...


@pytest.fixture
def home(tmp_path: Path) -> Home:
    home = Home(tmp_path / "home")
    home.ensure()
    return home


def enqueue(home: Home, *names: str, max_retries: int = 2) -> Store:
    store = Store.open(home.db_path)
    store.enqueue([NewJob(name=n, spec=resolved_spec(n), base_key="tiny", max_retries=max_retries) for n in names],
                  settings={"retry_backoff_s": 0})
    return store


def run(home: Home, store: Store, executor: ScriptedExecutor, **config: Any) -> Worker:
    settings = {"lease_s": 30.0, "heartbeat_s": 0.02, "poll_s": 0.005, "max_jobs": None} | config
    worker = Worker(home, store, executor, config=WorkerConfig(**settings), clock=executor.clock)  # type: ignore[arg-type]
    worker.run()
    return worker


def started(steps: int = 3, resume_from: str | None = None) -> Started:
    return Started(max_steps=steps, base_eval_loss=2.0, base_reused=False, n_train=10, n_eval=2, resume_from=resume_from)


def trains(steps: int = 3) -> Callable[[TrainRequest], list[Item]]:
    """A trainer that trains ``steps`` steps and leaves a valid adapter in staging."""

    def script(request: TrainRequest) -> list[Item]:
        staging = Path(request.staging_dir)
        return [started(steps, request.resume_from),
                *(Progress(step=s, max_steps=steps, metrics={"loss": 2.0 - s / 10}) for s in range(1, steps + 1)),
                lambda: adapters.synthetic(staging),
                Done(result=TrainResult(staging=str(staging), steps=steps, max_steps=steps, train_loss=1.5,
                                        eval_loss=1.0, base_eval_loss=2.0, n_train=10, n_eval=2))]

    return script


def test_a_job_runs_through_and_is_published(home: Home) -> None:
    store = enqueue(home, "plain")
    run(home, store, ScriptedExecutor(trains()), max_jobs=1)
    assert store.job("plain").status == COMPLETED
    assert (home.adapter_dir("plain") / "loraq-manifest.json").is_file()


def test_a_stalled_trainer_is_killed_and_its_job_retried(home: Home) -> None:
    store = enqueue(home, "stuck")
    calls = []

    def script(request: TrainRequest) -> list[Item]:
        calls.append(request.attempt)
        if len(calls) == 1:
            return [started()]  # then silence
        return trains()(request)

    executor = ScriptedExecutor(script)
    run(home, store, executor, stall_s=0.2)
    assert ("kill", 1) in executor.commands
    tries = store.attempts("stuck")
    assert [(a.outcome, a.error_kind, a.retryable) for a in tries] == [("retry", "stalled", 1), ("completed", None, None)]
    assert "no progress for 0 s" in tries[0].reason
    assert store.job("stuck").status == COMPLETED


def test_a_trainer_that_is_still_starting_is_not_taken_for_stalled(home: Home) -> None:
    store = enqueue(home, "slow-start")
    clock = Clock()
    # Importing torch on a busy machine: far past stall_s without a word, within the startup grace.
    executor = ScriptedExecutor(lambda request: [lambda: clock.advance(300.0), *trains()(request)], ready=False,
                                clock=clock)
    run(home, store, executor, stall_s=0.05)
    assert not [c for c in executor.commands if c[0] == "kill"]
    assert store.job("slow-start").status == COMPLETED


def test_a_worker_that_lost_its_lease_publishes_nothing_when_its_trainer_finishes(home: Home) -> None:
    store = enqueue(home, "taken")
    other = Store.open(home.db_path)

    def take_over() -> None:  # meanwhile the lease ran out and another worker claimed the job
        other.conn.execute("UPDATE jobs SET lease_expires = 0")
        assert other.expire_leases() == [1]
        other.conn.execute("UPDATE jobs SET not_before = 0")
        assert other.claim(WorkerId("elsewhere", 1, "b"), lease_s=600) is not None

    executor = ScriptedExecutor(lambda request: [*trains()(request)[:2], take_over, *trains()(request)[2:]])
    worker = run(home, store, executor, max_jobs=1, heartbeat_s=3600)
    assert ("abort", 1) in executor.commands  # the refused progress stopped the trainer at once
    assert not home.adapter_dir("taken").exists()
    assert not (home.attempt_dir(1, 1) / "staging").exists()
    assert worker.summary.completed == []
    job = store.job("taken")
    assert (job.status, job.attempts) == ("running", 2)  # the other worker's, untouched
    assert [e.to_state for e in store.events(1)].count(COMPLETED) == 0
    other.close()


def test_a_cancel_is_noticed_at_the_next_heartbeat_and_the_trainer_aborted(home: Home) -> None:
    store = enqueue(home, "unwanted", "next")
    operator = Store.open(home.db_path)

    def script(request: TrainRequest) -> list[Item]:
        if request.job.spec["name"] == "unwanted":
            return [started(), lambda: operator.cancel("unwanted"), lambda: executor.clock.advance(0.1), Aborted()]
        return trains()(request)

    executor = ScriptedExecutor(script)
    run(home, store, executor)
    assert ("abort", 1) in executor.commands
    assert store.job("unwanted").status == "cancelled" and store.job("next").status == COMPLETED
    assert [a.outcome for a in store.attempts("unwanted")] == ["cancelled"]
    operator.close()


def test_a_retry_resumes_from_its_own_copy_of_the_newest_checkpoint(home: Home) -> None:
    store = enqueue(home, "resumed")
    old = hf_checkpoint(home.attempt_dir(1, 1) / "checkpoints" / "checkpoint-4", 4, seed=4)
    checkpoints.mark_complete(old, step=4)
    claim = store.claim(WorkerId(socket.gethostname(), dead_pid(), "dead"), lease_s=600)  # a killed worker's
    executor = ScriptedExecutor(trains())
    run(home, store, executor, max_jobs=1)
    (request,) = executor.requests
    assert request.attempt == 2 and claim.attempt == 1
    assert request.resume_from == str(home.attempt_dir(1, 2) / "resume" / "checkpoint-4")
    assert store.attempts("resumed")[1].resumed_from_step == 4
    assert store.attempts("resumed")[0].error_kind == "lost"  # reclaimed at once: same host, pid gone
    assert not list(home.jobs_dir.glob("*/attempt-*/resume")) and not list(home.jobs_dir.glob("*/attempt-*/checkpoints"))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_full_disk_while_publishing_fails_the_attempt_clearly_and_the_retry_publishes(home: Home, err: int) -> None:
    store = enqueue(home, "unlucky")
    state = {"attempt": 0}

    def script(request: TrainRequest) -> list[Item]:
        state["attempt"] = request.attempt
        return trains()(request)

    class FullDiskOnFirstAttempt(fsutil.FileOps):
        def rename(self, src: Path, dst: Path) -> None:
            if state["attempt"] == 1 and dst.parent == home.adapters_dir:
                raise OSError(err, os.strerror(err))
            super().rename(src, dst)

    with fsutil.use_ops(FullDiskOnFirstAttempt()):
        run(home, store, ScriptedExecutor(script))
        if err == errno.ENOSPC:
            # A full disk is the machine's fault: the attempt is not counted and the queue pauses,
            # rather than spending the job's attempts; 'loraq resume' continues.
            (first,) = store.attempts("unlucky")
            assert (first.outcome, first.error_kind, first.counted) == ("retry", "io", 0)
            job, queue = store.job("unlucky"), store.queue_state()
            assert (job.status, job.attempts) == ("pending", 0)
            assert queue.paused and "No space left on device" in queue.pause_reason
            store.resume()
            run(home, store, ScriptedExecutor(script))
    first, second = store.attempts("unlucky")
    assert (first.outcome, first.error_kind, first.retryable) == ("retry", "io", 1)
    assert first.reason.startswith("cannot publish: ") and os.strerror(err) in first.reason
    assert second.outcome == "completed" and store.job("unlucky").status == COMPLETED
    assert sorted(p.name for p in home.adapter_dir("unlucky").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "inspection.json", "loraq-manifest.json"]


def test_reconcile_cleans_only_attempts_the_store_has_ended(home: Home) -> None:
    store = enqueue(home, "mixed", max_retries=5)
    dead = WorkerId(socket.gethostname(), dead_pid(), "dead")
    first = store.claim(dead, lease_s=600)
    store.fail(1, first.epoch, kind="died", reason="killed", retryable=True)
    store.conn.execute("UPDATE jobs SET not_before = 0")
    alive = WorkerId("other-host", 1, "alive")
    second = store.claim(alive, lease_s=600)  # a live worker elsewhere, mid-attempt
    for claim in (first, second):
        attempt_dir = home.attempt_dir(1, claim.attempt)
        adapters.synthetic(attempt_dir / "staging")
        hf_checkpoint(attempt_dir / "resume" / "checkpoint-2", 2, seed=2)
    Worker(home, store, ScriptedExecutor(trains())).reconcile()  # type: ignore[arg-type]
    assert not (home.attempt_dir(1, 1) / "staging").exists() and not (home.attempt_dir(1, 1) / "resume").exists()
    assert (home.attempt_dir(1, 2) / "staging").is_dir() and (home.attempt_dir(1, 2) / "resume").is_dir()
    assert store.job("mixed").status == "running"  # another host's lease: only its expiry frees it


def test_a_worker_runs_outside_the_main_thread(tmp_path) -> None:
    """An application may drive a worker from a thread; signal handlers are then its owner's job."""
    import threading

    from loraq.executors.local import LocalExecutor
    from loraq.queue.store import Store
    from loraq.supervisor.worker import Worker, WorkerConfig
    from loraq.workspace import Home

    home = Home(tmp_path / "home")
    home.ensure()
    outcome: dict = {}

    def work() -> None:
        try:
            with Store.open(home.db_path) as store:  # a connection belongs to its thread
                outcome["summary"] = Worker(home, store, LocalExecutor([], log_dir=tmp_path / "logs"),
                                            config=WorkerConfig(poll_s=0.01)).run()
        except BaseException as exc:  # noqa: BLE001 - the assertion below shows it
            outcome["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"].completed == []
