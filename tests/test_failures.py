"""The failure policy (queue/failures.py): pure, so every rule is checked without a store or a clock."""

from __future__ import annotations

import dataclasses

from loraq.errors import FailureKind
from loraq.queue import failures
from loraq.queue.records import FAILED, PENDING, Job, QueueState, StoredJob

STATE = QueueState(paused=False, pause_reason=None, consecutive_failures=0, pause_after_failures=None,
                   retry_backoff_s=10.0)


def job(attempts: int = 1, max_retries: int = 2) -> Job:
    return Job(id=1, name="a", status="running", priority=0, spec=StoredJob.decode({"spec": {"name": "a"}}),
               base_key="b", max_retries=max_retries, attempts=attempts, epoch=attempts, lease_owner=None,
               lease_host=None, lease_pid=None, lease_expires=None, not_before=0.0, progress_step=None,
               progress_total=None, train_loss=None, eval_loss=None, base_eval_loss=None, error_kind=None, error=None,
               verdict=None, result=None, dataset_sha256=None, queue_file=None, created_at=0.0, updated_at=0.0,
               started_at=None, finished_at=None)


def test_a_retryable_failure_backs_off_doubling_each_attempt_up_to_an_hour() -> None:
    waits = [failures.decide(job(n, max_retries=20), kind="oom", reason="x", retryable=True, state=STATE, now=100.0)
             for n in (1, 2, 3, 12)]
    assert all(f.status == PENDING and f.again for f in waits)
    assert [f.not_before for f in waits] == [110.0, 120.0, 140.0, 100.0 + failures.MAX_BACKOFF_S]
    assert "retrying, 20 attempt(s) left" in waits[0].why


def test_without_attempts_left_or_retryable_it_fails_for_good() -> None:
    last = failures.decide(job(3), kind="oom", reason="x", retryable=True, state=STATE, now=0.0)
    assert (last.status, last.not_before, last.why) == (FAILED, None, "oom: x (no attempts left)")
    permanent = failures.decide(job(1), kind="data", reason="bad row", retryable=False, state=STATE, now=0.0)
    assert (permanent.status, permanent.why) == (FAILED, "data: bad row")


def test_an_internal_error_is_retried_once_and_says_whether_it_repeated() -> None:
    first = failures.decide(job(1), kind=FailureKind.INTERNAL, reason="boom", retryable=True, state=STATE, now=0.0)
    assert first.again
    same = failures.decide(job(2), kind=FailureKind.INTERNAL, reason="boom", retryable=True, state=STATE, now=0.0,
                           earlier_internal=(1, "boom"))
    assert (same.status, same.retryable) == (FAILED, False)
    assert same.reason == "boom; the same error as attempt 1, so it is not retried again"
    other = failures.decide(job(2), kind=FailureKind.INTERNAL, reason="bang", retryable=True, state=STATE, now=0.0,
                            earlier_internal=(1, "boom"))
    assert other.reason.endswith("attempt 1 also failed with an internal error, so it is not retried again")


def test_failures_in_a_row_pause_the_queue_once() -> None:
    state = dataclasses.replace(STATE, consecutive_failures=2, pause_after_failures=3)
    decided = failures.decide(job(1), kind="data", reason="bad", retryable=False, state=state, now=0.0)
    assert decided.failures == 3 and decided.pause is not None and decided.pause.startswith("3 attempts failed in a row")
    paused = dataclasses.replace(state, paused=True)
    assert failures.decide(job(1), kind="data", reason="bad", retryable=False, state=paused, now=0.0).pause is None


def test_the_same_internal_error_in_a_row_pauses_after_the_limit() -> None:
    streak = 0
    previous = None
    for _ in range(3):
        streak = failures.internal_streak("boom", previous, streak)
        previous = "boom"
    assert streak == 3 and failures.internal_pause(streak, STATE, "a", "boom") is not None
    assert failures.internal_streak("bang", "boom", 2) == 1 and failures.internal_streak(None, "boom", 2) == 0
    assert failures.internal_pause(2, STATE, "a", "boom") is None
    assert failures.internal_pause(9, dataclasses.replace(STATE, pause_after_internal_errors=0), "a", "boom") is None
