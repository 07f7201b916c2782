"""Every error loraq raises on purpose, and the exit code each maps to.

The CLI maps these to exit codes in one place (``cli.main``); the library never
prints. Messages are one line a person can act on: they name the file, the job
or row, the field, and what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


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


class InspectionError(LoraqError):
    """An adapter cannot be inspected at all (missing, outside the roots)."""

    exit_code = 2


class TrainingError(LoraqError):
    """A training attempt failed.

    ``retryable`` says whether another attempt may succeed (a killed process, out
    of memory, a stall, an I/O error) or not (bad spec, data or base model).
    """

    def __init__(self, message: str, *, retryable: bool, kind: str) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind
