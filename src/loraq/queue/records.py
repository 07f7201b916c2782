"""What the store holds: job states, the lifecycle, and the records it hands out.

A job's stored JSON (``jobs.spec``: a :class:`~loraq.queue.spec.ResolvedJob` and what
submit learned of it) is decoded once, in :meth:`Job.from_row`, into a
:class:`StoredJob`, and a halving member's row into a :class:`Halving`; code outside
``queue/`` reads their attributes, never the JSON by key. The JSON keeps its shape
(``StoredJob.doc``): it is what the trainer is sent, and what homes already hold.

Standard library only, like the store.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

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

# Where a job of a halving sweep stands in its rounds (table ``halving_members``, migration 6).
# The job's own status stays in ``jobs.status``: a waiting job is pending, and the claim passes
# it over while its member row says it waits (queue/rounds.py), never through a sentinel time.
TRAINING, WAITING, PRUNED, RETRIED = "training", "waiting", "pruned", "retried"
ROUND_STATES = (TRAINING, WAITING, PRUNED, RETRIED)

#: A member's moves between rounds. Nothing else is allowed.
ROUND_TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        (TRAINING, WAITING),  # it trained to its round's steps: it waits for the decision
        (WAITING, TRAINING),  # kept: it trains the next round; or cancelled while waiting and retried
        (WAITING, PRUNED),  # the decision cut it
        (TRAINING, PRUNED),  # it ended a round that had been decided without it
        (PRUNED, RETRIED),  # retried by the operator: trains to the full budget, in no round
        (TRAINING, RETRIED),  # retried after its round was decided without it
        (WAITING, RETRIED),
    }
)

#: ``jobs.error_kind`` of a halving member's note (the round it is in, or why it was pruned): not an error.
HALVING_KIND = "halving"


# ---------------------------------------------------------------- the stored job

def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class Settings:
    """The job's settings as submitted (a ``JobSpec`` as JSON, defaults merged), by field."""

    doc: dict[str, Any]  # the whole of them, as stored: the manifest and a clone copy them
    name: str
    group: str | None  # the sweep this job was expanded from
    after: str | None  # the job it waits on (``after:``)
    init_from: str | None
    revision: str | None
    chat_template: str | None
    lora: dict[str, Any]
    training: dict[str, Any]
    validation: dict[str, Any]
    dataset: dict[str, Any]
    method: dict[str, Any] | None = None  # a preference method (issue 23); None: sft

    @property
    def dataset_format(self) -> str | None:
        return _str(self.dataset.get("format"))

    @classmethod
    def decode(cls, doc: Any) -> Settings:
        doc = _dict(doc)
        return cls(doc=doc, name=str(doc.get("name") or ""), group=_str(doc.get("group")),
                   after=_str(doc.get("after")), init_from=_str(doc.get("init_from")),
                   revision=_str(doc.get("revision")), chat_template=_str(doc.get("chat_template")),
                   lora=_dict(doc.get("lora")), training=_dict(doc.get("training")),
                   validation=_dict(doc.get("validation")), dataset=_dict(doc.get("dataset")),
                   method=doc["method"] if isinstance(doc.get("method"), dict) else None)


@dataclass(frozen=True)
class HalvingPlan:
    """A halving sweep's plan, as submitted (queue/halving.py): it never changes."""

    configs: int
    budget: int  # the full ``max_steps``
    steps: tuple[int, ...]  # each round's ``max_steps``, the last is ``budget``
    sweep: str | None  # the sweep's id (its jobs' names); ``None`` in homes from before ids: the group is

    @property
    def rounds(self) -> int:
        return len(self.steps)

    def as_json(self) -> dict[str, Any]:
        return {"configs": self.configs, "budget": self.budget, "steps": list(self.steps),
                **({"sweep": self.sweep} if self.sweep else {})}

    @classmethod
    def decode(cls, doc: Any) -> HalvingPlan | None:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("steps"), list):
            return None
        steps = tuple(int(s) for s in doc["steps"])
        return cls(configs=int(doc.get("configs") or len(steps)), budget=int(doc.get("budget") or steps[-1]),
                   steps=steps, sweep=_str(doc.get("sweep")))


@dataclass(frozen=True)
class Halving:
    """Where a job of a halving sweep stands: its plan, and its row of ``halving_members``."""

    plan: HalvingPlan
    sweep: str  # the sweep's id, or (in homes from before ids) its group
    round: int  # 1 … plan.rounds
    state: str  # records.ROUND_STATES
    eval_loss: float | None = None  # at the end of its round, while it waits
    metric: str | None = None  # the grader the sweep gates on, if any
    score: float | None = None
    why: str | None = None  # the last decision about it, for people
    history: tuple[dict[str, Any], ...] = ()  # each decided round: eval loss, rank, of

    @property
    def is_round_end(self) -> bool:
        """Whether training to its round's steps only ends a round (nothing is published: it waits)."""
        return self.state == TRAINING and self.round < self.plan.rounds

    @property
    def is_pruned(self) -> bool:
        return self.state == PRUNED

    @property
    def is_out(self) -> bool:
        """Pruned, or retried outside the rounds: ``why`` says what happened to it."""
        return self.state in (PRUNED, RETRIED)

    def as_json(self) -> dict[str, Any]:
        """The plan and the state in one object, as the report and ``show --json`` have always shown them."""
        return self.plan.as_json() | {"round": self.round, "state": self.state, "history": [dict(h) for h in self.history]} | {
            k: v for k, v in (("eval_loss", self.eval_loss), ("metric", self.metric), ("score", self.score),
                              ("why", self.why)) if v is not None}


@dataclass(frozen=True)
class StoredJob:
    """A job as the store keeps it: the resolved job and what submit learned of it."""

    doc: dict[str, Any]  # the JSON as stored: what the trainer is sent (its wire format), what a clone starts from
    settings: Settings
    base_model: str  # an absolute folder, or a hub id
    dataset_path: str | None
    eval_dataset_path: str | None
    queue_file: str | None
    plan: HalvingPlan | None  # a halving sweep's plan (where the job stands: ``Job.halving``)
    sweep: dict[str, Any] | None  # the settings this job of a sweep was given
    auto: dict[str, Any] | None  # what each ``auto`` resolved to, and why
    init_from_path: str | None  # a warm start's adapter folder (``init_from``, or bound at claim for ``after``)
    init_from_sha256: str | None
    chat_template_text: str | None
    chat_template_path: str | None
    dataset_sha256: str | None  # the validated dataset's identity, as submitted: the trainer refuses another
    eval_dataset_sha256: str | None
    dataset_bytes: int | None
    eval_dataset_bytes: int | None
    dataset_rows: int | None
    submit_tokenizer: str | None  # what counted the tokens at submit
    est_steps: int | None  # the steps submit estimated
    submitted_sha256: str | None  # what makes a resubmitted sweep job "the same"
    read_roots: tuple[str, ...]  # the roots its paths were checked against at submit
    serving: tuple[str, ...]  # the engines the queue's serving gate requires
    oom_adjustments: tuple[dict[str, Any], ...]  # each out-of-memory back-off, in order

    @classmethod
    def decode(cls, doc: str | Mapping[str, Any]) -> StoredJob:
        data: dict[str, Any] = json.loads(doc) if isinstance(doc, str) else dict(doc)
        settings = Settings.decode(data.get("spec"))
        return cls(
            doc=data, settings=settings,
            base_model=str(data.get("base_model") or settings.doc.get("base_model") or ""),
            dataset_path=_str(data.get("dataset_path")), eval_dataset_path=_str(data.get("eval_dataset_path")),
            queue_file=_str(data.get("queue_file")), plan=HalvingPlan.decode(data.get("halving")),
            sweep=data.get("sweep") if isinstance(data.get("sweep"), dict) else None,
            auto=data.get("auto") if isinstance(data.get("auto"), dict) else None,
            init_from_path=_str(data.get("init_from_path")), init_from_sha256=_str(data.get("init_from_sha256")),
            chat_template_text=_str(data.get("chat_template_text")),
            chat_template_path=_str(data.get("chat_template_path")),
            dataset_sha256=_str(data.get("dataset_sha256")), eval_dataset_sha256=_str(data.get("eval_dataset_sha256")),
            dataset_bytes=_int(data.get("dataset_bytes")), eval_dataset_bytes=_int(data.get("eval_dataset_bytes")),
            dataset_rows=_int(data.get("dataset_rows")), submit_tokenizer=_str(data.get("submit_tokenizer")),
            est_steps=_int(data.get("est_steps")),
            submitted_sha256=_str(data.get("submitted_sha256")),
            read_roots=tuple(str(r) for r in data.get("read_roots") or ()),
            serving=tuple(str(e) for e in data.get("serving") or ()),
            oom_adjustments=tuple(dict(a) for a in data.get("oom_adjustments") or () if isinstance(a, Mapping)),
        )

    def encode(self) -> str:
        return json.dumps(self.doc, sort_keys=True)


# ---------------------------------------------------------------- records


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
    spec: StoredJob
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
    halving: Halving | None = None  # a job of a halving sweep: where it stands in the rounds (migration 6)

    @property
    def attempts_left(self) -> int:
        return self.max_retries + 1 - self.attempts

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        """A row of :data:`JOB_SELECT` (the job and its halving member row, if any), decoded."""
        data = dict(row)
        member = {k.removeprefix("h_"): data.pop(k) for k in list(data) if k.startswith("h_")}
        spec = data["spec"] = StoredJob.decode(data["spec"])
        data["result"] = json.loads(data["result"]) if data["result"] else None
        if spec.plan is not None and member.get("round") is not None:
            data["halving"] = Halving(
                plan=spec.plan, sweep=str(member["sweep"]), round=int(member["round"]), state=str(member["state"]),
                eval_loss=member["eval_loss"], metric=member["metric"], score=member["score"], why=member["why"],
                history=tuple(json.loads(member["history"] or "[]")))
        return cls(**data)


class SqlExpr(str):
    """An SQL expression the store assigns as-is (``epoch + 1``), not a value."""


#: How the store reads jobs for :meth:`Job.from_row`: each with its halving member row (``h_*``), if any.
JOB_SELECT = ("SELECT jobs.*, h.sweep AS h_sweep, h.round AS h_round, h.state AS h_state, h.eval_loss AS h_eval_loss, "
              "h.metric AS h_metric, h.score AS h_score, h.why AS h_why, h.history AS h_history "
              "FROM jobs LEFT JOIN halving_members h ON h.job_id = jobs.id")


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


class Moves(Protocol):
    """The store's own helpers that dependencies.py and rounds.py call inside its transactions (the store
    passes itself in): one place a job's status changes, its events, attempts and stored JSON."""

    @property
    def clock(self) -> Callable[[], float]: ...

    def _read(self, conn: sqlite3.Connection, job_id: int) -> Job: ...

    def _transition(self, conn: sqlite3.Connection, job_id: int, to_state: str, *, reason: str,
                    expect: Iterable[str] | None = None, epoch: int | None = None,
                    sets: dict[str, Any] | None = None, actor: str | None = None) -> str: ...

    def _event(self, conn: sqlite3.Connection, job_id: int | None, from_state: str | None, to_state: str | None,
               reason: str, actor: str | None = None) -> None: ...

    def _end_attempt(self, conn: sqlite3.Connection, job_id: int, epoch: int, outcome: str, *,
                     error_kind: str | None = None, reason: str | None = None, traceback: str | None = None,
                     counted: bool = True, retryable: bool | None = None) -> None: ...

    def _rewrite_spec(self, conn: sqlite3.Connection, job_id: int,
                      change: Callable[[dict[str, Any]], None]) -> None: ...
