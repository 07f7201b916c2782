"""Job dependencies (``after: <job>``): a job waits until the job it names has completed.

The edges live in the ``dependencies`` table (migration 5), one row per
``(job_id, after_id)``. The store uses what is here inside its own transactions
(the functions that move jobs take the store, which passes itself in):

- a claim hands out only a job whose dependencies have all completed (:data:`READY`,
  a clause of the claim's SQL);
- a dependency that fails for good or is cancelled fails the jobs waiting on it
  (pending -> failed, kind ``dependency``, naming it), and those waiting on them;
- a retried dependency puts the jobs that failed only because of it back to waiting;
- a job whose dependency failed cannot be retried alone (retry the dependency).

What the waiting job starts from (the dependency's published adapter, as
``init_from`` does) is bound by the worker when it claims the job
(:meth:`.Store.bind_warm_start`). Standard library only, like the store.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ..errors import TransitionError
from .records import FAILED, PENDING, Moves

#: Failure kind of a job failed because of its dependency (``FailureKind.DEPENDENCY``).
KIND = "dependency"
#: The states of a dependency that fail the jobs waiting on it.
ENDED_BADLY = ("failed", "cancelled")

#: An SQL condition on ``jobs``: every job this one waits on has completed.
READY = ("NOT EXISTS (SELECT 1 FROM dependencies d JOIN jobs a ON a.id = d.after_id "
         "WHERE d.job_id = jobs.id AND a.status != 'completed')")

#: An SQL condition on ``jobs``: a job this one waits on has failed or was cancelled (it can never start).
STRANDED = ("EXISTS (SELECT 1 FROM dependencies d JOIN jobs a ON a.id = d.after_id "
            "WHERE d.job_id = jobs.id AND a.status IN ('failed', 'cancelled'))")


#: Columns of a listing row (``FROM jobs``): the job it waits on and that job's status now (``NULL``: none).
LISTING_COLUMNS = ("(SELECT a.name FROM dependencies d JOIN jobs a ON a.id = d.after_id WHERE d.job_id = jobs.id "
                   "ORDER BY a.id LIMIT 1) AS after_name, "
                   "(SELECT a.status FROM dependencies d JOIN jobs a ON a.id = d.after_id WHERE d.job_id = jobs.id "
                   "ORDER BY a.id LIMIT 1) AS after_status")


@dataclass(frozen=True)
class Dependency:
    """A job that another waits on: its id, name and status now."""

    id: int
    name: str
    status: str
    error_kind: str | None = None  # what it failed with (first_failure only)
    error: str | None = None


def record(conn: sqlite3.Connection, jobs: list[tuple[str, str | None]], ids: list[int]) -> None:
    """Record each enqueued job's ``after`` (``(name, after)``, ids in the same order) as an edge.

    The dependency is a job of the same enqueue or one already stored. Submit checked
    all this; it is checked again inside the enqueue's transaction, so a dependency
    that failed in between is refused too (:class:`TransitionError`: nothing is added).
    """
    batch = {name: job_id for (name, _), job_id in zip(jobs, ids)}
    if (loop := cycle(dict(jobs))) is not None:
        raise TransitionError(f"job {loop[0]!r}: after: a cycle ({' -> '.join(loop)}): no job of it could ever start")
    edges = []
    for (name, after), job_id in zip(jobs, ids):
        if after is None:
            continue
        after_id = batch.get(after)
        if after_id is None:
            row = conn.execute("SELECT id, status FROM jobs WHERE name = ?", (after,)).fetchone()
            if row is None:
                raise TransitionError(f"job {name!r}: after: no job named {after!r} in this queue or home")
            if row["status"] in ENDED_BADLY:
                raise TransitionError(f"job {name!r}: after: {after} is {row['status']}; "
                                      f"'loraq retry {after}' first, or drop after")
            after_id = int(row["id"])
        edges.append((job_id, after_id))
    conn.executemany("INSERT OR IGNORE INTO dependencies (job_id, after_id) VALUES (?, ?)", edges)


def of(conn: sqlite3.Connection, job_id: int) -> list[Dependency]:
    """The jobs ``job_id`` waits on, oldest first."""
    rows = conn.execute("SELECT a.id, a.name, a.status FROM dependencies d JOIN jobs a ON a.id = d.after_id "
                        "WHERE d.job_id = ? ORDER BY a.id", (job_id,)).fetchall()
    return [Dependency(int(r["id"]), str(r["name"]), str(r["status"])) for r in rows]


def first_failure(conn: sqlite3.Connection, job_id: int) -> Dependency:
    """The job whose failure (or cancelling) failed ``job_id`` through a chain of ``after`` (itself, if it
    failed on its own), with the error it failed with."""
    sql = "SELECT id, name, status, error_kind, error FROM jobs WHERE id = ?"
    row = conn.execute(sql, (job_id,)).fetchone()
    seen = {job_id}
    while row["error_kind"] == KIND:
        ended = [d for d in of(conn, int(row["id"])) if d.status in ENDED_BADLY]
        if not ended or ended[0].id in seen:
            break
        seen.add(ended[0].id)
        row = conn.execute(sql, (ended[0].id,)).fetchone()
    return Dependency(int(row["id"]), str(row["name"]), str(row["status"]), row["error_kind"], row["error"])


def waiting_on(conn: sqlite3.Connection, job_id: int, status: str) -> list[int]:
    """The jobs that wait on ``job_id`` and are in ``status``, oldest first."""
    rows = conn.execute("SELECT j.id FROM dependencies d JOIN jobs j ON j.id = d.job_id "
                        "WHERE d.after_id = ? AND j.status = ? ORDER BY j.id", (job_id, status)).fetchall()
    return [int(r["id"]) for r in rows]


def cycle(edges: dict[str, str | None]) -> list[str] | None:
    """A cycle in ``name -> the name it waits on`` (``a -> b -> a``), or ``None``."""
    for start in edges:
        path, seen, name = [start], {start}, edges.get(start)
        while name is not None and name in edges:
            path.append(name)
            if name in seen:
                return path[path.index(name):]
            seen.add(name)
            name = edges.get(name)
    return None


def failed_why(name: str, first: str, status: str, error: str | None) -> str:
    """Why a job waiting on ``name`` fails now that ``first`` (``name`` itself, or the job that ``name``
    waited on in turn) is ``status``: one line a person can act on, the cause last."""
    cause = f": {error}" if error else ""
    if first == name:
        return f"after: {name} {status}; 'loraq retry {name}' makes this job wait on it again{cause}"
    return f"after: {name} failed because {first} {status}; 'loraq retry {first}' makes this job wait again{cause}"


# ---------------------------------------------------------------- the store's moves (inside its transactions)


def fail_waiting(store: Moves, conn: sqlite3.Connection, job_id: int) -> None:
    """The jobs waiting on ``job_id`` (``after``), which just failed or was cancelled, fail too, saying why;
    and so, through the store's ``_transition``, do the jobs waiting on them."""
    waiting = waiting_on(conn, job_id, PENDING)
    if not waiting:
        return
    name = conn.execute("SELECT name FROM jobs WHERE id = ?", (job_id,)).fetchone()["name"]
    root = first_failure(conn, job_id)
    cause = f"{root.error_kind}: {root.error}" if root.error else None
    why = failed_why(name, root.name, root.status, cause[:200] if cause else None)
    for waiter in waiting:
        store._transition(conn, waiter, FAILED, reason=f"{KIND}: {why}", expect=(PENDING,),
                          sets={"finished_at": store.clock(), "error_kind": KIND, "error": why})


def check_retry(conn: sqlite3.Connection, job_id: int) -> None:
    """A job whose dependency failed or was cancelled cannot be retried alone: raise, naming the one to retry."""
    for dep in of(conn, job_id):
        if dep.status in ENDED_BADLY:
            root = first_failure(conn, dep.id)
            chain = "" if root.id == dep.id else f" because {root.name} is {root.status}"
            raise TransitionError(f"it waits on {dep.name} (after), which is {dep.status}{chain}: 'loraq retry "
                                  f"{root.name}' instead, and this job waits again")


def rewait(store: Moves, conn: sqlite3.Connection, job_id: int) -> None:
    """Jobs that failed only because ``job_id`` (retried now) had failed wait on it again, and theirs on them."""
    name = conn.execute("SELECT name FROM jobs WHERE id = ?", (job_id,)).fetchone()["name"]
    for waiter in waiting_on(conn, job_id, FAILED):
        kind = conn.execute("SELECT error_kind FROM jobs WHERE id = ?", (waiter,)).fetchone()["error_kind"]
        if kind != KIND:
            continue  # it failed on its own: only the operator retries it
        store._transition(conn, waiter, PENDING, reason=f"its dependency {name} was retried: waiting on it again",
                          expect=(FAILED,), sets={"attempts": 0, "not_before": 0, "finished_at": None, "error": None,
                                                    "error_kind": None, "verdict": None})
        rewait(store, conn, waiter)
