"""What the commands that only read return: ``status``, the dashboard's queue page, ``show`` and logs.

Every read here goes through a read-only store (:func:`open_reader`: SQLite
``mode=ro``), which never creates, migrates or writes the database, so these work
on a home that cannot be written and never queue behind a worker. Torch-free.
:mod:`loraq.api` exports all of it, with the commands that write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NotFoundError
from .queue.dependencies import Dependency
from .queue.records import HALVING_KIND, Attempt, Event, Job, QueueState
from .queue.store import Store
from .supervisor import publish
from .workspace import Home


def store_exists(home: Home) -> bool:
    """Whether the home has a state database (a symlink or a damaged file counts: opening it says what is wrong)."""
    return home.db_path.exists() or home.db_path.is_symlink()


def open_reader(home: Home) -> Store:
    """A read-only store (SQLite ``mode=ro``): never creates the database, never writes it."""
    if not store_exists(home):
        raise NotFoundError(f"{home.root}: no loraq state here (no jobs submitted; see 'loraq submit')")
    return Store.open(home.db_path, readonly=True)


# ---------------------------------------------------------------- status and show


@dataclass(frozen=True)
class JobRow:
    id: int
    name: str
    status: str
    attempts: int
    max_attempts: int
    priority: int
    step: int | None
    total_steps: int | None
    train_loss: float | None
    eval_loss: float | None
    base_eval_loss: float | None
    verdict: str | None
    error_kind: str | None
    error: str | None
    adapter: str | None
    group: str | None = None  # the sweep a job belongs to (``spec.group``), if any
    seq: int = 0  # the store's change sequence when this row was read (live readers order updates by it)
    exact_match: float | None = None  # validation.metrics: [exact_match], the adapter's and the base's
    base_exact_match: float | None = None
    preference_accuracy: float | None = None  # a preference job's held-out pairs (issue 23), adapter and base
    base_preference_accuracy: float | None = None
    after: str | None = None  # the job this one waits on (``after:``), and its status now
    after_status: str | None = None
    #: The graders and the judge (``validation.metrics``, issue 24) besides exact match and preference accuracy:
    #: name -> (base, adapter).
    graded: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    @property
    def round_note(self) -> str | None:
        """For a job of a halving sweep: the round it is in, or why it was pruned."""
        return self.error if self.error_kind == HALVING_KIND else None

    @property
    def waiting_on(self) -> str | None:
        """The job this pending job waits for (``after:``) while that one has not completed."""
        if self.status == "pending" and self.after is not None and self.after_status not in (None, "completed"):
            return self.after
        return None

    @classmethod
    def of(cls, job: Job, dependency: Dependency | None = None) -> JobRow:
        return cls(
            id=job.id, name=job.name, status=job.status, attempts=job.attempts, max_attempts=job.max_retries + 1,
            priority=job.priority, step=job.progress_step, total_steps=job.progress_total,
            train_loss=job.train_loss, eval_loss=job.eval_loss, base_eval_loss=job.base_eval_loss,
            verdict=job.verdict, error_kind=job.error_kind, error=job.error,
            adapter=(job.result or {}).get("adapter"), group=job.spec.settings.group,
            seq=job.seq, exact_match=_metric(job.result, "exact_match"),
            base_exact_match=_metric(job.result, "base_exact_match"),
            preference_accuracy=_metric(job.result, "preference_accuracy"),
            base_preference_accuracy=_metric(job.result, "base_preference_accuracy"),
            after=dependency.name if dependency else job.spec.settings.after,
            after_status=dependency.status if dependency else None,
            graded=_graded((job.result or {}).get("metrics")),
        )

    @classmethod
    def of_listing(cls, row: dict[str, Any]) -> JobRow:
        """From a row of :meth:`Store.listing` (what ``status`` reads): its metrics are one JSON object."""
        result = {"metrics": json.loads(row["metrics_json"])} if row.get("metrics_json") else None
        return cls(
            id=row["id"], name=row["name"], status=row["status"], attempts=row["attempts"],
            max_attempts=row["max_retries"] + 1, priority=row["priority"], step=row["progress_step"],
            total_steps=row["progress_total"], train_loss=row["train_loss"], eval_loss=row["eval_loss"],
            base_eval_loss=row["base_eval_loss"], verdict=row["verdict"], error_kind=row["error_kind"],
            error=row["error"], adapter=row["adapter"], group=row.get("grp"), seq=row.get("seq", 0),
            exact_match=_metric(result, "exact_match"), base_exact_match=_metric(result, "base_exact_match"),
            preference_accuracy=_metric(result, "preference_accuracy"),
            base_preference_accuracy=_metric(result, "base_preference_accuracy"),
            after=row.get("after_name"), after_status=row.get("after_status"),
            graded=_graded((result or {}).get("metrics")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "status": self.status, "attempts": self.attempts,
            "max_attempts": self.max_attempts, "priority": self.priority,
            "progress": {"step": self.step, "total": self.total_steps},
            "train_loss": self.train_loss, "eval_loss": self.eval_loss, "base_eval_loss": self.base_eval_loss,
            "verdict": self.verdict, "error_kind": self.error_kind, "error": self.error, "adapter": self.adapter,
            "group": self.group, "exact_match": self.exact_match, "base_exact_match": self.base_exact_match,
            "preference_accuracy": self.preference_accuracy, "base_preference_accuracy": self.base_preference_accuracy,
            "after": self.after, "waiting_on": self.waiting_on,
            "graded": {name: {"base": base, "adapter": adapter} for name, (base, adapter) in self.graded.items()},
        }


#: Metrics a job's result holds with a ``base_`` twin that have columns of their own, or are no grader.
_NOT_GRADERS = frozenset({"exact_match", "preference_accuracy", "eval_loss", "train_loss"})


def _graded(metrics: object) -> dict[str, tuple[float | None, float | None]]:
    """The graders' scores in a result's metrics (those that have a ``base_`` twin), by name: (base, adapter)."""
    if not isinstance(metrics, dict):
        return {}
    out = {}
    for name in sorted(metrics):
        if isinstance(name, str) and not name.startswith("base_") and name not in _NOT_GRADERS \
                and f"base_{name}" in metrics:
            out[name] = (_number(metrics.get(f"base_{name}")), _number(metrics.get(name)))
    return out


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metric(result: dict[str, Any] | None, name: str) -> float | None:
    return _number(((result or {}).get("metrics") or {}).get(name))


@dataclass(frozen=True)
class StatusResult:
    jobs: list[JobRow]
    queue: QueueState | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"jobs": [row.to_json() for row in self.jobs]}
        if self.queue is not None and self.queue.paused:
            out["queue"] = {"paused": True, "reason": self.queue.pause_reason}
        return out


def status(home: Home) -> StatusResult:
    if not store_exists(home):
        return StatusResult([], None)
    with open_reader(home) as store:
        return StatusResult([JobRow.of_listing(row) for row in store.listing()], store.queue_state())


@dataclass(frozen=True)
class QueuePage:
    """One page of the queue (the dashboard's queue page): a slice of the jobs and the totals."""

    jobs: list[JobRow]
    total: int  # jobs matching the filter
    offset: int
    limit: int
    counts: dict[str, int]  # every job, by status
    groups: dict[str, dict[str, int]]  # sweep -> {status: count}
    queue: QueueState | None
    seq: int  # the newest change this page shows (see Store.changed_since)


def queue_page(home: Home, *, status: str | None = None, group: str | None = None, offset: int = 0,
               limit: int = 100) -> QueuePage:
    """A page of ``status``, read in one snapshot, at a cost that does not grow with the queue's length."""
    from .queue.records import STATES

    if not store_exists(home):
        return QueuePage([], 0, offset, limit, {k: 0 for k in STATES}, {}, None, 0)
    with open_reader(home) as store, store.snapshot():
        rows = store.listing(status=status, group=group, offset=offset, limit=limit)
        return QueuePage([JobRow.of_listing(row) for row in rows], store.listing_count(status=status, group=group),
                         offset, limit, store.counts(), store.groups(), store.queue_state(), store.max_seq())


@dataclass(frozen=True)
class ShowResult:
    job: Job
    attempts: list[Attempt]
    events: list[Event]
    metrics: list[dict[str, Any]]
    inspection: dict[str, Any] | None
    log_path: str | None
    dependencies: list[Dependency] = field(default_factory=list)  # the jobs it waits on (after:), status now

    @property
    def row(self) -> JobRow:
        return JobRow.of(self.job, self.dependencies[0] if self.dependencies else None)

    def spec_json(self) -> dict[str, Any]:
        """The job as stored, with a halving member's round and state in its plan, as ``show --json`` always had."""
        halving = self.job.halving
        return self.job.spec.doc | ({"halving": halving.as_json()} if halving is not None else {})

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "job": self.row.to_json() | {"spec": self.spec_json(), "result": self.job.result,
                                                    "created_at": self.job.created_at, "started_at": self.job.started_at,
                                                    "finished_at": self.job.finished_at, "dataset_sha256": self.job.dataset_sha256},
            "attempts": [asdict(a) for a in self.attempts],
            "events": [asdict(e) for e in self.events],
            "metrics": self.metrics,
            "inspection": self.inspection,
            "log": self.log_path,
        }


def control_lines(job: Job) -> list[str]:
    """What loraq chose for a job, for people: its sweep, resolved ``auto`` values, OOM adjustments, why it stopped."""
    from .queue import controls

    return controls.control_lines(job)


def describe_halving(plan: dict[str, Any]) -> str:
    """A halving sweep's rounds and their step budgets, for people (``--dry-run``)."""
    from .queue import halving

    return halving.describe(plan)


def adjustment_line(record: dict[str, Any]) -> str:
    """One OOM adjustment (an ``oom_adjusted`` event as JSON), for people."""
    from .queue import controls

    return controls.adjustment_line(record)


def show(home: Home, ref: str) -> ShowResult:
    with open_reader(home) as store, store.snapshot():
        job = store.job(ref)
        attempts = store.attempts(job.id)
        inspection = publish.job_inspection(home, job)
        log = newest_log(home, job.id, attempts)
        return ShowResult(job, attempts, store.events(job.id), store.metrics(job.id), inspection, str(log) if log else None,
                          store.dependencies_of(job.id))


def newest_log(home: Home, job_id: int, attempts: list[Attempt]) -> Path | None:
    for attempt in reversed(attempts):
        path = home.attempt_dir(job_id, attempt.n) / "train.log"
        if path.exists():
            return path
    return None


def log_path(home: Home, ref: str, attempt: int | None = None) -> Path:
    with open_reader(home) as store:
        job = store.job(ref)
        attempts = store.attempts(job.id)
    if attempt is not None:
        path = home.attempt_dir(job.id, attempt) / "train.log"
        if not path.exists():
            raise NotFoundError(f"job {job.name!r} has no log for attempt {attempt}")
        return path
    newest = newest_log(home, job.id, attempts)
    if newest is None:
        raise NotFoundError(f"job {job.name!r} has no training log yet ({job.status})")
    return newest



# ---------------------------------------------------------------- logs


def follow_log(home: Home, ref: str, attempt: int | None = None, *, follow: bool = False, poll_s: float = 0.5,
               sleep: Callable[[float], None] = time.sleep) -> Iterator[bytes]:
    """The training log of a job's newest attempt (or of ``attempt``), in chunks.

    With ``follow`` it waits for a job that has not started yet to write its first
    log, goes on with the log of each new attempt, and ends once the job has ended
    and everything its trainer wrote has been read.
    """
    def state() -> str | None:
        row = next((r for r in status(home).jobs if r.name == ref or str(r.id) == ref), None)
        return row.status if row is not None else None

    while True:
        try:
            path = log_path(home, ref, attempt)
            break
        except NotFoundError:
            if not follow or attempt is not None or state() not in ("running", "pending"):
                raise
            sleep(poll_s)
    fh = open(path, "rb")  # noqa: SIM115 - it is swapped for the next attempt's log below
    try:
        while True:
            chunk = fh.read(1 << 16)
            if chunk:
                yield chunk
                continue
            if not follow:
                return
            now = state()
            newest = log_path(home, ref)
            if newest != path:  # a new attempt started: follow its log
                fh.close()
                path, fh = newest, open(newest, "rb")  # noqa: SIM115
                continue
            if now not in ("running", "pending"):
                # The job ended; what its trainer wrote between our last read and now is still to come.
                rest = fh.read()
                if rest:
                    yield rest
                return
            sleep(poll_s)
    finally:
        fh.close()
