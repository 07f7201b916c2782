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
    # 6: successive halving's rounds as state (queue/rounds.py), no longer a second state
    # machine inside the spec JSON with a sentinel ``not_before``. A row per member says the
    # round it is in and where it stands; a row per decided round holds its verdicts (it is
    # made once). A job waiting for its round stays pending with ``not_before`` 0: the claim
    # passes it over by its member row. The plan itself (configs, budget, steps, sweep id)
    # stays in the spec: it never changes. Rounds already in a home move here intact.
    """
    CREATE TABLE halving_members (
        job_id INTEGER PRIMARY KEY REFERENCES jobs (id),
        sweep TEXT NOT NULL,
        round INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('training','waiting','pruned','retried')),
        eval_loss REAL,
        metric TEXT,
        score REAL,
        why TEXT,
        history TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX halving_members_round ON halving_members (sweep, round);
    CREATE TABLE halving_rounds (
        sweep TEXT NOT NULL,
        round INTEGER NOT NULL,
        verdicts TEXT NOT NULL,
        PRIMARY KEY (sweep, round)
    );
    INSERT INTO halving_members (job_id, sweep, round, state, eval_loss, metric, score, why, history)
        SELECT id, COALESCE(json_extract(spec, '$.halving.sweep'), json_extract(spec, '$.spec.group')),
               COALESCE(json_extract(spec, '$.halving.round'), 1), COALESCE(json_extract(spec, '$.halving.state'), 'training'),
               json_extract(spec, '$.halving.eval_loss'), json_extract(spec, '$.halving.metric'),
               json_extract(spec, '$.halving.score'), json_extract(spec, '$.halving.why'),
               COALESCE(json_extract(spec, '$.halving.history'), '[]')
        FROM jobs WHERE json_type(spec, '$.halving') = 'object'
          AND COALESCE(json_extract(spec, '$.halving.sweep'), json_extract(spec, '$.spec.group')) IS NOT NULL;
    INSERT INTO halving_rounds (sweep, round, verdicts)
        SELECT s.sweep, CAST(substr(q.key, length(s.prefix) + 1) AS INTEGER), q.value
        FROM queue_state q JOIN (SELECT DISTINCT sweep, 'halving:' || sweep || ':' AS prefix FROM halving_members) s
          ON substr(q.key, 1, length(s.prefix)) = s.prefix;
    DELETE FROM queue_state WHERE key IN (
        SELECT q.key FROM queue_state q JOIN (SELECT DISTINCT 'halving:' || sweep || ':' AS prefix FROM halving_members) s
          ON substr(q.key, 1, length(s.prefix)) = s.prefix);
    UPDATE jobs SET not_before = 0 WHERE not_before >= 9.0e15;
    UPDATE jobs SET spec = json_remove(spec, '$.halving.round', '$.halving.state', '$.halving.history',
                                       '$.halving.eval_loss', '$.halving.metric', '$.halving.score', '$.halving.why')
        WHERE json_type(spec, '$.halving') = 'object';
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
