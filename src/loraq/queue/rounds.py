"""Successive halving's state in the store: each member's round (``halving_members``) and each decided
round (``halving_rounds``), migration 6.

SQL only, run inside the store's transactions; what a round decides is
:func:`.halving.settle` (pure), what the moves are is :data:`.records.ROUND_TRANSITIONS`.
A member's state changes only in :func:`move`, which checks the table and guards its
``UPDATE`` with the state it read, as :meth:`.Store._transition` does for a job.
Standard library only.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from ..errors import TransitionError
from .records import JOB_SELECT, ROUND_TRANSITIONS, TRAINING, WAITING, Job

#: An SQL condition on ``jobs``: the job does not wait for its halving round to be decided (the claim's).
NOT_WAITING = f"NOT EXISTS (SELECT 1 FROM halving_members w WHERE w.job_id = jobs.id AND w.state = '{WAITING}')"


def enroll(conn: sqlite3.Connection, job_id: int, sweep: str) -> None:
    """A job of a halving sweep, just enqueued: it trains round 1."""
    conn.execute("INSERT INTO halving_members (job_id, sweep, round, state) VALUES (?, ?, 1, ?)",
                 (job_id, sweep, TRAINING))


def move(conn: sqlite3.Connection, job_id: int, to_state: str, **sets: Any) -> str:
    """Move a member to ``to_state`` (with ``sets``: round, eval_loss, why, history …); return the state it left."""
    row = conn.execute("SELECT state FROM halving_members WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        raise TransitionError(f"job {job_id} is in no halving round")
    current = str(row["state"])
    if (current, to_state) not in ROUND_TRANSITIONS:
        raise TransitionError(f"job {job_id}: halving {current} -> {to_state} is not allowed")
    values = {"state": to_state, **_encoded(sets)}
    clause = ", ".join(f"{k} = ?" for k in values)
    if conn.execute(f"UPDATE halving_members SET {clause} WHERE job_id = ? AND state = ?",
                    [*values.values(), job_id, current]).rowcount != 1:
        raise TransitionError(f"job {job_id} changed while moving it to halving {to_state}")
    return current


def note(conn: sqlite3.Connection, job_id: int, **sets: Any) -> None:
    """Record ``why`` and ``history`` of a member whose state stays (it had failed or was cancelled)."""
    values = _encoded(sets)
    conn.execute(f"UPDATE halving_members SET {', '.join(f'{k} = ?' for k in values)} WHERE job_id = ?",
                 [*values.values(), job_id])


def members(conn: sqlite3.Connection, sweep: str, round_no: int) -> list[Job]:
    """The jobs of ``sweep`` in round ``round_no``, oldest first."""
    rows = conn.execute(f"{JOB_SELECT} WHERE h.sweep = ? AND h.round = ? ORDER BY jobs.id", (sweep, round_no))
    return [Job.from_row(r) for r in rows]


def waiting_rounds(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    """``(sweep, round)`` of every round a member waits in."""
    rows = conn.execute("SELECT DISTINCT sweep, round FROM halving_members WHERE state = ? ORDER BY sweep, round",
                        (WAITING,))
    return [(str(r["sweep"]), int(r["round"])) for r in rows]


def is_decided(conn: sqlite3.Connection, sweep: str, round_no: int) -> bool:
    return conn.execute("SELECT 1 FROM halving_rounds WHERE sweep = ? AND round = ?",
                        (sweep, round_no)).fetchone() is not None


def record(conn: sqlite3.Connection, sweep: str, round_no: int, verdicts: Sequence[dict[str, Any]]) -> None:
    """The round's decision, made once: a second one would be a bug (the primary key refuses it)."""
    conn.execute("INSERT INTO halving_rounds (sweep, round, verdicts) VALUES (?, ?, ?)",
                 (sweep, round_no, json.dumps(list(verdicts))))


def _encoded(sets: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(list(v)) if k == "history" else v for k, v in sets.items()}
