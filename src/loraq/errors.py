"""Every error loraq raises on purpose, the exit code each maps to, and the kinds of failure.

The CLI maps these to exit codes in one place (``cli.main``); the library never
prints. Messages are one line a person can act on: they name the file, the job
or row, the field, and what is wrong.

A failed training attempt ends with a :class:`FailureKind`. :func:`classify` names
the kind of an exception that escaped training; what it cannot name is
``internal``: a bug of loraq's, retried once at most (STYLE.md rule 11).
Standard library only: the store and the supervisor use these too.
"""

from __future__ import annotations

import enum
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class LoraqError(Exception):
    """Base of every error loraq raises on purpose."""

    exit_code = 1


class UsageError(LoraqError):
    """The command was called wrongly (a flag, an argument)."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where it is and what is wrong."""

    where: str  # "queue.yaml: job 'support-bot': lora.r"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ProblemsError(LoraqError):
    """Several problems found at once; all of them are listed, one a line."""

    def __init__(self, problems: Iterable[Problem], summary: str | None = None) -> None:
        self.problems = list(problems)
        self.summary = summary
        super().__init__(summary or "\n".join(str(p) for p in self.problems))


class SpecError(ProblemsError):
    """The queue file is invalid: a bad key, value, name or path."""


class DataError(ProblemsError):
    """A dataset cannot be used: missing, unreadable, or rows that cannot train."""


class TemplateError(LoraqError, ValueError):
    """The tokenizer's chat template cannot be used to find the assistant turns."""


class TemplateBudgetError(TemplateError):
    """A chat template ran past its budget (time, or the size of what it builds) while rendering: the template is
    at fault, not a row, so rendering stops at the first."""


class PathError(LoraqError):
    """A path lies outside the roots loraq may read from or write to."""


class NotFoundError(LoraqError):
    """An unknown job, or a file or folder that is not there."""


class TransitionError(LoraqError):
    """A job cannot move to the asked state from the state it is in."""


class StoreError(LoraqError):
    """The state database cannot be used."""


class CorruptStoreError(StoreError):
    """The state database is damaged; loraq refuses to touch it."""


class LeaseLost(StoreError):
    """The worker's epoch no longer owns the job: someone else does, or it ended."""

    def __init__(self, job_id: int, epoch: int | None, current: int | None) -> None:
        super().__init__(f"job {job_id}: lease lost (held epoch {epoch}, current {current})")
        self.job_id = job_id


class PublishConflict(LoraqError):
    """``adapters/<name>`` already holds an adapter of another job."""


class TrainerStartError(LoraqError):
    """A trainer cannot even start (a broken install, a bad device, no room on the cluster)."""


class YamlProblem(LoraqError):
    """What is wrong with a YAML file (the queue file, config.yaml), and on which line (1-based; ``None``: the file)."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class RegexTimeout(LoraqError):
    """A regex of an adapter config took longer than the inspection's budget to match (it backtracks)."""


class StoreFaultError(StoreError):
    """The machine cannot write the state database now (a full disk, an I/O error).

    A fault of the machine, not of a job: the worker keeps running, retries the write
    with back-off, pauses the queue with the reason, and counts no attempt for it.
    """


class InspectionError(LoraqError):
    """An adapter cannot be inspected at all (missing, outside the roots)."""

    exit_code = 2


class ExportError(LoraqError):
    """An export was refused: the adapter cannot be written in that form (the message says why),
    or the written result failed its check and was not put in place."""


class FailureKind(str, enum.Enum):
    """How an attempt failed; the kind decides whether it is tried again.

    The value is what the store records (``attempts.error_kind``) and ``status`` shows.
    """

    # What the job asked for cannot work: permanent; the message says what to fix.
    SPEC = "spec"
    DATA = "data"
    BASE_MODEL = "base_model"
    DIVERGED = "diverged"  # the loss or the weights became non-finite
    INSPECTION = "inspection"  # the trained adapter failed inspection
    CONFLICT = "conflict"  # adapters/<name> holds another job's adapter
    MEMORY = "memory"  # out of memory even at micro-batch 1 with gradient checkpointing (the OOM back-off is spent)
    DEPENDENCY = "dependency"  # the job it waits on (``after:``) failed or was cancelled, or left no usable adapter
    # Faults of the machine: retried as a matter of course.
    DIED = "died"  # the trainer process (or Ray actor) died
    OOM = "oom"
    CUDA = "cuda"  # a CUDA, cuBLAS or NCCL error of the device
    IO = "io"  # a full disk, an I/O error
    STALLED = "stalled"  # no event within the watchdog time; the trainer was killed
    LOST = "lost"  # the lease expired or its worker is gone
    INTERRUPTED = "interrupted"  # the trainer got KeyboardInterrupt or SystemExit
    # An exception loraq does not recognise: a bug. Retried once at most; the same
    # error twice in a row fails the job (see Store.fail).
    INTERNAL = "internal"

    def __str__(self) -> str:  # "io", not "FailureKind.IO", in messages
        return str(self.value)

    @property
    def retryable(self) -> bool:
        """Whether another attempt may succeed (``internal``: once, see :class:`FailureKind`)."""
        return self in _RETRYABLE


_RETRYABLE = frozenset({FailureKind.DIED, FailureKind.OOM, FailureKind.CUDA, FailureKind.IO, FailureKind.STALLED,
                        FailureKind.LOST, FailureKind.INTERRUPTED, FailureKind.INTERNAL})


class TrainingError(LoraqError):
    """A training attempt failed in a way loraq recognises; ``kind`` says how."""

    def __init__(self, message: str, *, kind: FailureKind) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def retryable(self) -> bool:
        return self.kind.retryable


class ProtocolError(LoraqError):
    """A message between the supervisor and a trainer that does not decode (a bug, or two versions of loraq)."""


class NotInCache(PathError):
    """A hub id that is not in the local Hugging Face cache (and was not to be downloaded)."""


class BodyTooLarge(LoraqError):
    """A request body grew past its limit while it was read (no Content-Length announced it, or a false one)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit


class GeneratorBusy(LoraqError):
    """The service's queue of waiting generation requests is full."""


@dataclass
class ApiError(LoraqError):
    """A refusal of the /v1 API in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# torch.save and safetensors report a full disk as RuntimeError / SafetensorError
_IO_MESSAGES = ("no space left on device", "file write failed", "storagefull", "input/output error",
                "disk quota exceeded", "read-only file system")
_CUDA_MESSAGES = ("cuda error", "cublas_status", "cudnn_status", "nccl error", "cuda driver", "illegal memory access")


def classify(exc: BaseException) -> FailureKind:
    """The kind of an exception that escaped training; ``internal`` for one loraq does not recognise."""
    if isinstance(exc, TrainingError):
        return exc.kind
    text = str(exc).lower()
    name = type(exc).__name__
    if "out of memory" in text or name == "OutOfMemoryError" or "can't allocate memory" in text:
        return FailureKind.OOM
    if any(m in text for m in _CUDA_MESSAGES):
        return FailureKind.CUDA
    if isinstance(exc, OSError) or any(m in text for m in _IO_MESSAGES):
        return FailureKind.IO
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return FailureKind.INTERRUPTED
    return FailureKind.INTERNAL


def describe(exc: BaseException) -> str:
    """``TypeName: message``: the type and message that make two errors "the same"."""
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


_PACKAGE = Path(__file__).resolve().parent


def raised_at(exc: BaseException) -> str | None:
    """``loraq/train/service.py:123``: the innermost frame of the traceback that is loraq's own code.

    A bug usually shows itself deep inside a library (torch, transformers); the line
    to look at is the last one of ours that called into it.
    """
    where = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(_PACKAGE):
            where = f"loraq/{path.relative_to(_PACKAGE).as_posix()}:{frame.lineno}"
    return where
