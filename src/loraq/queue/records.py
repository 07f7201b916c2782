"""What the store holds: job states, the lifecycle, and the records it hands out.

Standard library only, like the store.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import uuid
from dataclasses import dataclass
from typing import Any

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = "pending", "running", "completed", "failed", "cancelled"
STATES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED)

#: The lifecycle (DESIGN.md). Nothing else is allowed.
TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        (PENDING, RUNNING),  # claim
        (RUNNING, COMPLETED),  # trained, inspected, published
        (RUNNING, FAILED),  # permanent error, inspection failed, or no attempts left
        (RUNNING, PENDING),  # retryable error, lease expired, graceful stop
        (PENDING, CANCELLED),
        (PENDING, FAILED),  # the job it waits on (after:) failed or was cancelled: it never ran
        (RUNNING, CANCELLED),
        (FAILED, PENDING),  # retry
        (CANCELLED, PENDING),  # retry
    }
)

# Outcomes of one attempt (attempts.outcome).
OUTCOME_COMPLETED = "completed"
OUTCOME_FAILED = "failed"  # the job failed for good
OUTCOME_RETRY = "retry"  # failed, will be retried
OUTCOME_STOPPED = "stopped"  # graceful stop, does not use an attempt
OUTCOME_CANCELLED = "cancelled"
OUTCOME_ROUND = "round"  # a halving sweep's round ended (queue/halving.py): not published, not counted


@dataclass(frozen=True)
class WorkerId:
    host: str
    pid: int
    token: str

    @classmethod
    def current(cls) -> WorkerId:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8])

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"


@dataclass(frozen=True)
class NewJob:
    """What ``enqueue`` needs to add a job."""

    name: str
    spec: dict[str, Any]
    base_key: str
    priority: int = 0
    max_retries: int = 2
    dataset_sha256: str | None = None
    queue_file: str | None = None
    after: str | None = None  # the name of the job this one waits on (``after:``): in the same enqueue, or stored


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    status: str
    priority: int
    spec: dict[str, Any]
    base_key: str
    max_retries: int
    attempts: int
    epoch: int
    lease_owner: str | None
    lease_host: str | None
    lease_pid: int | None
    lease_expires: float | None
    not_before: float
    progress_step: int | None
    progress_total: int | None
    train_loss: float | None
    eval_loss: float | None
    base_eval_loss: float | None
    error_kind: str | None
    error: str | None
    verdict: str | None
    result: dict[str, Any] | None
    dataset_sha256: str | None
    queue_file: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    seq: int = 0  # grows on every visible change (migration 3): what live readers follow

    @property
    def attempts_left(self) -> int:
        return self.max_retries + 1 - self.attempts

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["spec"] = json.loads(data["spec"])
        data["result"] = json.loads(data["result"]) if data["result"] else None
        return cls(**data)


@dataclass(frozen=True)
class Claim:
    """A job handed to a worker: the attempt number and the fencing epoch it holds."""

    job: Job
    attempt: int
    epoch: int


@dataclass(frozen=True)
class Attempt:
    job_id: int
    n: int
    epoch: int
    worker: str
    started_at: float
    ended_at: float | None
    outcome: str | None
    error_kind: str | None
    reason: str | None
    traceback: str | None
    resumed_from_step: int | None
    last_step: int | None
    counted: int
    checkpoint_step: int | None = None  # the newest checkpoint this attempt wrote (as far as the store knows)
    retryable: int | None = None  # for a failed attempt: 1 retryable, 0 permanent


@dataclass(frozen=True)
class Event:
    id: int
    job_id: int | None
    ts: float
    actor: str
    from_state: str | None
    to_state: str | None
    reason: str | None


@dataclass(frozen=True)
class QueueState:
    paused: bool
    pause_reason: str | None
    consecutive_failures: int
    pause_after_failures: int | None
    retry_backoff_s: float
    pause_after_internal_errors: int = 3  # jobs failing in a row with the same internal error; 0: never
