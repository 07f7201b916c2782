"""The Ray executor's actor: a trainer on a cluster node, with its event stream and file plumbing.

:class:`TrainerActor` wraps the same :class:`~loraq.train.service.TrainerService` as
a local trainer process. :class:`~loraq.executors.ray.RayExecutor` (in the
supervisor) makes it a threaded Ray actor, reads its one event stream (a
:class:`Shipment` per :mod:`loraq.protocol` message, which Ray pickles), sends it
jobs and stop requests, and fetches the files its events name. Each job trains in
a node-local scratch folder (checkpoints, staging, log, the resume checkpoint and
datasets sent with the job), removed when the job ends; the scratch folders of
actors that died are removed by the next actor started on the node.

Runs on the node: the trainer (torch) is imported when an actor starts, ray only
inside the calls that need it, so importing this module pulls in neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoints
from ..errors import FailureKind, classify, describe, raised_at
from ..protocol import (
    FINAL_KINDS,
    CheckpointSaved,
    Done,
    Event,
    Failed,
    Message,
    Ready,
    Started,
    TrainRequest,
)
from .base import pid_alive

#: Most log bytes one event carries; the rest follows on the next events.
LOG_CHUNK_BYTES = 1 << 20
SCRATCH_PREFIX = "loraq-actor-"


@dataclass(frozen=True)
class Shipment:
    """One item of an actor's event stream: a message, with what travels beside it.

    ``log`` is the job's train log written since the previous shipment; ``fetch`` names
    files the actor holds for this message (a checkpoint, the adapter), which the
    supervisor fetches before it passes the message on.
    """

    message: Message
    log: bytes = b""
    fetch: str | None = None


def read_tree(folder: Path, *, exclude: frozenset[str] = frozenset()) -> dict[str, bytes]:
    """Every regular file below ``folder`` as ``{relative posix path: bytes}`` (links are skipped)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name not in exclude:
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


def write_tree(folder: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` below ``folder`` (node-local scratch: no durability needed)."""
    root = folder.resolve()
    for rel, data in files.items():
        path = folder / rel
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"file name {rel!r} leaves {folder}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)



class TrainerActor:
    """A trainer on a Ray node: a :class:`TrainerService` plus event and file plumbing.

    Wrapped with ``ray.remote(max_concurrency=...)`` by :class:`RayExecutor`; plain
    Python here so that importing this module needs no ray.
    """

    def __init__(self, device: str, scratch_root: str | None = None) -> None:
        if device == "cpu":  # before torch loads OpenMP: see executors.base.trainer_env
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from ..train import service as trainer

        self._trainer = trainer
        self.service = trainer.TrainerService(device=device)
        self.device = device
        self._events: queue.Queue[Shipment | None] = queue.Queue()
        self._outbox: dict[str, dict[str, bytes]] = {}
        self._stops: dict[tuple[int, int], str] = {}  # (job_id, epoch) -> "graceful" | "abort"
        self._current: tuple[int, int] | None = None
        self._finished: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        root = Path(scratch_root or tempfile.gettempdir())
        _remove_dead_scratch(root)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=root))

    # ------------------------------------------------------------ calls from the supervisor

    def events(self) -> Iterator[Shipment]:
        """The actor's one event stream (a streaming generator): ``ready``, then every job's events."""
        yield Shipment(Message(Ready(pid=os.getpid(), device=self.device, node=self._node_id(), ip=self._node_ip(),
                                     versions=self._trainer.versions())))
        while True:
            shipment = self._events.get()
            if shipment is None:
                return
            yield shipment

    def train(self, request: TrainRequest, resume_files: dict[str, bytes] | None,
              data_files: dict[str, tuple[str, bytes]]) -> None:
        """Run one job to its end (in this call's thread); its events go to the stream."""
        job_id, epoch = request.job_id, request.epoch
        key = (job_id, epoch)
        work = self.scratch / f"job-{job_id}-epoch-{epoch}"
        log_state = {"offset": 0}
        local_log = work / "train.log"

        def log_delta(limit: int | None = LOG_CHUNK_BYTES) -> bytes:
            try:
                with open(local_log, "rb") as fh:
                    fh.seek(log_state["offset"])
                    chunk = fh.read(limit if limit is not None else -1)
            except OSError:
                return b""
            log_state["offset"] += len(chunk)
            return chunk

        def emit(event: Event, fetch: str | None = None) -> None:
            stop = self._stops.get(key)
            if stop == "graceful":
                self.service.flags.graceful.set()
            elif stop == "abort":
                self.service.flags.abort.set()
            if isinstance(event, Started):
                event = dataclasses.replace(event, node=self._node_id())
            elif isinstance(event, CheckpointSaved):
                # on_save calls emit once the checkpoint is complete and before training goes
                # on, so the folder is whole here; its bytes wait in the outbox for the supervisor.
                fetch = self._hold(read_tree(Path(event.path), exclude=frozenset({checkpoints.MARKER})))
            chunk = log_delta(None if event.kind in FINAL_KINDS else LOG_CHUNK_BYTES)
            self._events.put(Shipment(Message(event, job_id=job_id, epoch=epoch), log=chunk, fetch=fetch))

        self._current = key
        try:
            local = self._localize(request, work, resume_files, data_files)
            with open(local_log, "ab") as fh:
                fh.write(f"[{time.strftime('%H:%M:%S')}] ray actor pid {os.getpid()} on node "
                         f"{self._node_id()} ({self._node_ip()})\n".encode())
            outcome = self.service.run_job(local, emit)
            fetch = self._hold(read_tree(Path(outcome.result.staging))) if isinstance(outcome, Done) else None
            emit(outcome, fetch)
        except BaseException as exc:  # the job must end with an event, whatever broke around it
            kind = classify(exc)
            emit(Failed(failure=kind, message=f"ray actor: {describe(exc)}", traceback=traceback.format_exc(),
                        where=raised_at(exc) if kind is FailureKind.INTERNAL else None))
        finally:
            with self._lock:
                self._current = None
                self._finished.add(key)
                self._stops.pop(key, None)
            shutil.rmtree(work, ignore_errors=True)

    def stop(self, job_id: int, epoch: int, graceful: bool) -> None:
        """Ask the running job to checkpoint and stop (graceful) or to stop at once.

        Remembered by job: a threaded actor may run this call before ``train`` starts, and
        a request that arrives after its job ended must not stop the next one.
        """
        key = (job_id, epoch)
        with self._lock:
            if key in self._finished:
                return
            if self._stops.get(key) != "abort":
                self._stops[key] = "graceful" if graceful else "abort"
            if self._current == key:
                (self.service.flags.graceful if graceful else self.service.flags.abort).set()

    def fetch(self, key: str) -> dict[str, bytes]:
        """The files an event named; handed over once."""
        with self._lock:
            return self._outbox.pop(key)

    def close(self) -> None:
        """End the event stream and remove this actor's scratch folder (before a kill)."""
        self._events.put(None)
        shutil.rmtree(self.scratch, ignore_errors=True)

    # ------------------------------------------------------------ helpers

    def _hold(self, files: dict[str, bytes]) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._outbox[key] = files
        return key

    def _localize(self, request: TrainRequest, work: Path, resume_files: dict[str, bytes] | None,
                  data_files: dict[str, tuple[str, bytes]]) -> TrainRequest:
        """The request with every path pointing into node-local scratch."""
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        resume_from = None
        if request.resume_from and resume_files:
            folder = work / "resume" / Path(request.resume_from).name  # keeps the checkpoint-N name
            write_tree(folder, resume_files)
            resume_from = str(folder)
        shipped: dict[str, Any] = {}
        for field, (name, data) in data_files.items():
            path = work / "data" / field / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            shipped[field] = str(path)
        # The shipped datasets live in this scratch folder: the trainer may read them there.
        return dataclasses.replace(request, checkpoints_dir=str(work / "checkpoints"), staging_dir=str(work / "staging"),
                                   log_path=str(work / "train.log"), resume_from=resume_from,
                                   job=dataclasses.replace(request.job, **shipped),
                                   read_roots=[*request.read_roots, str(work / "data")])

    @staticmethod
    def _node_id() -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    @staticmethod
    def _node_ip() -> str:
        import ray

        return str(ray.util.get_node_ip_address())


def _remove_dead_scratch(root: Path) -> None:
    """Scratch folders of actors on this node that died without cleaning up (a kill, a lost job)."""
    with contextlib.suppress(OSError):
        for folder in root.glob(f"{SCRATCH_PREFIX}*"):
            pid = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)) and folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
