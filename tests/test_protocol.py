"""The seam's messages: every kind has a payload, each survives the wire, and what does not fit is refused."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from loraq.errors import FailureKind, ProtocolError
from loraq.protocol import (
    PAYLOADS,
    Aborted,
    CheckpointSaved,
    Command,
    Done,
    EventKind,
    Exited,
    Failed,
    Heartbeat,
    JobInput,
    Memory,
    Message,
    OomAdjusted,
    Progress,
    Ready,
    Started,
    Stopped,
    TrainRequest,
    TrainResult,
    command_from_wire,
    command_to_wire,
    decode,
    from_wire,
    to_wire,
)

RESULT = TrainResult(staging="/home/jobs/1/attempt-1/staging", steps=6, max_steps=6, train_loss=None, eval_loss=1.25,
                     base_eval_loss=2.5, n_train=90, n_eval=10, memory=Memory(rss_mb=512.5, cuda_peak_mb=100.0),
                     versions={"torch": "2.13.0"}, timings={"train_s": 1.5}, metrics={"exact_match": 0.75},
                     extras={"samples": [{"prompt": "2+2", "base": "5", "adapter": "4"}], "packing": {"rows": 3}})

#: One of each kind, with every optional field it has set somewhere.
EXAMPLES = [
    Ready(pid=12, device="cpu", versions={"torch": "2.13.0"}, node="n1", ip="10.0.0.1"),
    Started(max_steps=6, base_eval_loss=2.5, base_reused=True, n_train=90, n_eval=10, resume_from="/x/checkpoint-3"),
    Progress(step=3, max_steps=6, metrics={"loss": 1.5, "learning_rate": 1e-4}),
    Heartbeat(step=4, max_steps=6),
    CheckpointSaved(step=3, path="/x/checkpoint-3"),
    OomAdjusted(step=3, before={"batch_size": 4, "grad_accum": 1, "gradient_checkpointing": False},
                after={"batch_size": 2, "grad_accum": 2, "gradient_checkpointing": False},
                error="OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", asked="2.00 GiB", resume_step=2),
    Done(result=RESULT, memory=RESULT.memory, base_loads=1),
    Stopped(step=4, memory=Memory(rss_mb=500.0), base_loads=1),
    Failed(failure=FailureKind.INTERNAL, message="RuntimeError: boom", where="loraq/train/service.py:12",
           traceback="Traceback ..."),
    Aborted(),
    Exited(reason="trainer process killed by SIGKILL", was_ready=True, log="/home/logs/trainer-0.log", returncode=-9),
]


def test_every_event_kind_has_a_payload_and_an_example() -> None:
    assert set(PAYLOADS) == set(EventKind)
    assert {type(e).kind for e in EXAMPLES} == set(EventKind)
    assert all(PAYLOADS[type(e).kind] is type(e) for e in EXAMPLES)


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).kind.value)
def test_each_message_survives_the_wire_as_json(event: Any) -> None:
    message = Message(event, job_id=7, epoch=3)
    wire = json.loads(json.dumps(to_wire(message)))
    assert wire["ev"] == type(event).kind.value and wire["job_id"] == 7
    assert from_wire(wire) == message


def test_a_request_survives_the_wire() -> None:
    request = TrainRequest(job_id=1, attempt=2, epoch=5, log_path="/l", checkpoints_dir="/c", staging_dir="/s",
                           job=JobInput(spec={"name": "a", "training": {"seed": 3}}, base_model="/m", dataset_path="/d",
                                        dataset_sha256="ab" * 32))
    wire = json.loads(json.dumps(command_to_wire(Command.TRAIN, request)))
    assert command_from_wire(wire) == (Command.TRAIN, request)
    assert command_from_wire(command_to_wire(Command.ABORT)) == (Command.ABORT, None)
    with pytest.raises(ValueError):
        command_to_wire(Command.STOP, request)


def test_the_job_input_takes_what_the_trainer_needs_from_the_stored_spec() -> None:
    stored = {"spec": {"name": "a"}, "queue_file": "/q.yaml", "base_model": "/m", "dataset_path": "/d",
              "eval_dataset_path": None, "dataset_sha256": "x", "eval_dataset_sha256": None, "dataset_rows": 120}
    assert JobInput.of_stored(stored) == JobInput(spec={"name": "a"}, base_model="/m", dataset_path="/d",
                                                  dataset_sha256="x")


def test_a_result_field_added_later_by_a_newer_trainer_is_ignored_and_extras_travel_as_they_are() -> None:
    wire = to_wire(Message(Done(result=RESULT), job_id=1, epoch=1))
    wire["result"]["exact_match_gate"] = 0.5  # a field this supervisor does not know yet
    wire["tokens_per_s"] = 1000.0
    decoded = from_wire(wire)
    assert decoded.event == Done(result=RESULT)
    assert decoded.event.result.extras["samples"][0]["adapter"] == "4"


def test_a_non_finite_loss_survives_the_wire() -> None:
    wire = json.loads(json.dumps(to_wire(Message(Progress(step=2, metrics={"loss": math.nan})))))
    assert math.isnan(from_wire(wire).event.metrics["loss"])


@pytest.mark.parametrize(("wire", "error"), [
    ({"ev": "finished"}, "ev: 'finished' is not one of ready, started"),
    ({"ev": "progress", "job_id": 1}, "progress: step is missing"),
    ({"ev": "progress", "step": "3"}, "progress.step: expected int, got '3'"),
    ({"ev": "progress", "step": True}, "progress.step: expected int, got True"),
    ({"ev": "progress", "step": 3, "metrics": {"loss": "low"}}, "progress.metrics.loss: expected a number"),
    ({"ev": "failed", "failure": "error", "message": "x"}, "failed.failure: 'error' is not one of spec, data"),
    ({"ev": "done", "result": {"staging": "/s"}}, "done.result: steps is missing"),
    ({"ev": "checkpoint", "step": 3, "path": "/p", "job_id": "7"}, "job_id: expected int, got '7'"),
    (["ev", "progress"], "an event is an object, not list"),
])
def test_what_does_not_fit_is_refused_naming_the_field(wire: Any, error: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        from_wire(wire)
    assert error in str(refused.value)


def test_a_command_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ProtocolError, match="request: expected an object"):
        command_from_wire({"op": "train"})
    with pytest.raises(ProtocolError, match="op: 'pause' is not one of"):
        command_from_wire({"op": "pause"})


def test_decode_reads_a_stored_result_back() -> None:
    """A job's stored result is the wire form of its TrainResult, plus what the supervisor added."""
    stored = to_wire(RESULT) | {"inspection": {"passed": True}, "adapter": "/home/adapters/a"}
    assert decode(TrainResult, stored) == RESULT


def test_the_enums_read_as_their_values_in_messages() -> None:
    assert f"{FailureKind.IO}: {EventKind.DONE} {Command.STOP}" == "io: done stop"
