"""The failure policy: what becomes of a job whose attempt failed, and when the queue pauses.

Pure functions of the job, the failure and the queue's state, as rq keeps its in
``job_lifecycle``: the store (:meth:`~loraq.queue.store.Store.fail`) reads what they
need and applies what they decide in one transaction. Time is a parameter.

- A retryable failure with attempts left goes back to pending after a backoff that
  doubles each attempt (at most an hour); otherwise the job fails for good.
- An ``internal`` error (an exception loraq does not recognise: a bug) is retried
  once at most: a second one in the same run of attempts fails the job, saying
  whether it was the same error as the attempt before.
- Every failed attempt counts towards ``pause_after_failures``; jobs failing for good
  with the same internal error ``pause_after_internal_errors`` times in a row pause
  the queue, so a bug does not burn the night; a fault of the machine pauses it at once.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FailureKind
from .records import FAILED, PENDING, Job, QueueState

#: The longest retry backoff, however many attempts failed.
MAX_BACKOFF_S = 3600.0


@dataclass(frozen=True)
class Failure:
    """What the store does with a failed attempt."""

    status: str  # PENDING (retried after ``not_before``) or FAILED
    reason: str  # the attempt's reason (an internal error's says why it is not retried again)
    retryable: bool  # as the attempt records it
    why: str  # the event's reason
    not_before: float | None  # when a retry may be claimed; None when it failed for good
    failures: int  # failed attempts in a row, this one counted
    pause: str | None  # why the queue pauses now, if it does

    @property
    def again(self) -> bool:
        return self.status == PENDING


def decide(job: Job, *, kind: str, reason: str, retryable: bool, state: QueueState, now: float,
           earlier_internal: tuple[int, str] | None = None) -> Failure:
    """The outcome of ``job``'s running attempt failing with ``kind``/``reason``.

    ``earlier_internal`` is ``(n, reason)`` of the newest earlier attempt in the job's
    current run of attempts that failed with an internal error, if any.
    """
    again = retryable and job.attempts_left > 0
    if kind == FailureKind.INTERNAL and earlier_internal is not None:
        n, same = earlier_internal
        again, retryable = False, False
        reason += (f"; the same error as attempt {n}" if same == reason
                   else f"; attempt {n} also failed with an internal error") + ", so it is not retried again"
    if again:
        backoff = state.retry_backoff_s * (2 ** max(job.attempts - 1, 0))
        not_before: float | None = now + min(backoff, MAX_BACKOFF_S)
        why = f"{kind}: {reason} (retrying, {job.attempts_left} attempt(s) left)"
    else:
        not_before = None
        why = f"{kind}: {reason}" + ("" if not retryable else " (no attempts left)")
    failures = state.consecutive_failures + 1
    pause = None
    if state.pause_after_failures and failures >= state.pause_after_failures and not state.paused:
        pause = (f"{failures} attempts failed in a row (pause_after_failures: {state.pause_after_failures}); "
                 f"last: {job.name}: {reason}")
    return Failure(PENDING if again else FAILED, reason, retryable, why, not_before, failures, pause)


def internal_streak(error: str | None, previous: str | None, count: int) -> int:
    """Jobs failing for good in a row with the same internal ``error`` (``None``: any other outcome),
    given the ``previous`` such error and its ``count``."""
    if error is None:
        return 0
    return count + 1 if error == previous else 1


def internal_pause(streak: int, state: QueueState, name: str, error: str | None) -> str | None:
    """Why the queue pauses after ``streak`` jobs failed with the same internal error (``None``: it does not)."""
    limit = state.pause_after_internal_errors
    if not limit or streak < limit:
        return None
    return (f"{streak} jobs in a row failed with the same internal error, a bug in loraq or in what it runs "
            f"(pause_after_internal_errors: {limit}); last: {name}: {error}. Report it with 'loraq show', "
            "then 'loraq resume'")


def machine_fault_pause(kind: str, reason: str) -> str:
    """Why the queue pauses when a fault of the machine ended an attempt (a full disk)."""
    return f"the machine failed a job ({kind}: {reason}); fix it, then 'loraq resume'"
