"""The worker's run events (:mod:`loraq.supervisor.events`) and the lines `loraq run` prints for them.

The lines are those `loraq run` printed when the events were a word and a dict: scripts
that read a run's output see no change.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from loraq import api, cli
from loraq.protocol import OomAdjusted, Progress, Started, TrainResult
from loraq.supervisor import events

STARTED = Started(max_steps=40, base_eval_loss=2.5, base_reused=True, n_train=90, n_eval=10)
RESULT = TrainResult(staging="/s", steps=40, max_steps=40, train_loss=1.0, eval_loss=1.25, base_eval_loss=2.5,
                     n_train=90, n_eval=10)
OOM = OomAdjusted(step=3, before={"batch_size": 4, "grad_accum": 1}, after={"batch_size": 2, "grad_accum": 2},
                  error="OutOfMemoryError: CUDA out of memory")

LINES: list[tuple[api.RunEvent, str | None]] = [
    (api.Claimed(name="a", job_id=1, attempt=2, slot="slot-0(cpu)", resume_step=6),
     "[a] attempt 2 on slot-0(cpu), resuming from step 6"),
    (api.Claimed(name="a", job_id=1, attempt=1, slot="slot-0(cpu)", resume_step=None), "[a] attempt 1 on slot-0(cpu)"),
    (api.JobStarted(name="a", event=STARTED),
     "[a] 90 train / 10 eval rows, 40 steps, base reused, base eval loss 2.500"),
    (api.JobProgress(name="a", event=Progress(step=3, max_steps=40, metrics={"loss": 1.5, "learning_rate": 0.1})),
     "[a] step 3/40 loss=1.500"),
    (api.JobProgress(name="a", event=Progress(step=3, max_steps=40, metrics={"learning_rate": 0.1})), None),
    (api.Completed(name="a", adapter="/h/adapters/a", result=RESULT),
     "[a] completed: eval loss 2.500 -> 1.250, published to /h/adapters/a"),
    (api.JobFailed(name="a", failure="died", reason="killed", final=False),
     "[a] attempt failed (will retry): died: killed"),
    (api.JobFailed(name="b", failure="dependency", reason="after: a failed", final=True),
     "[b] failed: dependency: after: a failed"),
    (api.RoundEnded(name="a", round=1, steps=10, eval_loss=1.5),
     "[a] halving: round 1 done at step 10, eval loss 1.500; waiting for the round's decision"),
    (api.Stopping(signal="SIGINT", running=2), "SIGINT: asking trainers to checkpoint and stop (again to stop at once)"),
    (api.StoppingNow(signal="SIGTERM"), "SIGTERM: stopping at once"),
    (api.JobStopped(name="a", step=12), "[a] stopped at step 12; back in the queue (no attempt used)"),
    (api.JobOomAdjusted(name="a", event=OOM, line="micro-batch 4 → 2"), "[a] oom_adjusted: micro-batch 4 → 2"),
    (api.Recovered(name="a", job_id=3), "[a] recovered: {'job_id': 3}"),
    (api.Lost(name="a", why="the job was cancelled or taken over"),
     "[a] lost: {'why': 'the job was cancelled or taken over'}"),
    (api.Stalled(name="a"), "[a] stalled: {}"),
    (api.Reclaimed(job_id=4), "[queue] reclaimed: {'job_id': 4}"),
    (api.LeaseExpired(job_id=5), "[queue] lease_expired: {'job_id': 5}"),
    (api.Recycled(slot="slot-0(cpu)", rss_mb=900.5, baseline_mb=300.0),
     "[queue] recycled: {'slot': 'slot-0(cpu)', 'rss_mb': 900.5, 'baseline_mb': 300.0}"),
    (api.Fault(reason="disk full"), "[queue] fault: {'reason': 'disk full'}"),
    (api.FaultCleared(done="pause the queue"), "[queue] fault_cleared: {'done': 'pause the queue'}"),
]


@pytest.mark.parametrize(("event", "line"), LINES, ids=lambda x: type(x).__name__ if dataclasses.is_dataclass(x) else "")
def test_each_event_prints_its_line(event: api.RunEvent, line: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    progress = cli._Progress()
    progress(event)
    assert capsys.readouterr().out == (f"{line}\n" if line else "")


def test_quiet_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    progress = cli._Progress(quiet=True)
    for event, _ in LINES:
        progress(event)
    assert capsys.readouterr().out == ""


def test_every_kind_has_one_frozen_class_and_a_line() -> None:
    classes = typing.get_args(events.RunEvent)
    assert sorted(str(c.kind) for c in classes) == sorted(str(k) for k in events.RunEventKind)
    assert {type(e) for e, _ in LINES} == set(classes)
    for cls in classes:
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
