"""The durable queue: jobs, attempts, events and metrics in one SQLite file.

Standard library only. Every state change is one ``BEGIN IMMEDIATE`` transaction
that checks the transition table and the current state in the same
``UPDATE … WHERE status = ?`` and writes an event row (who, when, from, to, why).

A running job holds a lease with a fencing number (``epoch``) that grows on every
claim. Heartbeats, progress and completion are accepted only with the current
epoch, so a worker that was paused past its lease, or an orphaned trainer, can
never complete or overwrite a job that someone else now owns.

Time is a parameter (``clock``), so lease, retry and backoff tests never sleep.

The file itself (how it is opened, checked and created, and how its faults read)
is :mod:`.dbfile`; the status lines' SQL is :mod:`.listing`. What a failed attempt
becomes, and when the queue pauses, is the failure policy (:mod:`.failures`, pure);
the moves of ``after:`` and of halving's rounds, which run inside the store's
transactions, are :mod:`.dependencies` and :mod:`.rounds`. A job read back is
decoded once into a typed record (:class:`.records.Job`, its :class:`.records.StoredJob`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import (
    CorruptStoreError,
    FailureKind,
    LeaseLost,
    LoraqError,
    NotFoundError,
    StoreError,
    StoreFaultError,
    TransitionError,
)
from . import dbfile, dependencies, failures, rounds
from .dbfile import SQLITE_MAGIC, is_machine_fault  # noqa: F401 (SQLITE_MAGIC: importable from the store, as always)
from .listing import group_counts, listing_rows
from .migrations import MIGRATIONS
from .records import (  # the records and states are importable from the store, as callers always did
    CANCELLED,
    COMPLETED,
    FAILED,
    JOB_SELECT,
    OUTCOME_CANCELLED,
    OUTCOME_COMPLETED,
    OUTCOME_FAILED,
    OUTCOME_RETRY,
    OUTCOME_STOPPED,
    PENDING,
    RUNNING,
    STATES,
    TRANSITIONS,
    Attempt,
    Claim,
    Event,
    Job,
    NewJob,
    QueueState,
    SqlExpr,
    WorkerId,
)

F = TypeVar("F", bound=Callable[..., Any])

#: An SQL condition on ``jobs``: a pending job may be claimed (its dependencies completed, its round not waiting).
READY = f"{dependencies.READY} AND {rounds.NOT_WAITING}"

#: How long a store waits on another process's lock. Read where it is used (opening a
#: connection, wording a "busy" error), so lowering it here takes effect everywhere.
BUSY_TIMEOUT_S = 60.0


def _db_error(path: Path, exc: sqlite3.Error) -> LoraqError | None:
    """:func:`.dbfile.db_error` with the busy timeout read now (a test lowers :data:`BUSY_TIMEOUT_S`)."""
    return dbfile.db_error(path, exc, busy_timeout_s=BUSY_TIMEOUT_S)


def _guarded(method: F) -> F:
    """Turn SQLite errors escaping a :class:`Store` method into loraq errors (see :func:`_db_error`).

    Each method is one transaction, so a write the machine refused (a full disk, an
    I/O error: :class:`StoreFaultError`) is run again, whole, after a back-off
    (:attr:`Store.fault_delays`); only a fault that outlasts them reaches the caller.
    """

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        # Only a whole transaction is run again: never a part of a caller's (fenced) one.
        in_callers = self._conn is not None and self._conn.in_transaction
        outermost, previous = not self._in_guard and not in_callers, self._in_guard
        self._in_guard = True
        try:
            for delay in (*self.fault_delays, None) if outermost else (None,):
                try:
                    return method(self, *args, **kwargs)
                except sqlite3.Error as exc:
                    translated = _db_error(self.path, exc)
                    if translated is None:
                        raise
                    if delay is None or not isinstance(translated, StoreFaultError):
                        raise translated from exc
                except StoreFaultError:
                    if delay is None:
                        raise
                self.sleep(delay)
            raise AssertionError("unreachable")  # the last try returns or raises
        finally:
            self._in_guard = previous

    return wrapper  # type: ignore[return-value]


@dataclass
class Store:
    """The SQLite state of one home. Open with :meth:`open`; close when done."""

    path: Path
    clock: Callable[[], float] = time.time
    actor: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    #: Seconds to wait before each new try of a write the machine refused (then it is raised).
    fault_delays: tuple[float, ...] = (0.05, 0.2, 0.5, 1.0)
    sleep: Callable[[float], None] = time.sleep
    _conn: sqlite3.Connection | None = field(default=None, repr=False)
    _in_guard: bool = field(default=False, repr=False)

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        clock: Callable[[], float] = time.time,
        actor: str | None = None,
        check: bool = False,
        readonly: bool = False,
    ) -> Store:
        """Open (and migrate) the store at ``path``.

        Only an absent file is a new store (with ``create``); an empty or short one is
        damage, reported and left as it is. ``readonly`` opens for reading only, as the
        commands that only read do (``status``, ``show``, ``logs``, ``report``): they
        never create, migrate or write the file, and work on a read-only home.
        ``check`` runs ``PRAGMA quick_check`` first: workers do, so a damaged file
        stops them before they write. A damaged file is never recreated, and a
        database or journal that is a symlink is refused, never followed.
        """
        path = Path(path)
        dbfile.refuse_links(path)
        if not dbfile.exists(path):
            if not create or readonly:
                raise NotFoundError(f"{path}: no loraq state here (run 'loraq submit' first)")
            dbfile.create(path)
        dbfile.check_header(path)
        store = cls(path=path, clock=clock)
        if actor:
            store.actor = actor
        store._connect(check=check, readonly=readonly)
        return store

    def _corrupt(self, exc: BaseException) -> CorruptStoreError:
        return dbfile.corrupt_error(self.path, exc)

    def _connect(self, *, check: bool, readonly: bool = False) -> None:
        conn = None
        try:
            conn = dbfile.connect_readonly(self.path, busy_timeout_s=BUSY_TIMEOUT_S) if readonly else sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if check:
                verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
                if verdict != "ok":
                    raise self._corrupt(RuntimeError(f"quick_check: {verdict}"))
            if readonly:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if 0 < version < len(MIGRATIONS):
                    # A home made by an older loraq: brought up to date once, as any writer would,
                    # so a reader never queries columns that are not there yet. (The one write a
                    # reader makes, and only to an intact database; on a read-only home it cannot.)
                    conn.close()
                    conn = None
                    with contextlib.suppress(StoreError):  # a read-only home: said below, in one line
                        Store.open(self.path, create=False).close()
                    conn = dbfile.connect_readonly(self.path, busy_timeout_s=BUSY_TIMEOUT_S)
                    conn.row_factory = sqlite3.Row
                    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                dbfile.check_version(self.path, version)
                self._conn = conn
                return
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conn = conn
            self._migrate()
        except BaseException as exc:
            self._conn = None
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error):
                translated = _db_error(self.path, exc) or StoreError(f"{self.path}: cannot open the state database: {exc}")
                raise translated from exc
            raise

    def _migrate(self) -> None:
        # Up to date (the usual case): no write lock, so 'loraq status' never queues
        # behind a worker's transaction just to open the file.
        if self.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS):
            return
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.path}: made by a newer loraq (schema {version}, this one knows "
                    f"{len(MIGRATIONS)}); upgrade loraq"
                )
            dbfile.apply_migrations(conn, version)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is closed")
        return self._conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: all of it commits, or none of it."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise (_db_error(self.path, exc) or StoreError(f"{self.path}: cannot begin a transaction: {exc}")) from exc
        try:
            yield conn
        except BaseException as exc:
            # SQLite may already have rolled back by itself (a full disk, an I/O
            # error): a failing ROLLBACK must not hide the error that caused it.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and (translated := _db_error(self.path, exc)) is not None:
                raise translated from exc
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if is_machine_fault(exc):
                    raise StoreFaultError(f"{self.path}: cannot write the state database: commit failed: {exc} "
                                          "(a full disk or an I/O error)") from exc
                raise StoreError(f"{self.path}: commit failed: {exc}") from exc

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads in one consistent snapshot: a deferred read transaction (no lock taken)."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("COMMIT")

    @_guarded
    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])

    # ---------------------------------------------------------------- helpers

    def _event(self, conn: sqlite3.Connection, job_id: int | None, from_state: str | None, to_state: str | None, reason: str, actor: str | None = None) -> None:
        conn.execute(
            "INSERT INTO events (job_id, ts, actor, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, self.clock(), actor or self.actor, from_state, to_state, reason),
        )

    def _transition(
        self,
        conn: sqlite3.Connection,
        job_id: int,
        to_state: str,
        *,
        reason: str,
        expect: Iterable[str] | None = None,
        epoch: int | None = None,
        sets: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> str:
        """Move a job to ``to_state``; return the state it left.

        The one place a job's status changes. It checks the transition table, the
        expected states and (for a worker) the fencing epoch, and guards the UPDATE
        with the state it read, so two writers can never both succeed.
        """
        row = conn.execute("SELECT status, epoch FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job with id {job_id}")
        current: str = row["status"]
        if expect is not None and current not in set(expect):
            raise TransitionError(f"job {job_id} is {current}, not {' or '.join(expect)}")
        if (current, to_state) not in TRANSITIONS:
            raise TransitionError(f"job {job_id}: {current} -> {to_state} is not allowed")
        if epoch is not None and row["epoch"] != epoch:
            raise LeaseLost(job_id, epoch, row["epoch"])
        now = self.clock()
        clause, values = _assign({"status": to_state, "updated_at": now, **(sets or {})})
        where = "id = ? AND status = ?" + (" AND epoch = ?" if epoch is not None else "")
        params = [*values, job_id, current] + ([epoch] if epoch is not None else [])
        if conn.execute(f"UPDATE jobs SET {clause} WHERE {where}", params).rowcount != 1:
            raise TransitionError(f"job {job_id} changed while moving it to {to_state}")
        self._event(conn, job_id, current, to_state, reason, actor)
        if to_state in (FAILED, CANCELLED):
            dependencies.fail_waiting(self, conn, job_id)
        return current

    def _job_id(self, conn: sqlite3.Connection, ref: int | str) -> int:
        # '#3' is always job id 3; a bare '3' is the id too (names made only of digits are refused).
        # An id is ASCII digits ('١٢'.isdigit() is true too) within SQLite's 64 bits; past them, no job has it.
        asked = ref
        if isinstance(ref, str) and ref.startswith("#") and ref[1:].isascii() and ref[1:].isdigit():
            ref = int(ref[1:]) if len(ref) <= 20 else -1
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isascii() and ref.isdigit()):
            job_id = int(ref) if isinstance(ref, int) or len(ref) <= 19 else -1
            row = (conn.execute("SELECT id FROM jobs WHERE id = ?", (job_id,)).fetchone()
                   if 0 <= job_id < 2**63 else None)
            if row is None and isinstance(ref, str):
                row = conn.execute("SELECT id FROM jobs WHERE name = ?", (ref,)).fetchone()
        else:
            row = conn.execute("SELECT id FROM jobs WHERE name = ?", (ref,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job named {asked!r} (see 'loraq status')")
        return int(row["id"])

    def _state(self, conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
        row = conn.execute("SELECT value FROM queue_state WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def _set_state(self, conn: sqlite3.Connection, key: str, value: str | None) -> None:
        if value is None:
            conn.execute("DELETE FROM queue_state WHERE key = ?", (key,))
        else:
            conn.execute("INSERT OR REPLACE INTO queue_state (key, value) VALUES (?, ?)", (key, value))

    def _read(self, conn: sqlite3.Connection, job_id: int) -> Job:
        """The job with ``job_id``, as handed out (its halving member row too: :data:`.records.JOB_SELECT`)."""
        row = conn.execute(f"{JOB_SELECT} WHERE jobs.id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job with id {job_id}")
        return Job.from_row(row)

    def _rewrite_spec(self, conn: sqlite3.Connection, job_id: int, change: Callable[[dict[str, Any]], None]) -> None:
        """Change the stored job's JSON (the settings the trainer runs: a round's steps, an OOM back-off)."""
        stored = json.loads(conn.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()["spec"])
        change(stored)
        conn.execute("UPDATE jobs SET spec = ?, updated_at = ? WHERE id = ?",
                     (json.dumps(stored, sort_keys=True), self.clock(), job_id))

    # ---------------------------------------------------------------- submit

    @_guarded
    def enqueue(self, jobs: Iterable[NewJob], *, settings: dict[str, Any] | None = None) -> list[int]:
        """Add all ``jobs`` in one transaction, or none (a name taken raises)."""
        jobs = list(jobs)
        now = self.clock()
        ids: list[int] = []
        with self.transaction() as conn:
            # Names that differ only in case would share one adapter folder on a case-insensitive
            # file system (macOS, Windows): they count as taken too.
            taken = [
                job.name
                for job in jobs
                if conn.execute("SELECT 1 FROM jobs WHERE name = ? COLLATE NOCASE", (job.name,)).fetchone()
            ]
            if taken:
                raise TransitionError(
                    f"job name(s) already in this home: {', '.join(taken)}; rename them, "
                    "or use 'loraq retry' to run a failed or cancelled job again"
                )
            for job in jobs:
                cursor = conn.execute(
                    """INSERT INTO jobs (name, status, priority, spec, base_key, max_retries,
                                         dataset_sha256, queue_file, created_at, updated_at)
                       VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (job.name, job.priority, json.dumps(job.spec, sort_keys=True), job.base_key,
                     job.max_retries, job.dataset_sha256, job.queue_file, now, now),
                )
                job_id = int(cursor.lastrowid or 0)
                ids.append(job_id)
                plan = job.spec.get("halving")
                if isinstance(plan, dict) and (sweep := plan.get("sweep") or (job.spec.get("spec") or {}).get("group")):
                    rounds.enroll(conn, job_id, str(sweep))
                self._event(conn, job_id, None, PENDING, "submitted")
            dependencies.record(conn, [(job.name, job.after) for job in jobs], ids)
            for key, value in (settings or {}).items():
                if value is not None:
                    self._set_state(conn, key, json.dumps(value))
        return ids

    # ---------------------------------------------------------------- worker side

    @_guarded
    def claim(self, worker: WorkerId, *, lease_s: float, prefer_base: str | None = None) -> Claim | None:
        """Take the best pending job and lease it to ``worker``; ``None`` if none is ready.

        Highest priority first; within one priority, a job on ``prefer_base`` (the
        base model a trainer has resident) before others, then oldest first. A job
        waiting on another (``after``) is ready once that one has completed.
        """
        now = self.clock()
        with self.transaction() as conn:
            if self._state(conn, "paused"):
                return None
            # Three index walks (jobs_claim), not one ORDER BY over an expression, which
            # sorted every pending job on every claim: 20 ms a claim at 10,000 pending.
            top = conn.execute(
                "SELECT priority FROM jobs WHERE status = 'pending' AND not_before <= ? "
                f"AND {READY} ORDER BY priority DESC LIMIT 1",
                (now,),
            ).fetchone()
            if top is None:
                return None
            row = None
            if prefer_base is not None:
                row = conn.execute(
                    f"""SELECT id FROM jobs WHERE status = 'pending' AND priority = ? AND base_key = ? AND not_before <= ?
                       AND {READY} ORDER BY id LIMIT 1""",
                    (top["priority"], prefer_base, now),
                ).fetchone()
            if row is None:
                row = conn.execute(
                    "SELECT id FROM jobs WHERE status = 'pending' AND priority = ? AND not_before <= ? "
                    f"AND {READY} ORDER BY id LIMIT 1",
                    (top["priority"], now),
                ).fetchone()
            job_id = int(row["id"])
            n = conn.execute("SELECT COALESCE(MAX(n), 0) + 1 FROM attempts WHERE job_id = ?", (job_id,)).fetchone()[0]
            self._transition(
                conn, job_id, RUNNING, reason=f"claimed by {worker} (attempt {n})", expect=(PENDING,),
                sets={"epoch": _raw("epoch + 1"), "attempts": _raw("attempts + 1"), "lease_owner": str(worker),
                      "lease_host": worker.host, "lease_pid": worker.pid, "lease_expires": now + lease_s,
                      "started_at": _raw(f"COALESCE(started_at, {now!r})"), "error": None, "error_kind": None},
                actor=str(worker),
            )
            job = self._read(conn, job_id)
            conn.execute(
                "INSERT INTO attempts (job_id, n, epoch, worker, started_at) VALUES (?, ?, ?, ?, ?)",
                (job_id, n, job.epoch, str(worker), now),
            )
        return Claim(job=job, attempt=n, epoch=job.epoch)

    @_guarded
    def heartbeat(self, job_id: int, epoch: int, *, lease_s: float) -> bool:
        """Renew the lease; ``False`` means this worker no longer owns the job (stop it)."""
        with self.transaction() as conn:
            updated = conn.execute(
                "UPDATE jobs SET lease_expires = ?, updated_at = ? WHERE id = ? AND epoch = ? AND status = 'running'",
                (self.clock() + lease_s, self.clock(), job_id, epoch),
            ).rowcount
        return updated == 1

    @_guarded
    def record_progress(
        self,
        job_id: int,
        epoch: int,
        attempt: int,
        *,
        step: int,
        total: int | None = None,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Write progress and metrics if ``epoch`` still owns the job; ``False`` if not."""
        now = self.clock()
        # SQLite has no NaN (it would arrive as NULL): a non-finite value is left out of the
        # metrics and the job's loss columns are cleared. The trainer reports the divergence.
        values = {k: float(v) for k, v in (metrics or {}).items()}
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        columns = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        with self.transaction() as conn:
            sets: dict[str, float | None] = {"progress_step": step, "updated_at": now}
            if total is not None:
                sets["progress_total"] = total
            if "loss" in columns:
                sets["train_loss"] = columns["loss"]
            if "eval_loss" in columns:
                sets["eval_loss"] = columns["eval_loss"]
            if "base_eval_loss" in columns:
                sets["base_eval_loss"] = columns["base_eval_loss"]
            clause = ", ".join(f"{k} = ?" for k in sets)
            owned = conn.execute(
                f"UPDATE jobs SET {clause} WHERE id = ? AND epoch = ? AND status = 'running'",
                [*sets.values(), job_id, epoch],
            ).rowcount
            if owned != 1:
                return False
            conn.executemany(
                "INSERT INTO metrics (job_id, attempt, step, name, value, ts) VALUES (?, ?, ?, ?, ?, ?)",
                [(job_id, attempt, step, name, value, now) for name, value in finite.items()],
            )
            conn.execute(
                "UPDATE attempts SET last_step = ? WHERE job_id = ? AND n = ?", (step, job_id, attempt)
            )
        return True

    @_guarded
    def note_resume(self, job_id: int, epoch: int, attempt: int, step: int) -> bool:
        with self.transaction() as conn:
            if not self._owns(conn, job_id, epoch):
                return False
            conn.execute("UPDATE attempts SET resumed_from_step = ? WHERE job_id = ? AND n = ?", (step, job_id, attempt))
            self._event(conn, job_id, RUNNING, RUNNING, f"attempt {attempt} resumes from checkpoint step {step}")
        return True

    @_guarded
    def note_checkpoint(self, job_id: int, epoch: int, attempt: int, step: int) -> bool:
        """Record that ``attempt`` wrote a complete checkpoint at ``step`` (if ``epoch`` still owns the job)."""
        with self.transaction() as conn:
            if not self._owns(conn, job_id, epoch):
                return False
            conn.execute(
                "UPDATE attempts SET checkpoint_step = MAX(COALESCE(checkpoint_step, 0), ?) WHERE job_id = ? AND n = ?",
                (step, job_id, attempt),
            )
        return True

    @_guarded
    def adjust_after_oom(self, job_id: int, epoch: int, *, after: dict[str, Any], record: dict[str, Any],
                         reason: str) -> bool:
        """Store the training settings an out-of-memory back-off moved the job to, and the adjustment itself.

        ``after`` replaces those keys of the job's ``spec.training``; ``record`` is
        appended to the stored spec's ``oom_adjustments``; an event says ``reason``.
        Only while ``epoch`` owns the running job; ``False`` if it does not.
        """
        with self.transaction() as conn:
            if not self._owns(conn, job_id, epoch):
                return False
            def adjusted(stored: dict[str, Any]) -> None:
                stored.setdefault("spec", {}).setdefault("training", {}).update(after)
                stored["oom_adjustments"] = [*(stored.get("oom_adjustments") or []), record]

            self._rewrite_spec(conn, job_id, adjusted)
            self._event(conn, job_id, RUNNING, RUNNING, f"oom_adjusted: {reason}")
        return True

    # ---------------------------------------------------------------- successive halving (queue/halving.py, rounds.py)

    @_guarded
    def end_round(self, job_id: int, epoch: int, *, steps: int, eval_loss: float | None,
                  train_loss: float | None = None, metric: str | None = None, score: float | None = None) -> bool:
        """A job of a halving sweep trained to its round's ``max_steps``: it waits, unpublished, for the rest of
        its round, and the round is decided in this same transaction once every job of it has ended
        (:func:`.rounds.end`).

        The attempt ends uncounted (a round is not a failure). ``False`` if ``epoch`` no longer owns the job.
        """
        with self.transaction() as conn:
            if not self._owns(conn, job_id, epoch):
                return False
            rounds.end(self, conn, job_id, epoch, steps=steps, eval_loss=eval_loss, train_loss=train_loss,
                       metric=metric, score=score)
        return True

    @_guarded
    def decide_rounds(self) -> int:
        """Decide every halving round whose jobs have all ended (a worker does on start); the rounds decided."""
        with self.transaction() as conn:
            return sum(rounds.decide(self, conn, sweep, k) for sweep, k in rounds.waiting_rounds(conn))

    def _owns(self, conn: sqlite3.Connection, job_id: int, epoch: int) -> bool:
        row = conn.execute("SELECT status, epoch FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and row["status"] == RUNNING and row["epoch"] == epoch

    def _end_attempt(self, conn: sqlite3.Connection, job_id: int, epoch: int, outcome: str, *, error_kind: str | None = None, reason: str | None = None, traceback: str | None = None, counted: bool = True, retryable: bool | None = None) -> None:
        conn.execute(
            """UPDATE attempts SET ended_at = ?, outcome = ?, error_kind = ?, reason = ?, traceback = ?, counted = ?,
                                   retryable = ?
               WHERE job_id = ? AND epoch = ? AND ended_at IS NULL""",
            (self.clock(), outcome, error_kind, reason, traceback, int(counted),
             None if retryable is None else int(retryable), job_id, epoch),
        )

    @contextlib.contextmanager
    def fenced(self, job_id: int, epoch: int) -> Iterator[sqlite3.Connection]:
        """A write transaction that proceeds only while ``epoch`` owns the running job.

        Used to publish: the rename into ``adapters/`` happens inside it, so no other
        worker can claim or complete the job between the check and the commit.
        """
        with self.transaction() as conn:
            if not self._owns(conn, job_id, epoch):
                row = conn.execute("SELECT epoch FROM jobs WHERE id = ?", (job_id,)).fetchone()
                raise LeaseLost(job_id, epoch, row["epoch"] if row else None)
            yield conn

    @_guarded
    def complete(self, job_id: int, epoch: int, *, result: dict[str, Any], verdict: str = "pass", conn: sqlite3.Connection | None = None) -> None:
        """Mark the job completed. Raises :class:`LeaseLost` if ``epoch`` lost it."""
        def run(c: sqlite3.Connection) -> None:
            self._transition(
                c, job_id, COMPLETED, reason="trained, inspected and published", epoch=epoch, expect=(RUNNING,),
                sets={"result": json.dumps(result, sort_keys=True), "verdict": verdict, "finished_at": self.clock(),
                      "lease_owner": None, "lease_expires": None,
                      "train_loss": result.get("train_loss"), "eval_loss": result.get("eval_loss"),
                      "base_eval_loss": result.get("base_eval_loss")},
            )
            self._end_attempt(c, job_id, epoch, OUTCOME_COMPLETED)
            self._set_state(c, "consecutive_failures", "0")
            self._set_state(c, "internal_error", None)  # a completed job breaks a run of internal errors
            self._set_state(c, "internal_error_jobs", None)

        if conn is not None:
            run(conn)
        else:
            with self.transaction() as c:
                run(c)

    @_guarded
    def fail(
        self,
        job_id: int,
        epoch: int | None,
        *,
        kind: str,
        reason: str,
        retryable: bool,
        traceback: str | None = None,
        verdict: str | None = None,
        result: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> str:
        """End the running attempt as a failure; return the job's new status.

        What becomes of the job, and whether the queue pauses, is the failure policy
        (:func:`.failures.decide`); this applies it, in one transaction.
        """
        with self.transaction() as conn:
            job = self._read(conn, job_id)
            if job.status != RUNNING or (epoch is not None and job.epoch != epoch):
                raise LeaseLost(job_id, epoch, job.epoch)
            state = self.queue_state(conn)
            earlier = self._earlier_internal(conn, job) if kind == FailureKind.INTERNAL else None
            failure = failures.decide(job, kind=kind, reason=reason, retryable=retryable, state=state,
                                      now=self.clock(), earlier_internal=earlier)
            sets: dict[str, Any] = {"error_kind": kind, "error": failure.reason, "lease_owner": None,
                                    "lease_expires": None}
            if verdict is not None:
                sets["verdict"] = verdict
            if result is not None:
                sets["result"] = json.dumps(result, sort_keys=True)
            if failure.not_before is not None:
                sets["not_before"] = failure.not_before
            else:
                sets["finished_at"] = self.clock()
            self._transition(conn, job_id, failure.status, reason=failure.why, epoch=epoch, expect=(RUNNING,),
                             sets=sets, actor=actor)
            self._end_attempt(conn, job.id, job.epoch, OUTCOME_RETRY if failure.again else OUTCOME_FAILED,
                              error_kind=kind, reason=failure.reason, traceback=traceback,
                              retryable=failure.retryable)
            self._set_state(conn, "consecutive_failures", str(failure.failures))
            if failure.pause is not None:
                self._pause(conn, failure.pause)
            if failure.status == FAILED:
                self._count_internal_failure(conn, state, job.name,
                                             failure.reason if kind == FailureKind.INTERNAL else None)
                rounds.decide_of(self, conn, job_id)  # a failed job ends its round too (counted as worst)
        return failure.status

    def _earlier_internal(self, conn: sqlite3.Connection, job: Job) -> tuple[int, str] | None:
        """``(n, reason)`` of the newest earlier attempt in the job's current run of attempts
        (since it was submitted or last retried by the operator) that failed with an internal error."""
        rows = conn.execute(
            "SELECT n, error_kind, reason FROM attempts WHERE job_id = ? AND epoch < ? AND counted = 1 "
            "ORDER BY n DESC LIMIT ?", (job.id, job.epoch, max(job.attempts - 1, 0))).fetchall()
        found = next((r for r in rows if r["error_kind"] == FailureKind.INTERNAL), None)
        return (int(found["n"]), str(found["reason"])) if found is not None else None

    def _count_internal_failure(self, conn: sqlite3.Connection, state: QueueState, name: str, error: str | None) -> None:
        """Count jobs failing for good in a row with the same internal ``error`` (``None``: any other outcome)."""
        streak = failures.internal_streak(error, self._state(conn, "internal_error"),
                                          int(self._state(conn, "internal_error_jobs", "0") or 0))
        self._set_state(conn, "internal_error", error)
        self._set_state(conn, "internal_error_jobs", str(streak) if streak else None)
        if (why := failures.internal_pause(streak, state, name, error)) and not self._state(conn, "paused"):
            self._pause(conn, why)

    def _pause(self, conn: sqlite3.Connection, message: str) -> None:
        self._set_state(conn, "paused", "1")
        self._set_state(conn, "pause_reason", message)
        self._event(conn, None, None, None, f"queue paused: {message}")

    @_guarded
    def requeue_stopped(self, job_id: int, epoch: int, *, reason: str = "graceful stop") -> None:
        """Put a job that was stopped on purpose back to pending, not using an attempt."""
        with self.transaction() as conn:
            self._transition(
                conn, job_id, PENDING, reason=f"{reason}; the attempt is not counted", epoch=epoch, expect=(RUNNING,),
                sets={"attempts": _raw("attempts - 1"), "lease_owner": None, "lease_expires": None},
            )
            self._end_attempt(conn, job_id, epoch, OUTCOME_STOPPED, reason=reason, counted=False)

    @_guarded
    def requeue_fault(self, job_id: int, epoch: int, *, kind: str, reason: str) -> None:
        """A fault of the machine ended the attempt (a full disk): back to pending, the attempt not
        counted, and the queue paused with the reason, so a machine that cannot work does not burn
        the queue's attempts. ``loraq resume`` continues once it is fixed."""
        with self.transaction() as conn:
            self._transition(
                conn, job_id, PENDING, reason=f"{kind}: {reason} (a fault of the machine; the attempt is not counted)",
                epoch=epoch, expect=(RUNNING,),
                sets={"attempts": _raw("attempts - 1"), "lease_owner": None, "lease_expires": None,
                      "error_kind": kind, "error": reason},
            )
            self._end_attempt(conn, job_id, epoch, OUTCOME_RETRY, error_kind=kind, reason=reason, counted=False,
                              retryable=True)
            self._pause(conn, failures.machine_fault_pause(kind, reason))

    @_guarded
    def note(self, job_id: int | None, reason: str) -> None:
        """An event that changes no state (what a worker did with an adapter folder, say)."""
        with self.transaction() as conn:
            self._event(conn, job_id, None, None, reason)

    @_guarded
    def expire_leases(self) -> list[int]:
        """Put running jobs whose lease ran out back to pending (or failed), counting the attempt."""
        now = self.clock()
        rows = self.conn.execute(
            "SELECT id, epoch, lease_owner FROM jobs WHERE status = 'running' AND lease_expires < ?", (now,)
        ).fetchall()
        return self._recover([(int(r["id"]), int(r["epoch"]), f"lease of {r['lease_owner']} expired") for r in rows])

    @_guarded
    def reclaim_dead(self, host: str, is_alive: Callable[[int], bool]) -> list[int]:
        """Recover running jobs leased by processes on ``host`` that no longer exist."""
        rows = self.conn.execute(
            "SELECT id, epoch, lease_pid, lease_owner FROM jobs WHERE status = 'running' AND lease_host = ?", (host,)
        ).fetchall()
        dead = [(int(r["id"]), int(r["epoch"]), f"worker {r['lease_owner']} is gone (pid {r['lease_pid']} not running)")
                for r in rows if r["lease_pid"] is not None and not is_alive(int(r["lease_pid"]))]
        return self._recover(dead)

    def _recover(self, lost: list[tuple[int, int, str]]) -> list[int]:
        recovered = []
        for job_id, epoch, why in lost:
            with contextlib.suppress(LeaseLost, TransitionError):
                self.fail(job_id, epoch, kind="lost", reason=why, retryable=True)
                recovered.append(job_id)
        return recovered

    # ---------------------------------------------------------------- operator side

    @_guarded
    def cancel(self, ref: int | str) -> Job:
        with self.transaction() as conn:
            job_id = self._job_id(conn, ref)
            row = conn.execute("SELECT status, epoch FROM jobs WHERE id = ?", (job_id,)).fetchone()
            previous = self._transition(
                conn, job_id, CANCELLED, reason="cancelled by the operator", expect=(PENDING, RUNNING),
                sets={"finished_at": self.clock(), "lease_owner": None, "lease_expires": None},
            )
            if previous == RUNNING:
                self._end_attempt(conn, job_id, row["epoch"], OUTCOME_CANCELLED, reason="cancelled", counted=True)
            rounds.decide_of(self, conn, job_id)
        return self.job(job_id)

    @_guarded
    def retry(self, ref: int | str) -> Job:
        """Put a failed or cancelled job back to pending with a fresh set of attempts."""
        with self.transaction() as conn:
            job_id = self._job_id(conn, ref)
            dependencies.check_retry(conn, job_id)
            self._transition(
                conn, job_id, PENDING, reason="retried by the operator", expect=(FAILED, CANCELLED),
                sets={"attempts": 0, "not_before": 0, "finished_at": None, "error": None, "error_kind": None, "verdict": None},
            )
            rounds.retry_outside(self, conn, job_id)
            dependencies.rewait(self, conn, job_id)
        return self.job(job_id)

    @_guarded
    def pause(self, reason: str = "paused by the operator") -> None:
        with self.transaction() as conn:
            self._pause(conn, reason)

    @_guarded
    def resume(self) -> None:
        with self.transaction() as conn:
            self._set_state(conn, "paused", None)
            self._set_state(conn, "pause_reason", None)
            self._set_state(conn, "consecutive_failures", "0")
            self._set_state(conn, "internal_error", None)
            self._set_state(conn, "internal_error_jobs", None)
            self._event(conn, None, None, None, "queue resumed")

    # ---------------------------------------------------------------- reading

    @_guarded
    def queue_state(self, conn: sqlite3.Connection | None = None) -> QueueState:
        c = conn or self.conn
        after = self._state(c, "pause_after_failures")
        backoff = self._state(c, "retry_backoff_s")
        internal = self._state(c, "pause_after_internal_errors")
        return QueueState(
            paused=bool(self._state(c, "paused")),
            pause_reason=self._state(c, "pause_reason"),
            consecutive_failures=int(self._state(c, "consecutive_failures", "0") or 0),
            pause_after_failures=int(json.loads(after)) if after else None,
            retry_backoff_s=float(json.loads(backoff)) if backoff else 10.0,
            pause_after_internal_errors=int(json.loads(internal)) if internal is not None else 3,
        )

    @_guarded
    def home_id(self) -> str | None:
        """The id written into this database when it was made (migration 3); ``None`` before it ran."""
        return self._state(self.conn, "home_id")

    @_guarded
    def job_named(self, name: str) -> Job | None:
        """The job whose name equals ``name`` ignoring case (names that would share an adapter folder)."""
        row = self.conn.execute(f"{JOB_SELECT} WHERE jobs.name = ? COLLATE NOCASE", (name,)).fetchone()
        return Job.from_row(row) if row is not None else None

    @_guarded
    def job(self, ref: int | str) -> Job:
        job_id = self._job_id(self.conn, ref)
        return self._read(self.conn, job_id)

    @_guarded
    def jobs(self, status: str | None = None) -> list[Job]:
        if status:
            rows = self.conn.execute(f"{JOB_SELECT} WHERE jobs.status = ? ORDER BY jobs.id", (status,))
        else:
            rows = self.conn.execute(f"{JOB_SELECT} ORDER BY jobs.id")
        return [Job.from_row(r) for r in rows]

    @_guarded
    def listing(self, *, status: str | None = None, group: str | None = None, offset: int = 0,
                limit: int | None = None) -> list[dict[str, Any]]:
        """Jobs' status-line fields, oldest first: no spec or result parsed in Python.

        ``status`` reads this; at 10,000 jobs it takes a fifth of :meth:`jobs`. The
        fields from the spec and result (``grp``, ``adapter``) are extracted by SQLite.
        ``status``/``group`` filter, ``offset``/``limit`` page (the dashboard's queue page).
        """
        clauses, params = (["status = ?"], [status]) if status is not None else ([], [])
        return listing_rows(self.conn, clauses, params, group=group, order="id", offset=offset, limit=limit)

    @_guarded
    def listing_count(self, *, status: str | None = None, group: str | None = None) -> int:
        if group is None:
            where, params = ("WHERE status = ?", [status]) if status is not None else ("", [])
            return int(self.conn.execute(f"SELECT COUNT(*) FROM jobs {where}", params).fetchone()[0])
        return len(self.listing(status=status, group=group))

    @_guarded
    def changed_since(self, seq: int, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The listing rows of jobs that changed after ``seq`` (see migration 3), in the order they changed.

        An index range on ``jobs_seq``: the work is in proportion to the jobs that
        changed, not to the jobs in the home.
        """
        return listing_rows(self.conn, ["seq > ?"], [int(seq)], order="seq", limit=limit)

    @_guarded
    def max_seq(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0])

    @_guarded
    def groups(self) -> dict[str, dict[str, int]]:
        """``group -> {status: count}`` for the jobs of sweeps (``spec.group``), by group name."""
        return group_counts(self.conn)

    @_guarded
    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {state: 0 for state in STATES} | {r["status"]: int(r["n"]) for r in rows}

    @_guarded
    def attempts(self, ref: int | str) -> list[Attempt]:
        job_id = self._job_id(self.conn, ref)
        rows = self.conn.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,))
        return [Attempt(**dict(r)) for r in rows]

    @_guarded
    def ended_attempts(self) -> dict[tuple[int, int], str]:
        """``(job_id, n) -> the job's status`` for every attempt that has ended (what reconcile may clean)."""
        rows = self.conn.execute(
            "SELECT a.job_id, a.n, j.status FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.ended_at IS NOT NULL"
        ).fetchall()
        return {(int(r["job_id"]), int(r["n"])): str(r["status"]) for r in rows}

    @_guarded
    def events(self, ref: int | str | None = None) -> list[Event]:
        if ref is None:
            rows = self.conn.execute("SELECT * FROM events ORDER BY id")
        else:
            rows = self.conn.execute("SELECT * FROM events WHERE job_id = ? ORDER BY id", (self._job_id(self.conn, ref),))
        return [Event(**dict(r)) for r in rows]

    @_guarded
    def metrics(self, ref: int | str) -> list[dict[str, Any]]:
        job_id = self._job_id(self.conn, ref)
        rows = self.conn.execute(
            "SELECT attempt, step, name, value, ts FROM metrics WHERE job_id = ? ORDER BY attempt, step, name", (job_id,)
        )
        return [dict(r) for r in rows]

    @_guarded
    def has_runnable(self) -> bool:
        """Whether any job is pending or running (the queue is not finished).

        A pending job waiting on a job that failed or was cancelled can never start
        (:meth:`fail_stranded` fails it): it does not count.
        """
        row = self.conn.execute("SELECT 1 FROM jobs WHERE status = 'running' OR (status = 'pending' AND NOT "
                                f"{dependencies.STRANDED}) LIMIT 1").fetchone()
        return row is not None

    # ---------------------------------------------------------------- dependencies (after:)

    @_guarded
    def dependencies_of(self, ref: int | str) -> list[dependencies.Dependency]:
        """The jobs ``ref`` waits on (``after``), with their status now."""
        return dependencies.of(self.conn, self._job_id(self.conn, ref))

    @_guarded
    def dependents(self, ref: int | str) -> list[Job]:
        """The jobs that wait on ``ref`` (their ``after`` names it), in any status, oldest first."""
        job_id = self._job_id(self.conn, ref)
        rows = self.conn.execute(f"{JOB_SELECT} JOIN dependencies d ON jobs.id = d.job_id WHERE d.after_id = ? "
                                 "ORDER BY jobs.id", (job_id,)).fetchall()
        return [Job.from_row(r) for r in rows]

    @_guarded
    def fail_stranded(self) -> list[int]:
        """Fail pending jobs whose dependency failed or was cancelled (a worker does on start).

        Failing a dependency fails its waiting jobs in the same transaction, so there
        are none of these unless an older loraq left them; they would wait forever.
        """
        with self.transaction() as conn:
            rows = conn.execute(f"SELECT id FROM jobs WHERE status = 'pending' AND {dependencies.STRANDED} ORDER BY id")
            stranded = [int(r["id"]) for r in rows.fetchall()]
            for dep_id in {d.id for job_id in stranded for d in dependencies.of(conn, job_id)
                           if d.status in dependencies.ENDED_BADLY}:
                dependencies.fail_waiting(self, conn, dep_id)
        return stranded

    @_guarded
    def bind_warm_start(self, job_id: int, epoch: int, *, path: str, sha256: str, after: str) -> Job | None:
        """Record that the running job starts from ``path`` (the adapter of ``after``, the job it waited on).

        Stored as ``init_from`` is at submit (``init_from_path``, ``init_from_sha256``), so the
        trainer, the manifest and ``show`` read it the same way; a retry keeps it. Only while
        ``epoch`` owns the running job: the job as stored now, or ``None`` if it does not.
        """
        with self.transaction() as conn:
            if not self._owns(conn, job_id, epoch):
                return None
            self._rewrite_spec(conn, job_id, lambda stored: stored.update(init_from_path=path, init_from_sha256=sha256))
            self._event(conn, job_id, RUNNING, RUNNING, f"after: {after} completed; starts from its adapter {path}")
            return self._read(conn, job_id)


_raw = SqlExpr  # an SQL expression to use as-is in an assignment (``epoch + 1``), not a value


def _assign(sets: dict[str, Any]) -> tuple[str, list[Any]]:
    parts, params = [], []
    for key, value in sets.items():
        if isinstance(value, SqlExpr):
            parts.append(f"{key} = {value}")
        else:
            parts.append(f"{key} = ?")
            params.append(value)
    return ", ".join(parts), params
