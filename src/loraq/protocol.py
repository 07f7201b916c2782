"""The seam between the supervisor and its trainers: every message that crosses it, typed.

What crosses (STYLE.md rule 9):

- the worker sends a :class:`TrainRequest` (one attempt of one job) and
  :class:`Command`\\ s (stop gracefully, abort, exit) to a trainer;
- a trainer answers with :class:`Message`\\ s: a payload, one frozen dataclass per
  :class:`EventKind`, and the job and lease epoch it belongs to;
- a job ends with one *final* event: :class:`Done` (carrying a :class:`TrainResult`),
  :class:`Stopped`, :class:`Failed` (with a :class:`~loraq.errors.FailureKind`) or
  :class:`Aborted`; an executor adds :class:`Exited` when a trainer dies;
- why the worker stopped a job is a :class:`StopReason`.

:func:`to_wire` and :func:`from_wire` / :func:`decode` are the one place these
become JSON-able dicts and back: the local executor sends them as JSON lines over
pipes; the Ray executor passes the objects themselves (Ray pickles them). The
codec follows the dataclasses' fields and type hints, so it needs no code per
message. Decoding checks every field's type and refuses a missing one
(:class:`~loraq.errors.ProtocolError`); keys it does not know are ignored, so a
trainer and a supervisor one field apart (an upgrade while a worker runs) still
understand each other.

Adding to the protocol:

- **A field** of a request, an event or a result: add it to its dataclass with a
  default. Nothing else changes: the codec, both executors and the worker carry it.
  A ``done`` result is stored as its wire form (the job's ``result``), so ``show
  --json`` and the report see the new key at once.
- **An evaluation metric** (``exact_match``, ...): ``TrainResult.metrics`` maps a
  name to a float; for the base model's value use the ``base_`` prefix
  (``base_exact_match``). No new field is needed, and the worker's plumbing does
  not change.
- **Anything else JSON-able** that the supervisor only stores and shows (sample
  generations, packing statistics, early-stopping details): ``TrainResult.extras``,
  under a key named for it (``extras["samples"]``, ``extras["packing"]``). Promote a
  key to a typed field of its own once the supervisor decides something with it (a
  quality gate reads it, ``status`` shows it in a column).
- **An event kind** (say ``oom_adjusted`` with ``before``/``after``): a member of
  :class:`EventKind`, a payload dataclass whose ``kind`` class variable names it, an
  entry in :data:`PAYLOADS`, and a branch in the worker's ``_handle`` (which ignores
  kinds it has no branch for). ``tests/test_protocol.py`` checks that every kind
  has a payload and that each survives the round trip.

Standard library only: the supervisor side imports this, and never torch.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import FailureKind, ProtocolError

T = TypeVar("T")


class _Named(str, enum.Enum):
    """A str enum that reads as its value in messages and f-strings (Python 3.10 has no ``StrEnum``)."""

    def __str__(self) -> str:
        return str(self.value)


# ---------------------------------------------------------------- supervisor -> trainer


@dataclass(frozen=True, kw_only=True)
class JobInput:
    """What the trainer needs of a job's stored spec: the spec itself and its resolved paths."""

    spec: dict[str, Any]  # the JobSpec as JSON; the trainer validates it (pydantic) before use
    base_model: str  # an absolute folder, or a hub id
    dataset_path: str
    eval_dataset_path: str | None = None
    dataset_sha256: str | None = None  # as submitted: the trainer refuses a file that changed since
    eval_dataset_sha256: str | None = None
    init_from_path: str | None = None  # a warm start: the adapter folder checked at submit (spec.init_from)
    init_from_sha256: str | None = None  # its weights as checked: the trainer refuses them changed
    chat_template_text: str | None = None  # the job's chat_template as loaded at submit (data/templates.py)
    dataset_bytes: int | None = None  # as submitted: a file of another size is refused unread
    eval_dataset_bytes: int | None = None
    submit_tokenizer: str | None = None  # what counted the tokens at submit: "tokenizers" (torch-free) | "transformers"
    est_steps: int | None = None  # the steps submit estimated (the trainer's own plan gives the steps it runs)
    sweep: dict[str, Any] | None = None  # the settings this job of a sweep was given: the trackers' tags

    @classmethod
    def of_stored(cls, stored: Mapping[str, Any]) -> JobInput:
        """From a job's spec as the store keeps it (``Job.spec``), which holds more than the trainer needs."""
        names = {f.name for f in dataclasses.fields(cls)}
        return decode(cls, {k: v for k, v in stored.items() if k in names})


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """One attempt of one job, as the worker hands it to a trainer. Paths are the home's."""

    job_id: int
    attempt: int
    epoch: int  # the lease's fencing number: events carry it back
    job: JobInput
    log_path: str
    checkpoints_dir: str
    staging_dir: str  # where the trained adapter is saved
    resume_from: str | None = None  # a complete checkpoint-<step> folder
    # Where the trainer may read: the roots the job's paths were checked against at submit.
    # Every dataset and base model file is opened inside them again.
    read_roots: list[str] = field(default_factory=list)


class Command(_Named):
    """What the supervisor tells a trainer process, besides the job itself."""

    TRAIN = "train"  # with a TrainRequest
    STOP = "stop"  # checkpoint and stop the running job (it goes back to the queue)
    ABORT = "abort"  # stop the running job at once, keep nothing
    EXIT = "exit"  # finish and leave


#: How a trainer process that ends on its own says why (the local executor explains the code).
EXIT_ORPHAN = 3  # its supervisor went away
EXIT_BAD_COMMAND = 4  # a command it cannot read (two versions of loraq?)


def command_to_wire(command: Command, request: TrainRequest | None = None) -> dict[str, Any]:
    if (command is Command.TRAIN) != (request is not None):
        raise ValueError("a train command carries a request, and only it")
    return {"op": command.value, **({"request": to_wire(request)} if request is not None else {})}


def command_from_wire(data: Any) -> tuple[Command, TrainRequest | None]:
    if not isinstance(data, Mapping):
        raise ProtocolError(f"a command is an object, not {type(data).__name__}")
    command = _enum(Command, data.get("op"), "op")
    if command is Command.TRAIN:
        return command, decode(TrainRequest, data.get("request"), "request")
    return command, None


class StopReason(_Named):
    """Why the worker stopped a running job; the value goes into the job's event log."""

    SIGNAL = "graceful stop"  # the first SIGINT/SIGTERM: checkpoint, back to the queue, attempt not counted
    AT_ONCE = "stopped at once"  # a second signal, or the worker leaving: killed, attempt not counted
    STALLED = "stalled"  # the watchdog killed a silent trainer: a retryable failure that counts
    LOST = "the job was cancelled or taken over"  # the store says this worker no longer owns the job


# ---------------------------------------------------------------- trainer -> supervisor


class EventKind(_Named):
    READY = "ready"  # the trainer is up (once per trainer)
    STARTED = "started"  # the job's data is prepared and the base evaluated; training starts
    PROGRESS = "progress"  # logged metrics at a step
    HEARTBEAT = "heartbeat"  # a step ended (liveness)
    CHECKPOINT = "checkpoint"  # a complete checkpoint is on disk
    OOM_ADJUSTED = "oom_adjusted"  # out of memory: the job goes on with a smaller micro-batch (same examples a step)
    DONE = "done"  # final: the adapter is saved in staging
    STOPPED = "stopped"  # final: stopped gracefully after a checkpoint
    FAILED = "failed"  # final
    ABORTED = "aborted"  # final: stopped at once on request
    EXITED = "exited"  # the trainer died (made by the executor, not the trainer)


@dataclass(frozen=True, kw_only=True)
class Memory:
    """A trainer's memory: RSS, and where CUDA is in use what its caching allocator holds."""

    rss_mb: float
    peak_rss_mb: float | None = None  # the trainer process's high-water mark so far (its jobs before included)
    cuda_allocated_mb: float | None = None
    cuda_reserved_mb: float | None = None
    cuda_peak_mb: float | None = None  # the most allocated since the job started


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a finished training attempt reports; see the module docstring to add to it."""

    staging: str  # the folder the adapter was saved in
    steps: int
    max_steps: int
    train_loss: float | None
    eval_loss: float
    base_eval_loss: float
    n_train: int
    n_eval: int
    truncated_rows: int = 0
    train_tokens: int = 0
    base_reused: bool = False
    base_load_s: float = 0.0
    train_s: float = 0.0
    job_s: float | None = None
    resumed_from: str | None = None
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # where the job's time went (load_s, train_s, ...)
    memory: Memory | None = None  # measured after the job's cleanup
    base_loads: int | None = None  # base models this trainer process has loaded so far
    pid: int | None = None
    cuda_visible_devices: str | None = None
    torch_threads: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # evaluation metrics by name; base_<name> for the base
    extras: dict[str, Any] = field(default_factory=dict)  # JSON-able details the supervisor stores and shows


@dataclass(frozen=True, kw_only=True)
class Ready:
    kind: ClassVar[EventKind] = EventKind.READY
    pid: int
    device: str
    versions: dict[str, str] = field(default_factory=dict)
    node: str | None = None  # Ray: the node and its address
    ip: str | None = None


@dataclass(frozen=True, kw_only=True)
class Started:
    kind: ClassVar[EventKind] = EventKind.STARTED
    max_steps: int
    base_eval_loss: float
    base_reused: bool
    n_train: int
    n_eval: int
    resume_from: str | None = None
    node: str | None = None  # Ray: where the job runs


@dataclass(frozen=True, kw_only=True)
class Progress:
    kind: ClassVar[EventKind] = EventKind.PROGRESS
    step: int
    max_steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # loss, eval_loss, learning_rate, grad_norm, rss_mb


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    kind: ClassVar[EventKind] = EventKind.HEARTBEAT
    step: int | None = None
    max_steps: int | None = None


@dataclass(frozen=True, kw_only=True)
class CheckpointSaved:
    kind: ClassVar[EventKind] = EventKind.CHECKPOINT
    step: int
    path: str


@dataclass(frozen=True, kw_only=True)
class OomAdjusted:
    """The trainer ran out of memory at ``step`` and goes on with ``after`` (micro-batch halved, grad_accum
    doubled; at micro-batch 1, gradient checkpointing) from its newest complete checkpoint, in the same attempt.
    The worker stores ``after`` as the job's settings, so any later attempt uses them too."""

    kind: ClassVar[EventKind] = EventKind.OOM_ADJUSTED
    step: int
    before: dict[str, Any]  # batch_size, grad_accum, gradient_checkpointing
    after: dict[str, Any]
    error: str  # the exception, as "TypeName: message" (its first line)
    asked: str | None = None  # how much the failed allocation asked for ("2.00 GiB")
    resume_step: int | None = None  # the checkpoint it goes on from; None: from step 0


@dataclass(frozen=True, kw_only=True)
class _Final:
    """What every final event carries besides its outcome (the worker recycles a trainer that grew)."""

    memory: Memory | None = None  # the trainer's memory after the job's cleanup
    base_loads: int | None = None


@dataclass(frozen=True, kw_only=True)
class Done(_Final):
    kind: ClassVar[EventKind] = EventKind.DONE
    result: TrainResult


@dataclass(frozen=True, kw_only=True)
class Stopped(_Final):
    kind: ClassVar[EventKind] = EventKind.STOPPED
    step: int


@dataclass(frozen=True, kw_only=True)
class Failed(_Final):
    kind: ClassVar[EventKind] = EventKind.FAILED
    failure: FailureKind
    message: str  # for an exception loraq does not name: "TypeName: message"
    where: str | None = None  # internal errors: file:line of the innermost frame in loraq
    traceback: str | None = None

    @property
    def reason(self) -> str:
        """The one line the store records: the message, and where a bug was raised."""
        return f"{self.message} (raised at {self.where})" if self.where else self.message


@dataclass(frozen=True, kw_only=True)
class Aborted(_Final):
    kind: ClassVar[EventKind] = EventKind.ABORTED


@dataclass(frozen=True, kw_only=True)
class Exited:
    kind: ClassVar[EventKind] = EventKind.EXITED
    reason: str  # "trainer process killed by SIGKILL"
    was_ready: bool  # False: it died while starting (a broken install, a bad device)
    log: str  # where to look for its output
    returncode: int | None = None


Event = (Ready | Started | Progress | Heartbeat | CheckpointSaved | OomAdjusted | Done | Stopped | Failed | Aborted
         | Exited)
Final = Done | Stopped | Failed | Aborted
FINAL_KINDS = frozenset({EventKind.DONE, EventKind.STOPPED, EventKind.FAILED, EventKind.ABORTED})

#: Each kind's payload class.
PAYLOADS: dict[EventKind, type[Any]] = {cls.kind: cls for cls in get_args(Event)}


@dataclass(frozen=True)
class Message:
    """An event and the job (and lease epoch) it belongs to; ``ready`` belongs to no job."""

    event: Event
    job_id: int | None = None
    epoch: int | None = None

    @property
    def kind(self) -> EventKind:
        return self.event.kind


# ---------------------------------------------------------------- the codec

_ENVELOPE = ("ev", "job_id", "epoch")


def to_wire(value: Any) -> Any:
    """A message, request or any part of one as JSON-able data (a :class:`Message` becomes a flat object)."""
    if isinstance(value, Message):
        return {"ev": value.kind.value, "job_id": value.job_id, "epoch": value.epoch, **to_wire(value.event)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


def from_wire(data: Any) -> Message:
    """The :class:`Message` that :func:`to_wire` made ``data`` from."""
    if not isinstance(data, Mapping):
        raise ProtocolError(f"an event is an object, not {type(data).__name__}")
    kind = _enum(EventKind, data.get("ev"), "ev")
    payload = decode(PAYLOADS[kind], {k: v for k, v in data.items() if k not in _ENVELOPE}, kind.value)
    return Message(payload, job_id=_decode(int | None, data.get("job_id"), "job_id"),
                   epoch=_decode(int | None, data.get("epoch"), "epoch"))


def decode(cls: type[T], data: Any, where: str | None = None) -> T:
    """``cls`` (a protocol dataclass) from its wire form; :class:`ProtocolError` names what does not fit."""
    return _decode(cls, data, where or cls.__name__)  # type: ignore[no-any-return]


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    return get_type_hints(cls)


def _enum(cls: type[Any], value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(m.value for m in cls)
        raise ProtocolError(f"{where}: {value!r} is not one of {known}") from None


def _decode(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _decode(option, value, where)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {options}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp, value, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ProtocolError(f"{where}: expected an object, got {type(value).__name__}")
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _decode(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{where}: {f.name} is missing")
        return tp(**kwargs)
    if origin is dict:
        key_type, value_type = get_args(tp)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ProtocolError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _decode(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        (item_type, *_) = get_args(tp) or (Any,)
        return origin(_decode(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ProtocolError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ProtocolError(f"{where}: no decoder for {tp!r}")  # a protocol dataclass with a type the codec lacks
