"""Job dependencies (``after: <job>``): a job waits until the job it names has completed.

The edges live in the ``dependencies`` table (migration 5), one row per
``(job_id, after_id)``. The store uses what is here inside its own transactions:

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
from collections.abc import Iterable
from dataclasses import dataclass

#: Failure kind of a job failed because of its dependency (``FailureKind.DEPENDENCY``).
KIND = "dependency"

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


def insert(conn: sqlite3.Connection, edges: Iterable[tuple[int, int]]) -> None:
    """Record ``(job_id, after_id)`` edges."""
    conn.executemany("INSERT OR IGNORE INTO dependencies (job_id, after_id) VALUES (?, ?)", list(edges))


def of(conn: sqlite3.Connection, job_id: int) -> list[Dependency]:
    """The jobs ``job_id`` waits on, oldest first."""
    rows = conn.execute("SELECT a.id, a.name, a.status FROM dependencies d JOIN jobs a ON a.id = d.after_id "
                        "WHERE d.job_id = ? ORDER BY a.id", (job_id,)).fetchall()
    return [Dependency(int(r["id"]), str(r["name"]), str(r["status"])) for r in rows]


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
    waited on in turn) is ``status``: one line a person can act on."""
    cause = f" ({error})" if error else ""
    if first == name:
        return (f"after: {name} {status}{cause}; this job starts from its adapter, so it cannot run. "
                f"'loraq retry {name}' runs it again, and this job waits on it again")
    return (f"after: {name} failed because {first}, which it waits on, {status}{cause}; this job starts from "
            f"{name}'s adapter, so it cannot run. 'loraq retry {first}' runs them again, and this job waits again")
