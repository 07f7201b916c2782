"""The store's schema, as numbered migrations: ``PRAGMA user_version`` says how many ran.

Append a migration, never edit one that has shipped: homes made by older versions
are brought up to date by running the ones they lack, in order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL CHECK (status IN ('pending','running','completed','failed','cancelled')),
        priority INTEGER NOT NULL DEFAULT 0,
        spec TEXT NOT NULL,
        base_key TEXT NOT NULL,
        max_retries INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        epoch INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_host TEXT,
        lease_pid INTEGER,
        lease_expires REAL,
        not_before REAL NOT NULL DEFAULT 0,
        progress_step INTEGER,
        progress_total INTEGER,
        train_loss REAL,
        eval_loss REAL,
        base_eval_loss REAL,
        error_kind TEXT,
        error TEXT,
        verdict TEXT,
        result TEXT,
        dataset_sha256 TEXT,
        queue_file TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX jobs_claim ON jobs (status, priority DESC, id);
    CREATE TABLE attempts (
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        n INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        worker TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        outcome TEXT,
        error_kind TEXT,
        reason TEXT,
        traceback TEXT,
        resumed_from_step INTEGER,
        last_step INTEGER,
        counted INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (job_id, n)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        job_id INTEGER REFERENCES jobs (id),
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT,
        reason TEXT
    );
    CREATE INDEX events_job ON events (job_id, id);
    CREATE TABLE metrics (
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        attempt INTEGER NOT NULL,
        step INTEGER NOT NULL,
        name TEXT NOT NULL,
        value REAL NOT NULL,
        ts REAL NOT NULL
    );
    CREATE INDEX metrics_job ON metrics (job_id, attempt, step);
    CREATE TABLE queue_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: what each attempt leaves behind: the newest checkpoint it wrote, and
    # whether its failure was retryable (``loraq show`` says which, and why)
    """
    ALTER TABLE attempts ADD COLUMN checkpoint_step INTEGER;
    ALTER TABLE attempts ADD COLUMN retryable INTEGER;
    """,
    # 3: a change sequence for readers that follow the queue live (``loraq serve``).
    # Every insert, and every update of a column a person sees, gives the job the next
    # ``seq``; heartbeats (lease_expires, updated_at) do not. Writers are serialised, so
    # seq grows in commit order, and "what changed since N" is an index range, never a
    # scan of every job. Unlike ``updated_at`` it does not depend on clocks agreeing.
    """
    ALTER TABLE jobs ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET seq = id;
    CREATE INDEX jobs_seq ON jobs (seq);
    CREATE TRIGGER jobs_seq_insert AFTER INSERT ON jobs BEGIN
        UPDATE jobs SET seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs) WHERE id = NEW.id;
    END;
    CREATE TRIGGER jobs_seq_update
    AFTER UPDATE OF name, status, priority, attempts, progress_step, progress_total, train_loss, eval_loss,
                    base_eval_loss, error_kind, error, verdict, result, finished_at ON jobs BEGIN
        UPDATE jobs SET seq = (SELECT MAX(seq) FROM jobs) + 1 WHERE id = NEW.id;
    END;
    """,
    # 4: the home's identity, written once when the database is made (or upgraded). An
    # adapter folder's manifest names it, so an adapter copied in from another home, where
    # job ids restart at 1 too, is never taken for this home's work.
    """
    INSERT OR IGNORE INTO queue_state (key, value) VALUES ('home_id', lower(hex(randomblob(16))));
    """,
    # 5: dependencies (``after: <job>``): a job is claimed only once every job it waits on
    # has completed (queue/dependencies.py). A row per edge, so a listing or a claim finds a
    # job's dependencies by its id, and a finished job its dependents by theirs.
    """
    CREATE TABLE dependencies (
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        after_id INTEGER NOT NULL REFERENCES jobs (id),
        PRIMARY KEY (job_id, after_id)
    );
    CREATE INDEX dependencies_after ON dependencies (after_id);
    """,
)


def statements(script: str) -> Iterator[str]:
    """The SQL statements of one migration, in order (a trigger's body stays whole)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending.strip()
            pending = ""
    if pending.strip(" \n;"):
        raise ValueError(f"incomplete SQL statement in a migration: {pending.strip()[:80]!r}")
