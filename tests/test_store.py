"""The store: the lifecycle table, claims, leases and fencing, retries, pause."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest

from loraq.errors import CorruptStoreError, LeaseLost, NotFoundError, StoreError, TransitionError
from loraq.queue.migrations import MIGRATIONS, statements
from loraq.queue.store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    STATES,
    TRANSITIONS,
    NewJob,
    Store,
    WorkerId,
)

W1 = WorkerId("host-a", 101, "w1")
W2 = WorkerId("host-b", 202, "w2")


def new_job(name: str = "a", *, priority: int = 0, base: str = "base-1", max_retries: int = 2) -> NewJob:
    return NewJob(name=name, spec={"name": name}, base_key=base, priority=priority, max_retries=max_retries)


@pytest.fixture
def store(tmp_path: Path, clock) -> Store:
    s = Store.open(tmp_path / "loraq.db", clock=clock)
    yield s
    s.close()


def job_in(store: Store, state: str, name: str) -> int:
    """A job brought to ``state`` through the public verbs, as a user's queue would."""
    (job_id,) = store.enqueue([new_job(name)])
    if state == PENDING:
        return job_id
    if state == CANCELLED:
        store.cancel(job_id)
        return job_id
    claim = store.claim(W1, lease_s=30)
    assert claim is not None and claim.job.id == job_id
    if state == COMPLETED:
        store.complete(job_id, claim.epoch, result={})
    elif state == FAILED:
        store.fail(job_id, claim.epoch, kind="data", reason="bad row", retryable=False)
    return job_id


@pytest.mark.parametrize(("source", "target"), list(itertools.product(STATES, STATES)))
def test_every_transition_is_allowed_exactly_when_the_table_says(store: Store, source: str, target: str) -> None:
    job_id = job_in(store, source, f"{source}-{target}")
    assert store.job(job_id).status == source
    before = len(store.events(job_id))
    with store.transaction() as conn:
        if (source, target) in TRANSITIONS:
            store._transition(conn, job_id, target, reason="test")
        else:
            with pytest.raises(TransitionError):
                store._transition(conn, job_id, target, reason="test")
    job = store.job(job_id)
    events = store.events(job_id)
    if (source, target) in TRANSITIONS:
        assert job.status == target
        assert len(events) == before + 1
        assert (events[-1].from_state, events[-1].to_state) == (source, target)
    else:
        assert job.status == source
        assert len(events) == before


def test_the_table_is_the_documented_lifecycle() -> None:
    assert TRANSITIONS == {
        (PENDING, RUNNING), (RUNNING, COMPLETED), (RUNNING, FAILED), (RUNNING, PENDING),
        (PENDING, CANCELLED), (RUNNING, CANCELLED), (FAILED, PENDING), (CANCELLED, PENDING),
        (PENDING, FAILED),  # the job it waits on (after:) failed or was cancelled
    }


@pytest.mark.parametrize("state", [COMPLETED, FAILED, CANCELLED])
def test_cancel_refuses_finished_jobs(store: Store, state: str) -> None:
    job_id = job_in(store, state, "x")
    with pytest.raises(TransitionError):
        store.cancel(job_id)
    assert store.job(job_id).status == state


@pytest.mark.parametrize("state", [PENDING, RUNNING, COMPLETED])
def test_retry_refuses_jobs_that_did_not_end_badly(store: Store, state: str) -> None:
    job_id = job_in(store, state, "x")
    with pytest.raises(TransitionError):
        store.retry(job_id)


def test_retry_gives_fresh_attempts(store: Store) -> None:
    job_id = job_in(store, FAILED, "x")
    job = store.retry("x")
    assert (job.status, job.attempts, job.error) == (PENDING, 0, None)
    assert store.claim(W1, lease_s=30).job.id == job_id


def test_enqueue_is_all_or_nothing(store: Store) -> None:
    store.enqueue([new_job("a")])
    with pytest.raises(TransitionError, match="already in this home: a"):
        store.enqueue([new_job("b"), new_job("a")])
    assert [j.name for j in store.jobs()] == ["a"]


def test_claim_takes_highest_priority_then_hot_base_then_oldest(store: Store) -> None:
    store.enqueue([new_job("old", base="x"), new_job("same-base", base="hot"), new_job("urgent", priority=5, base="x")])
    assert store.claim(W1, lease_s=30, prefer_base="hot").job.name == "urgent"
    assert store.claim(W1, lease_s=30, prefer_base="hot").job.name == "same-base"
    assert store.claim(W1, lease_s=30, prefer_base="hot").job.name == "old"
    assert store.claim(W1, lease_s=30) is None


def test_each_claim_raises_the_epoch_and_numbers_the_attempt(store: Store, clock) -> None:
    store.enqueue([new_job("a", max_retries=5)])
    epochs = []
    for expected_attempt in (1, 2, 3):
        claim = store.claim(W1, lease_s=30)
        assert claim.attempt == expected_attempt
        epochs.append(claim.epoch)
        store.fail(claim.job.id, claim.epoch, kind="died", reason="killed", retryable=True)
        clock.advance(10_000)
    assert epochs == sorted(set(epochs))


def test_a_stale_epoch_cannot_heartbeat_progress_or_complete(store: Store, clock) -> None:
    store.enqueue([new_job("a")])
    first = store.claim(W1, lease_s=30)
    clock.advance(31)
    assert store.expire_leases() == [first.job.id]
    clock.advance(10_000)  # past the backoff
    second = store.claim(W2, lease_s=30)
    assert second.epoch > first.epoch
    assert not store.heartbeat(first.job.id, first.epoch, lease_s=30)
    assert not store.record_progress(first.job.id, first.epoch, first.attempt, step=5, metrics={"loss": 1.0})
    with pytest.raises(LeaseLost):
        store.complete(first.job.id, first.epoch, result={})
    with pytest.raises(LeaseLost):
        store.fail(first.job.id, first.epoch, kind="x", reason="late", retryable=True)
    assert store.heartbeat(second.job.id, second.epoch, lease_s=30)
    store.complete(second.job.id, second.epoch, result={"adapter": "x"})
    completions = [e for e in store.events(second.job.id) if e.to_state == COMPLETED]
    assert len(completions) == 1
    assert store.metrics(first.job.id) == []


def test_expired_lease_counts_the_attempt_and_backs_off(store: Store, clock) -> None:
    store.enqueue([new_job("a", max_retries=1)])
    claim = store.claim(W1, lease_s=30)
    clock.advance(29)
    assert store.expire_leases() == []
    clock.advance(2)
    assert store.expire_leases() == [claim.job.id]
    job = store.job("a")
    assert (job.status, job.attempts, job.error_kind) == (PENDING, 1, "lost")
    assert store.claim(W1, lease_s=30) is None  # backing off
    clock.advance(store.queue_state().retry_backoff_s)
    second = store.claim(W1, lease_s=30)
    clock.advance(31)
    store.expire_leases()
    assert store.job("a").status == FAILED  # no attempts left
    assert [a.outcome for a in store.attempts("a")] == ["retry", "failed"]
    assert second.attempt == 2


def test_backoff_doubles_each_attempt(store: Store, clock) -> None:
    store.enqueue([new_job("a", max_retries=3)], settings={"retry_backoff_s": 5.0})
    waits = []
    for _ in range(3):
        claim = store.claim(W1, lease_s=30)
        store.fail(claim.job.id, claim.epoch, kind="oom", reason="out of memory", retryable=True)
        waits.append(store.job("a").not_before - clock())
        clock.advance(10_000)
    assert waits == [5.0, 10.0, 20.0]


def test_permanent_failure_is_not_retried(store: Store) -> None:
    store.enqueue([new_job("a", max_retries=2)])
    claim = store.claim(W1, lease_s=30)
    assert store.fail(claim.job.id, claim.epoch, kind="data", reason="row 3 is not JSON", retryable=False) == FAILED
    job = store.job("a")
    assert (job.status, job.error_kind, job.error) == (FAILED, "data", "row 3 is not JSON")


def test_reclaim_dead_worker_at_once_on_the_same_host(store: Store) -> None:
    store.enqueue([new_job("a"), new_job("b")])
    dead = WorkerId("here", 999_999, "dead")
    alive = WorkerId("here", 1, "alive")
    elsewhere = WorkerId("there", 999_999, "far")
    store.claim(dead, lease_s=3600)
    store.claim(elsewhere, lease_s=3600)
    assert store.reclaim_dead("here", lambda pid: pid == alive.pid) == [1]
    assert store.job("a").status == PENDING
    assert store.job("b").status == RUNNING  # another host: only its lease can free it


def test_graceful_stop_does_not_use_an_attempt(store: Store) -> None:
    store.enqueue([new_job("a")])
    claim = store.claim(W1, lease_s=30)
    store.requeue_stopped(claim.job.id, claim.epoch)
    job = store.job("a")
    assert (job.status, job.attempts) == (PENDING, 0)
    assert store.attempts("a")[0].outcome == "stopped"
    assert store.claim(W1, lease_s=30).attempt == 2  # a new folder, the same budget


def test_cancel_running_job_makes_its_heartbeat_fail(store: Store) -> None:
    store.enqueue([new_job("a")])
    claim = store.claim(W1, lease_s=30)
    store.cancel("a")
    assert not store.heartbeat(claim.job.id, claim.epoch, lease_s=30)
    assert store.job("a").status == CANCELLED


def test_pause_after_failures_pauses_and_resume_continues(store: Store) -> None:
    store.enqueue([new_job(n, max_retries=0) for n in "abcd"], settings={"pause_after_failures": 2})
    for _ in range(2):
        claim = store.claim(W1, lease_s=30)
        store.fail(claim.job.id, claim.epoch, kind="inspection", reason="lora_B all zero", retryable=False)
    state = store.queue_state()
    assert state.paused and "2 attempts failed in a row" in state.pause_reason
    assert store.claim(W1, lease_s=30) is None
    store.resume()
    assert store.claim(W1, lease_s=30).job.name == "c"


def test_a_completion_resets_the_failure_count(store: Store) -> None:
    store.enqueue([new_job(n, max_retries=0) for n in "abc"], settings={"pause_after_failures": 2})
    claim = store.claim(W1, lease_s=30)
    store.fail(claim.job.id, claim.epoch, kind="x", reason="x", retryable=False)
    claim = store.claim(W1, lease_s=30)
    store.complete(claim.job.id, claim.epoch, result={})
    claim = store.claim(W1, lease_s=30)
    store.fail(claim.job.id, claim.epoch, kind="x", reason="x", retryable=False)
    assert not store.queue_state().paused


def test_unknown_job_is_a_clear_error(store: Store) -> None:
    with pytest.raises(NotFoundError, match="no job named 'nope'"):
        store.job("nope")


def test_wal_and_integrity(store: Store) -> None:
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.integrity_check() == "ok"


def test_a_damaged_database_is_refused_not_recreated(tmp_path: Path) -> None:
    db = tmp_path / "loraq.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CorruptStoreError, match="damaged.*Move it aside"):
        Store.open(db, check=True)
    assert db.read_bytes() == b"this is not a database" * 100


def test_a_database_from_a_newer_loraq_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "loraq.db"
    Store.open(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(Exception, match="newer loraq"):
        Store.open(db)


# ---------------------------------------------------------------- readers that follow the queue live


def test_seq_moves_on_every_visible_change_and_not_on_heartbeats(store: Store) -> None:
    (a, b) = store.enqueue([new_job("a"), new_job("b")])
    assert (store.job(a).seq, store.job(b).seq) == (1, 2)
    claim = store.claim(W1, lease_s=60)
    assert claim is not None and store.job(a).seq == 3
    store.heartbeat(a, claim.epoch, lease_s=60)
    assert store.job(a).seq == 3  # a heartbeat shows nothing new
    store.record_progress(a, claim.epoch, claim.attempt, step=1, metrics={"loss": 1.0})
    store.cancel(b)
    assert store.job(a).seq == 4 and store.job(b).seq == 5 and store.max_seq() == 5
    assert [r["name"] for r in store.changed_since(3)] == ["a", "b"]
    assert store.changed_since(5) == []


def test_a_reader_opens_read_only_and_never_creates_the_file(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        Store.open(tmp_path / "none.db", readonly=True)
    assert not (tmp_path / "none.db").exists()
    store.enqueue([new_job("a")])
    with Store.open(store.path, readonly=True) as reader:
        assert reader.job("a").status == PENDING
        with pytest.raises(StoreError, match="readonly"):
            reader.cancel("a")
    assert store.job("a").status == PENDING


def test_a_home_of_the_previous_schema_gains_seq(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:2]:
        for statement in statements(migration):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO jobs (name, status, spec, base_key, max_retries, created_at, updated_at) "
                 "VALUES ('old', 'pending', '{}', 'b', 2, 0, 0)")
    conn.close()
    with Store.open(path, readonly=True) as reader:  # a reader upgrades it once, as a writer would
        assert reader.job("old").seq == 1
    with Store.open(path) as writer:
        writer.cancel("old")
        assert writer.job("old").seq == 2
    assert len(list(statements(MIGRATIONS[2]))) == 5  # the triggers' bodies stay whole


def test_listing_pages_and_filters_by_status_and_sweep(store: Store) -> None:
    store.enqueue([NewJob(name=f"j{i}", spec={"spec": {"group": "even" if i % 2 == 0 else None}}, base_key="b")
                   for i in range(10)])
    store.cancel("j3")
    assert [r["name"] for r in store.listing(offset=2, limit=3)] == ["j2", "j3", "j4"]
    assert [r["name"] for r in store.listing(group="even", offset=1, limit=2)] == ["j2", "j4"]
    assert [r["name"] for r in store.listing(status=CANCELLED)] == ["j3"]
    assert store.listing_count(group="even") == 5 and store.listing_count(status=PENDING) == 9
    assert store.groups() == {"even": {s: (5 if s == PENDING else 0) for s in STATES}}


# ---------------------------------------------------------------- internal errors (a bug): once, then stop


def fail_internal(store: Store, reason: str = "RuntimeError: boom (raised at loraq/train/service.py:12)") -> str:
    claim = store.claim(W1, lease_s=30)
    assert claim is not None
    return store.fail(claim.job.id, claim.epoch, kind="internal", reason=reason, retryable=True)


def test_the_same_internal_error_twice_in_a_row_fails_the_job_for_good(store: Store) -> None:
    store.enqueue([new_job("a", max_retries=5)], settings={"retry_backoff_s": 0})
    assert fail_internal(store) == PENDING  # retried once
    assert fail_internal(store) == FAILED  # with four attempts left
    job = store.job("a")
    assert job.error_kind == "internal"
    assert job.error == ("RuntimeError: boom (raised at loraq/train/service.py:12); the same error as attempt 1, "
                         "so it is not retried again")
    assert [(a.outcome, a.retryable) for a in store.attempts("a")] == [("retry", 1), ("failed", 0)]


def test_an_internal_error_is_retried_once_at_most_even_when_another_failure_or_error_comes_between(
        store: Store) -> None:
    store.enqueue([new_job("a", max_retries=5), new_job("b", max_retries=5)], settings={"retry_backoff_s": 0})
    assert fail_internal(store, "KeyError: 'x' (raised at loraq/a.py:1)") == PENDING
    claim = store.claim(W1, lease_s=30)
    assert store.fail(claim.job.id, claim.epoch, kind="oom", reason="out of memory", retryable=True) == PENDING
    assert fail_internal(store, "TypeError: y (raised at loraq/b.py:2)") == FAILED
    assert store.job("a").error.endswith("; attempt 1 also failed with an internal error, so it is not retried again")
    # The known faults of the machine keep every retry they have.
    for _ in range(5):
        claim = store.claim(W1, lease_s=30)
        assert claim.job.name == "b"
        assert store.fail(claim.job.id, claim.epoch, kind="died", reason="killed", retryable=True) == PENDING


def test_an_operator_retry_starts_a_fresh_run_of_attempts(store: Store) -> None:
    store.enqueue([new_job("a", max_retries=5)], settings={"retry_backoff_s": 0})
    fail_internal(store)
    fail_internal(store)
    store.retry("a")
    assert fail_internal(store) == PENDING  # retried once again, as a new job would be


def test_three_jobs_failing_in_a_row_with_the_same_internal_error_pause_the_queue(store: Store) -> None:
    store.enqueue([new_job(n, max_retries=0) for n in "abcd"])
    for _ in range(3):
        fail_internal(store)
    state = store.queue_state()
    assert state.paused
    assert state.pause_reason.startswith("3 jobs in a row failed with the same internal error")
    assert "last: c: RuntimeError: boom (raised at loraq/train/service.py:12)" in state.pause_reason
    assert store.claim(W1, lease_s=30) is None
    store.resume()
    assert store.claim(W1, lease_s=30).job.name == "d"


@pytest.mark.parametrize("between", ["completed", "other error", "another internal error"])
def test_the_run_of_internal_errors_is_broken_by_any_other_outcome(store: Store, between: str) -> None:
    store.enqueue([new_job(n, max_retries=0) for n in "abcde"])
    fail_internal(store)
    fail_internal(store)
    claim = store.claim(W1, lease_s=30)
    if between == "completed":
        store.complete(claim.job.id, claim.epoch, result={})
    elif between == "other error":
        store.fail(claim.job.id, claim.epoch, kind="data", reason="row 3", retryable=False)
    else:
        store.fail(claim.job.id, claim.epoch, kind="internal", reason="ValueError: other", retryable=True)
    fail_internal(store)
    fail_internal(store)
    assert not store.queue_state().paused


def test_pause_after_internal_errors_is_a_queue_setting(store: Store) -> None:
    store.enqueue([new_job(n, max_retries=0) for n in "abcd"], settings={"pause_after_internal_errors": 0})
    for _ in range(4):
        fail_internal(store)
    assert not store.queue_state().paused
