"""The Ray executor's plumbing, without a Ray cluster: imports, file shipping, event translation, stop requests.

The behaviour on real actors and nodes is in test_executor_contract.py (both
executors), test_ray_cluster.py (a lost node) and test_ray_cli.py (Ctrl-C).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from loraq import checkpoints
from loraq.errors import FailureKind
from loraq.executors.base import Slot
from loraq.executors.ray import RayExecutor, _ActorState, store_folder
from loraq.executors.ray_actor import Shipment, TrainerActor, read_tree, write_tree
from loraq.protocol import (
    CheckpointSaved,
    Done,
    Event,
    Failed,
    Heartbeat,
    JobInput,
    Message,
    Progress,
    Started,
    TrainRequest,
    TrainResult,
)
from loraq.workspace import Home


def test_importing_the_ray_executor_pulls_in_neither_ray_nor_torch() -> None:
    code = "import loraq.executors.ray, loraq.executors.ray_actor, sys, json; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout.strip().splitlines()[-1]))
    assert not loaded & {"ray", "torch", "transformers", "peft"}


# ---------------------------------------------------------------- files


def test_a_shipped_checkpoint_appears_whole_and_complete(tmp_path: Path) -> None:
    files = {"adapter_model.safetensors": b"w" * 1000, "optimizer.pt": b"o" * 3000, "sub/extra.json": b"{}"}
    target = tmp_path / "checkpoints" / "checkpoint-4"
    store_folder(target, files, step=4)
    assert checkpoints.is_complete(target)
    assert read_tree(target, exclude=frozenset({checkpoints.MARKER})) == files
    assert json.loads((target / checkpoints.MARKER).read_text())["step"] == 4
    assert [p.name for p in target.parent.iterdir()] == ["checkpoint-4"]  # no temporary folder left


def test_a_shipped_folder_with_a_file_name_leaving_it_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        store_folder(tmp_path / "staging", {"../escape": b"x"})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        write_tree(tmp_path / "scratch", {"/etc/passwd": b"x"})


# ---------------------------------------------------------------- events


class FakeActor:
    """Stands in for a Ray actor handle where an event needs no file fetch."""

    class _Method:
        def remote(self, *args: Any) -> Any:
            raise AssertionError("no remote call expected")

    fetch = _Method()


def executor_with_job(tmp_path: Path, *, resume_from: str | None = None) -> tuple[RayExecutor, Slot, TrainRequest]:
    home = Home(tmp_path / "home")
    attempt = home.attempt_dir(7, 2)
    request = TrainRequest(job_id=7, attempt=2, epoch=11, log_path=str(attempt / "train.log"),
                           job=JobInput(spec={}, base_model="base", dataset_path="data.jsonl"),
                           checkpoints_dir=str(attempt / "checkpoints"), staging_dir=str(attempt / "staging"),
                           resume_from=resume_from)
    executor = RayExecutor(home=home, devices="cpu")
    slot = Slot(index=0, device="cpu", ready=True, job_id=7,
                handle=_ActorState(actor=FakeActor(), stream=None, request=request))
    executor.all_slots = [slot]
    return executor, slot, request


def shipped(event: Event, *, job_id: int = 7, epoch: int = 11, log: bytes = b"") -> Shipment:
    return Shipment(Message(event, job_id=job_id, epoch=epoch), log=log)


def result(**fields: Any) -> TrainResult:
    return TrainResult(**{"staging": "/tmp/loraq-actor-1-x/staging", "steps": 4, "max_steps": 4, "train_loss": 1.0,
                          "eval_loss": 1.0, "base_eval_loss": 2.0, "n_train": 8, "n_eval": 2} | fields)


def test_events_of_another_job_or_epoch_are_dropped(tmp_path: Path) -> None:
    executor, slot, _ = executor_with_job(tmp_path)
    state = slot.handle
    assert executor._receive(slot, state, shipped(Progress(step=3), epoch=10)) == []
    assert executor._receive(slot, state, shipped(Done(result=result()), job_id=8)) == []
    assert executor._receive(slot, state, shipped(Progress(step=3))) == [Message(Progress(step=3), job_id=7, epoch=11)]


def test_log_chunks_land_in_the_attempts_log_in_the_home(tmp_path: Path) -> None:
    executor, slot, request = executor_with_job(tmp_path)
    for i in range(3):
        executor._receive(slot, slot.handle, shipped(Heartbeat(), log=f"line {i}\n".encode()))
    assert Path(request.log_path).read_text() == "line 0\nline 1\nline 2\n"


def test_paths_in_events_name_the_home_never_the_nodes_scratch(tmp_path: Path) -> None:
    resume = str(tmp_path / "home" / "jobs" / "7" / "attempt-2" / "resume" / "checkpoint-6")
    executor, slot, request = executor_with_job(tmp_path, resume_from=resume)
    state = slot.handle
    [started] = executor._receive(slot, state, shipped(Started(
        max_steps=4, base_eval_loss=2.0, base_reused=False, n_train=8, n_eval=2,
        resume_from="/tmp/loraq-actor-1-x/job-7-epoch-11/resume/checkpoint-6")))
    assert started.event.resume_from == resume

    checkpoint = executor._store_files(
        state, Message(CheckpointSaved(step=9, path="/tmp/loraq-actor-1-x/checkpoints/checkpoint-9"), job_id=7, epoch=11),
        {"adapter_model.safetensors": b"abc"})
    assert checkpoint.event.path == str(Path(request.checkpoints_dir) / "checkpoint-9")
    assert checkpoints.is_complete(Path(checkpoint.event.path))

    done = executor._store_files(
        state, Message(Done(result=result(resumed_from="/tmp/loraq-actor-1-x/resume/checkpoint-6")), job_id=7, epoch=11),
        {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"})
    assert done.event.result.staging == request.staging_dir
    assert done.event.result.resumed_from == resume
    assert sorted(p.name for p in Path(request.staging_dir).iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
    assert state.request is None  # the job is over for this slot: anything later from it is dropped


def test_an_adapter_that_cannot_be_stored_fails_the_attempt_as_retryable(tmp_path: Path) -> None:
    executor, slot, request = executor_with_job(tmp_path)
    attempt_dir = Path(request.staging_dir).parent
    attempt_dir.parent.mkdir(parents=True)
    attempt_dir.write_text("a file where the attempt's folder should be")  # any OSError will do
    failed = executor._store_files(slot.handle, Message(Done(result=result()), job_id=7, epoch=11),
                                   {"adapter_model.safetensors": b"w"})
    assert isinstance(failed.event, Failed) and failed.event.failure is FailureKind.IO and failed.event.failure.retryable
    assert "cannot store the adapter" in failed.event.message


# ---------------------------------------------------------------- stop requests on the actor


class FakeFlags:
    def __init__(self) -> None:
        self.graceful = threading.Event()
        self.abort = threading.Event()


class FakeService:
    def __init__(self) -> None:
        self.flags = FakeFlags()


def bare_actor() -> TrainerActor:
    """A TrainerActor without its trainer (no torch): only the stop bookkeeping is under test."""
    actor = TrainerActor.__new__(TrainerActor)
    actor.service = FakeService()  # type: ignore[assignment]
    actor._stops = {}
    actor._current = None
    actor._finished = set()
    actor._lock = threading.Lock()
    return actor


def test_a_stop_that_arrives_before_its_job_is_remembered_for_it() -> None:
    actor = bare_actor()
    actor.stop(5, 1, True)
    assert not actor.service.flags.graceful.is_set()  # nothing runs yet
    assert actor._stops[(5, 1)] == "graceful"


def test_a_stop_for_a_job_that_already_ended_does_not_touch_the_next_one() -> None:
    actor = bare_actor()
    actor._finished.add((5, 1))
    actor._current = (6, 1)
    actor.stop(5, 1, False)
    assert not actor.service.flags.abort.is_set() and (5, 1) not in actor._stops
    actor.stop(6, 1, False)
    assert actor.service.flags.abort.is_set()
    actor.stop(6, 1, True)  # an abort is never softened into a graceful stop
    assert actor._stops[(6, 1)] == "abort"


# ---------------------------------------------------------------- actors that never come up


@pytest.fixture(scope="module")
def ray_instance() -> Any:
    ray = pytest.importorskip("ray")
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def one_job(workdir: Path) -> Home:
    from conftest import TINY_DEFAULTS, write_queue
    from loraq import api

    home = Home(workdir / ".loraq")
    api.submit(write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - name: x\n    dataset: ./data/sql.jsonl\n"), home=home)
    return home


def run_worker(home: Home, executor: RayExecutor) -> None:
    from loraq import api
    from loraq.supervisor.worker import Worker, WorkerConfig

    with api.open_store(home, check=True) as store:
        Worker(home, store, executor, config=WorkerConfig(poll_s=0.05)).run()


@pytest.mark.slow
@pytest.mark.ray
def test_an_actor_that_cannot_start_stops_the_run_with_its_cause(ray_instance: Any, workdir: Path) -> None:
    """A broken node (here: no writable scratch) must not loop forever: three failed starts end the run."""
    from loraq import api
    from loraq.errors import TrainerStartError

    home = one_job(workdir)
    executor = RayExecutor(home=home, devices="cpu", scratch_root=str(workdir / "no" / "such" / "folder"))
    with pytest.raises(TrainerStartError) as failure:
        run_worker(home, executor)
    assert "died 3 times before it was ready" in str(failure.value)
    assert "FileNotFoundError" in str(failure.value) and "\x1b[" not in str(failure.value)
    assert api.status(home).to_json()["jobs"][0]["status"] == "pending"  # no attempt was used


@pytest.mark.slow
@pytest.mark.ray
def test_a_trainer_the_cluster_has_no_room_for_ends_the_run_in_time_and_says_why(ray_instance: Any, workdir: Path) -> None:
    from loraq import api
    from loraq.errors import TrainerStartError

    home = one_job(workdir)
    executor = RayExecutor(home=home, devices="cpu", actor_options={"resources": {"a100": 1}}, placement_timeout_s=2.0)
    with pytest.raises(TrainerStartError) as failure:
        run_worker(home, executor)
    assert "no trainer actor started on the Ray cluster in 2 s" in str(failure.value)
    assert "with 1 CPU, 1 a100 each" in str(failure.value) and "2 CPU free" in str(failure.value)
    assert api.status(home).to_json()["jobs"][0]["status"] == "pending"
    assert ray_instance.is_initialized()  # a Ray connection the executor did not open stays open
