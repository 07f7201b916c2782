"""What the /v1 API keeps beside the queue: keys, uploaded files and who owns which job (``<home>/api.db``).

The jobs themselves live in the queue's store like any other; this file only says
which key created which job, file and fine-tuned model, and what the OpenAI request
asked for (model name, suffix, metadata). Keys are stored as SHA-256 hashes: a key
is 32 random bytes, so a hash without salt is as strong as the key itself.

Standard library only, like the queue's store.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import NotFoundError, TransitionError, UsageError
from ..queue.spec import NAME_PATTERN

FILE_NAME = "api.db"
KEY_PREFIX = "lq-"
#: The operator (the dashboard's token): sees and acts on everything.
OPERATOR = 0

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS keys (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        revoked_at REAL
    )""",
    """
    CREATE TABLE IF NOT EXISTS files (
        n INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        key_id INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        purpose TEXT NOT NULL,
        format TEXT NOT NULL,
        kind TEXT NOT NULL,
        rows INTEGER NOT NULL,
        created_at REAL NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS files_key ON files (key_id, n)",
    """
    CREATE TABLE IF NOT EXISTS jobs (
        n INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        job_id INTEGER NOT NULL UNIQUE,
        key_id INTEGER NOT NULL,
        model TEXT NOT NULL,
        suffix TEXT,
        metadata TEXT,
        training_file TEXT NOT NULL,
        validation_file TEXT,
        seed INTEGER NOT NULL,
        request TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_key ON jobs (key_id, n)",
    # a job being created holds its files' content from the moment they are looked up until the job is recorded
    """
    CREATE TABLE IF NOT EXISTS holds (
        hold TEXT NOT NULL,
        file_id TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        kind TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS holds_content ON holds (sha256, kind)",
)
#: A hold older than this is a create cut off by a crash (a create takes seconds): it no longer keeps content.
HOLD_S = 3600.0


@dataclass(frozen=True)
class Key:
    id: int
    name: str
    created_at: float
    revoked_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "created_at": self.created_at, "revoked": self.revoked_at is not None,
                "revoked_at": self.revoked_at}


@dataclass(frozen=True)
class StoredFile:
    id: str
    key_id: int
    sha256: str
    filename: str
    bytes: int
    purpose: str
    format: str
    kind: str  # how it is stored: jsonl | json | csv | parquet
    rows: int
    created_at: float

    @property
    def blob(self) -> str:
        """Its content's name in ``<home>/files/``."""
        return f"{self.sha256}.{self.kind}"


@dataclass(frozen=True)
class ApiJob:
    """An API job: the queue job it is (``job_id``), and what the request asked for."""

    n: int
    id: str
    job_id: int
    key_id: int
    model: str
    suffix: str | None
    metadata: dict[str, str] | None
    training_file: str
    validation_file: str | None
    seed: int
    request: dict[str, Any]
    paused: bool
    created_at: float


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    """One caller at a time on the shared connection (the server's threads share it)."""

    def wrapper(self: ApiState, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper  # type: ignore[return-value]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", errors="replace")).hexdigest()


class ApiState:
    """``<home>/api.db``: one connection, short transactions (WAL, a busy timeout)."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        self.path = path
        self.clock = clock
        self.lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA busy_timeout=30000")
        with self.transaction() as conn:
            for statement in SCHEMA:
                conn.execute(statement)

    @classmethod
    def of_home(cls, root: Path) -> ApiState:
        return cls(root / FILE_NAME)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ApiState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------ keys

    @_locked
    def create_key(self, name: str) -> str:
        """A new key named ``name``, returned once; only its hash is kept."""
        if not NAME_PATTERN.fullmatch(name):
            raise UsageError(f"key name {name!r}: must be 1-100 characters of [A-Za-z0-9._-]")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM keys WHERE name = ?", (name,)).fetchone():
                raise TransitionError(f"a key named {name!r} already exists; revoke it first or choose another name")
            conn.execute("INSERT INTO keys (name, hash, created_at) VALUES (?, ?, ?)", (name, hash_key(key), self.clock()))
        return key

    @_locked
    def keys(self) -> list[Key]:
        return [Key(r["id"], r["name"], r["created_at"], r["revoked_at"])
                for r in self.conn.execute("SELECT * FROM keys ORDER BY id")]

    @_locked
    def revoke_key(self, name: str) -> Key:
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM keys WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFoundError(f"no key named {name!r}")
            if row["revoked_at"] is None:
                conn.execute("UPDATE keys SET revoked_at = ? WHERE id = ?", (self.clock(), row["id"]))
        return next(k for k in self.keys() if k.name == name)

    @_locked
    def key_for(self, given: str) -> Key | None:
        """The live key that ``given`` is, or ``None``."""
        row = self.conn.execute("SELECT * FROM keys WHERE hash = ? AND revoked_at IS NULL", (hash_key(given),)).fetchone()
        return Key(row["id"], row["name"], row["created_at"], row["revoked_at"]) if row else None

    # ------------------------------------------------------------ files

    @_locked
    def add_file(self, *, key_id: int, sha256: str, filename: str, size: int, purpose: str, fmt: str, kind: str,
                 rows: int) -> StoredFile:
        file_id = "file-" + secrets.token_hex(12)
        now = self.clock()
        with self.transaction() as conn:
            conn.execute("INSERT INTO files (id, key_id, sha256, filename, bytes, purpose, format, kind, rows, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (file_id, key_id, sha256, filename, size, purpose, fmt,
                                                                   kind, rows, now))
        return StoredFile(file_id, key_id, sha256, filename, size, purpose, fmt, kind, rows, now)

    @_locked
    def file(self, file_id: str, key_id: int) -> StoredFile:
        """A file this key may see (the operator: any); another key's answers as if it did not exist."""
        row = self.conn.execute("SELECT * FROM files WHERE id = ? AND deleted = 0", (file_id,)).fetchone()
        if row is None or (key_id != OPERATOR and row["key_id"] != key_id):
            raise NotFoundError(f"No such File object: {file_id}")
        return _file(row)

    @_locked
    def files(self, key_id: int, *, after: str | None, limit: int, purpose: str | None) -> tuple[list[StoredFile], bool]:
        where: list[str] = ["deleted = 0"]
        args: list[Any] = []
        if key_id != OPERATOR:
            where.append("key_id = ?")
            args.append(key_id)
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            where.append("n < (SELECT n FROM files WHERE id = ?)")
            args.append(after)
        rows = self.conn.execute(f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY n DESC LIMIT ?",
                                 (*args, limit + 1)).fetchall()
        return [_file(r) for r in rows[:limit]], len(rows) > limit

    @_locked
    def delete_file(self, file_id: str, key_id: int) -> StoredFile:
        stored = self.file(file_id, key_id)
        with self.transaction() as conn:
            conn.execute("UPDATE files SET deleted = 1 WHERE id = ?", (file_id,))
        return stored

    @_locked
    def hold_file(self, hold: str, file_id: str, key_id: int) -> StoredFile:
        """A file as :meth:`file` finds it, its content held under ``hold`` in the same transaction.

        A delete of the file from then on leaves its content in the home (:meth:`unheld_blobs`)
        until :meth:`release`: a job being created reads it, and is recorded after.
        """
        with self.transaction() as conn:
            stored = self.file(file_id, key_id)
            conn.execute("INSERT INTO holds (hold, file_id, sha256, kind, created_at) VALUES (?, ?, ?, ?, ?)",
                         (hold, stored.id, stored.sha256, stored.kind, self.clock()))
        return stored

    @_locked
    def release(self, hold: str) -> bool:
        """Drop the holds of ``hold``; whether a file they held was deleted meanwhile (its content may be unneeded)."""
        with self.transaction() as conn:
            deleted = conn.execute("SELECT 1 FROM holds h JOIN files f ON f.id = h.file_id "
                                   "WHERE h.hold = ? AND f.deleted = 1", (hold,)).fetchone()
            conn.execute("DELETE FROM holds WHERE hold = ?", (hold,))
        return deleted is not None

    @_locked
    def unheld_blobs(self) -> list[tuple[str, list[int]]]:
        """Each stored content (``StoredFile.blob``) that only deleted files name and no job being created holds,
        with the loraq jobs trained on it."""
        rows = self.conn.execute(
            "SELECT DISTINCT d.sha256, d.kind FROM files d WHERE d.deleted = 1 AND NOT EXISTS "
            "(SELECT 1 FROM files l WHERE l.sha256 = d.sha256 AND l.kind = d.kind AND l.deleted = 0) AND NOT EXISTS "
            "(SELECT 1 FROM holds h WHERE h.sha256 = d.sha256 AND h.kind = d.kind AND h.created_at > ?)",
            (self.clock() - HOLD_S,)).fetchall()
        out = []
        for row in rows:
            jobs = self.conn.execute(
                "SELECT j.job_id FROM jobs j JOIN files f ON f.id IN (j.training_file, j.validation_file) "
                "WHERE f.sha256 = ? AND f.kind = ?", (row["sha256"], row["kind"])).fetchall()
            out.append((f"{row['sha256']}.{row['kind']}", [int(j["job_id"]) for j in jobs]))
        return out

    # ------------------------------------------------------------ jobs

    @_locked
    def add_job(self, *, api_id: str, job_id: int, key_id: int, model: str, suffix: str | None,
                metadata: dict[str, str] | None, training_file: str, validation_file: str | None, seed: int,
                request: dict[str, Any]) -> ApiJob:
        now = self.clock()
        with self.transaction() as conn:
            conn.execute("INSERT INTO jobs (id, job_id, key_id, model, suffix, metadata, training_file, validation_file, "
                         "seed, request, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (api_id, job_id, key_id, model, suffix, json.dumps(metadata) if metadata is not None else None,
                          training_file, validation_file, seed, json.dumps(request), now))
        return self.job(api_id, OPERATOR)

    @_locked
    def job(self, api_id: str, key_id: int) -> ApiJob:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (api_id,)).fetchone()
        if row is None or (key_id != OPERATOR and row["key_id"] != key_id):
            raise NotFoundError(f"No such fine-tuning job: {api_id}")
        return _job(row)

    @_locked
    def jobs(self, key_id: int, *, after: str | None, limit: int,
             metadata: dict[str, str] | None = None, null_metadata: bool = False) -> tuple[list[ApiJob], bool]:
        """A page of this key's jobs, newest first, after the job ``after``; and whether more follow."""
        where: list[str] = []
        args: list[Any] = []
        if key_id != OPERATOR:
            where.append("key_id = ?")
            args.append(key_id)
        if after:
            where.append("n < COALESCE((SELECT n FROM jobs WHERE id = ?), -1)")
            args.append(after)
        if null_metadata:
            where.append("metadata IS NULL")
        for name, value in (metadata or {}).items():
            where.append("json_extract(metadata, ?) = ?")
            args.extend([f'$."{name}"', value])
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY n DESC LIMIT ?"
        rows = self.conn.execute(sql, (*args, limit + 1)).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    @_locked
    def job_of_model(self, api_id: str) -> ApiJob | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (api_id,)).fetchone()
        return _job(row) if row else None

    @_locked
    def set_paused(self, api_id: str, paused: bool) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE jobs SET paused = ? WHERE id = ?", (int(paused), api_id))


def _file(row: sqlite3.Row) -> StoredFile:
    return StoredFile(row["id"], row["key_id"], row["sha256"], row["filename"], row["bytes"], row["purpose"],
                      row["format"], row["kind"], row["rows"], row["created_at"])


def _job(row: sqlite3.Row) -> ApiJob:
    return ApiJob(row["n"], row["id"], row["job_id"], row["key_id"], row["model"], row["suffix"],
                  json.loads(row["metadata"]) if row["metadata"] is not None else None, row["training_file"],
                  row["validation_file"], row["seed"], json.loads(row["request"]), bool(row["paused"]),
                  row["created_at"])
