"""What the worker tells its observer while it works the queue: one frozen dataclass per kind.

The worker calls ``observer(event)`` with one of these (:data:`RunEvent`); the CLI's
progress display and tests dispatch on the class with ``match``. Events about a job
carry its ``name``; the trainer's own typed events ride along where the observer
needs them (``JobStarted.event``, ``JobProgress.event``, ``Completed.result``).
Torch-free: the CLI imports these through :mod:`loraq.api`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from ..protocol import OomAdjusted, Progress, Started, TrainResult


class RunEventKind(str, enum.Enum):
    """Each event's kind, as a word (what a log line or a test names it by)."""

    STOPPING = "stopping"
    STOPPING_NOW = "stopping_now"
    LEASE_EXPIRED = "lease_expired"
    FAULT = "fault"
    FAULT_CLEARED = "fault_cleared"
    FAILED = "failed"
    RECOVERED = "recovered"
    CLAIMED = "claimed"
    LOST = "lost"
    STARTED = "started"
    PROGRESS = "progress"
    OOM_ADJUSTED = "oom_adjusted"
    STOPPED = "stopped"
    RECYCLED = "recycled"
    STALLED = "stalled"
    COMPLETED = "completed"
    ROUND_ENDED = "round_ended"
    RECLAIMED = "reclaimed"

    def __str__(self) -> str:
        return str(self.value)


# ---------------------------------------------------------------- the worker and the queue


@dataclass(frozen=True, kw_only=True)
class Stopping:
    """The first SIGINT/SIGTERM: every trainer is asked to checkpoint and stop."""

    kind: ClassVar[RunEventKind] = RunEventKind.STOPPING
    signal: str  # its name, e.g. "SIGINT"
    running: int  # jobs running when it came


@dataclass(frozen=True, kw_only=True)
class StoppingNow:
    """A second signal: trainers are killed, their jobs go back to the queue uncounted."""

    kind: ClassVar[RunEventKind] = RunEventKind.STOPPING_NOW
    signal: str


@dataclass(frozen=True, kw_only=True)
class LeaseExpired:
    """A sweep found a job whose lease ran out (its worker is gone or frozen): it is back in the queue."""

    kind: ClassVar[RunEventKind] = RunEventKind.LEASE_EXPIRED
    job_id: int


@dataclass(frozen=True, kw_only=True)
class Reclaimed:
    """On start: a job leased by a dead process on this host went back to the queue."""

    kind: ClassVar[RunEventKind] = RunEventKind.RECLAIMED
    job_id: int


@dataclass(frozen=True, kw_only=True)
class Fault:
    """The state database cannot be written: nothing new is claimed, writes are retried with back-off."""

    kind: ClassVar[RunEventKind] = RunEventKind.FAULT
    reason: str


@dataclass(frozen=True, kw_only=True)
class FaultCleared:
    """A store write held back by a fault went through (``done`` says which)."""

    kind: ClassVar[RunEventKind] = RunEventKind.FAULT_CLEARED
    done: str


@dataclass(frozen=True, kw_only=True)
class Recycled:
    """A trainer grew past its first job's memory by more than the limit: it is replaced."""

    kind: ClassVar[RunEventKind] = RunEventKind.RECYCLED
    slot: str
    rss_mb: float
    baseline_mb: float | None


# ---------------------------------------------------------------- one job


@dataclass(frozen=True, kw_only=True)
class Claimed:
    """A job was claimed and handed to a trainer slot."""

    kind: ClassVar[RunEventKind] = RunEventKind.CLAIMED
    name: str
    job_id: int
    attempt: int
    slot: str
    resume_step: int | None  # the checkpoint the attempt resumes from; None: from step 0


@dataclass(frozen=True, kw_only=True)
class JobStarted:
    """The trainer prepared the job's data and evaluated the base; training starts."""

    kind: ClassVar[RunEventKind] = RunEventKind.STARTED
    name: str
    event: Started


@dataclass(frozen=True, kw_only=True)
class JobProgress:
    """The trainer logged metrics at a step."""

    kind: ClassVar[RunEventKind] = RunEventKind.PROGRESS
    name: str
    event: Progress


@dataclass(frozen=True, kw_only=True)
class JobOomAdjusted:
    """Out of memory: the job goes on with smaller micro-batches; ``line`` says how, as the store records it."""

    kind: ClassVar[RunEventKind] = RunEventKind.OOM_ADJUSTED
    name: str
    event: OomAdjusted
    line: str


@dataclass(frozen=True, kw_only=True)
class JobStopped:
    """The trainer stopped gracefully after a checkpoint: the job is back in the queue, no attempt used."""

    kind: ClassVar[RunEventKind] = RunEventKind.STOPPED
    name: str
    step: int


@dataclass(frozen=True, kw_only=True)
class JobFailed:
    """An attempt failed: ``final`` if the job failed for good, else it will be retried."""

    kind: ClassVar[RunEventKind] = RunEventKind.FAILED
    name: str
    failure: str | None  # a FailureKind's value, as the store records it
    reason: str | None
    final: bool


@dataclass(frozen=True, kw_only=True)
class Completed:
    """The adapter passed inspection and was published to ``adapter``."""

    kind: ClassVar[RunEventKind] = RunEventKind.COMPLETED
    name: str
    adapter: str
    result: TrainResult


@dataclass(frozen=True, kw_only=True)
class RoundEnded:
    """A job of a halving sweep reached its round's steps and waits for the round's decision."""

    kind: ClassVar[RunEventKind] = RunEventKind.ROUND_ENDED
    name: str
    round: int | None
    steps: int
    eval_loss: float | None


@dataclass(frozen=True, kw_only=True)
class Recovered:
    """An adapter published by a killed predecessor was recognised and its job completed."""

    kind: ClassVar[RunEventKind] = RunEventKind.RECOVERED
    name: str
    job_id: int


@dataclass(frozen=True, kw_only=True)
class Lost:
    """This worker no longer owns the job (cancelled, or its lease was taken over): nothing of it is kept."""

    kind: ClassVar[RunEventKind] = RunEventKind.LOST
    name: str
    why: str


@dataclass(frozen=True, kw_only=True)
class Stalled:
    """The job's trainer was silent past the stall timeout: it is killed and the job retried."""

    kind: ClassVar[RunEventKind] = RunEventKind.STALLED
    name: str


RunEvent: TypeAlias = (
    Stopping | StoppingNow | LeaseExpired | Reclaimed | Fault | FaultCleared | Recycled | Claimed | JobStarted
    | JobProgress | JobOomAdjusted | JobStopped | JobFailed | Completed | RoundEnded | Recovered | Lost | Stalled
)

#: Told what the worker does, one event at a time, on the worker's thread.
Observer: TypeAlias = Callable[[RunEvent], None]
