"""The Ray executor: one trainer actor per GPU (or CPU) of a Ray cluster.

The supervisor (the worker) stays where it is and remains the only writer of the
store; it talks to this executor exactly as it talks to :class:`LocalExecutor`.
Each slot is a threaded Ray actor (:class:`~loraq.executors.ray_actor.TrainerActor`)
wrapping the same :class:`~loraq.train.service.TrainerService` as a local trainer
process, so the base model stays hot across jobs. Requests and events are the
:mod:`loraq.protocol` objects themselves; Ray pickles them.

Events. Each actor has one streaming-generator call that lives as long as the
actor (``events``): it yields ``ready`` once the trainer is loaded, then every
event of every job, in order. ``poll`` waits on all of these streams at once with
``ray.wait``. A stream that fails (the actor or its node died, the actor was
killed) becomes the same ``exited`` event a dead trainer process gives, so the
worker's retry, lease and fencing logic applies unchanged. Jobs (``train``) and
stop requests (``stop``) are separate calls on the same actor; it is threaded, so
a stop reaches a job that is running.

Files. Nothing assumes a shared file system between the supervisor and the
actors. An actor trains into node-local scratch folders. When a checkpoint is
complete, or the adapter is saved, the actor holds its bytes and sends an event
naming them; the supervisor fetches them with a plain actor call before passing
the event on, writes a checkpoint into the attempt's folder in the home
atomically (then marks it complete) and the adapter into the attempt's staging
folder. The train log travels as chunks on the events. A retried attempt's
``resume_from`` checkpoint is read from the home and sent with the job, as are
datasets up to :data:`SHIP_DATA_MAX_BYTES` (larger ones, and base models, are
read at their path on the node: a local folder there, or a hub id).

Neither this module nor :mod:`loraq.executors.ray_actor` imports ray or torch at import
time: ray is imported when the executor starts, the trainer when an actor starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoints, fsutil
from ..errors import FailureKind, UsageError
from ..protocol import (
    FINAL_KINDS,
    CheckpointSaved,
    Done,
    Exited,
    Failed,
    Heartbeat,
    JobInput,
    Message,
    Ready,
    Started,
    TrainRequest,
)
from ..workspace import Home
from .base import Slot, parse_devices
from .ray_actor import Shipment, TrainerActor, read_tree, write_tree

#: Datasets up to this size travel with the job; larger ones are read at their path on the node.
SHIP_DATA_MAX_BYTES = 256 * 2**20
#: How long a run waits with no trainer actor up (none placed, or none started) before giving up.
PLACEMENT_TIMEOUT_S = 600.0
#: Concurrent calls an actor serves: its event stream, a job, and stop/fetch calls beside them.
ACTOR_CONCURRENCY = 4


@dataclass
class _ActorState:
    """What the executor knows of a slot's current actor."""

    actor: Any  # ray ActorHandle
    stream: Any  # ObjectRefGenerator of its events() call
    request: TrainRequest | None = None  # the job it runs, with the home's paths
    fetching: tuple[Any, Message] | None = None  # (ObjectRef of files, the message they belong to)
    node: str | None = None
    ip: str | None = None
    pid: int | None = None


class RayExecutor:
    """A trainer actor per device on a Ray cluster; see the module docstring.

    Args:
        home: the supervisor's home; checkpoints, staging and logs are written there.
        devices: ``"cpu,cpu"`` (two actors with one CPU each), ``"0,1"`` (two actors with
            one GPU each: Ray picks the GPUs), ``None`` (one actor per GPU of the cluster,
            else one CPU actor).
        address: ``None`` starts a local Ray instance (stopped again by :meth:`shutdown`);
            ``"auto"`` or ``HOST:PORT`` joins a running cluster. If this process is already
            connected to Ray, that connection is used and left open.
        actor_options: extra ``.options()`` for the actors (``resources``, ``runtime_env``, ...).
        placement_timeout_s: how long the run waits with no trainer up at all (the cluster
            has no room, or an autoscaler is adding it) before it gives up.
    """

    def __init__(self, *, home: Home, devices: str | None = None, address: str | None = None,
                 actor_options: dict[str, Any] | None = None, scratch_root: str | None = None,
                 placement_timeout_s: float = PLACEMENT_TIMEOUT_S) -> None:
        self.home = home
        self.address = address
        self.devices_arg = devices
        self.actor_options = dict(actor_options or {})
        self.scratch_root = scratch_root
        self.all_slots: list[Slot] = []
        self._ray: Any = None
        self._owns_connection = False
        self._actor_class: Any = None
        self.placement_timeout_s = placement_timeout_s
        self._none_ready_since: float | None = None

    # -------------------------------------------------------------- lifecycle

    @property
    def slots(self) -> list[Slot]:
        """Slots whose actor is up. A slot waiting for room on the cluster gets no job."""
        return [slot for slot in self.all_slots if slot.ready and slot.handle is not None]

    def start(self) -> None:
        if self._ray is None:
            self._connect()
        for slot in self.all_slots:
            if slot.handle is None:
                self._launch(slot)

    def _connect(self) -> None:
        try:
            import ray
        except ImportError as exc:
            raise UsageError("--executor ray needs Ray on this machine: pip install 'loraq[ray]'") from exc

        if not ray.is_initialized():
            devices = parse_devices(self.devices_arg) if self.devices_arg else []
            # Trainer output goes to each job's log, not to this terminal.
            init: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
            try:
                if self.address:
                    ray.init(address=self.address, **init)
                else:
                    cpus = max(os.cpu_count() or 1, sum(1 for d in devices if d == "cpu"))
                    ray.init(address="local", num_cpus=cpus, include_dashboard=False, **init)
            except ConnectionError as exc:
                raise UsageError(f"--ray-address {self.address}: cannot reach a Ray cluster there: {exc}") from exc
            self._owns_connection = True
        self._ray = ray
        try:
            self._actor_class = ray.remote(max_concurrency=ACTOR_CONCURRENCY, max_restarts=0)(TrainerActor)
            self.all_slots = [Slot(index=i, device=d) for i, d in enumerate(self._devices())]
            self._check_room()
        except BaseException:
            self.shutdown()
            raise

    def _devices(self) -> list[str]:
        if self.devices_arg:
            return ["cpu" if d == "cpu" else "gpu" for d in parse_devices(self.devices_arg)]
        gpus = int(self._ray.cluster_resources().get("GPU", 0))
        return ["gpu"] * gpus or ["cpu"]

    def _check_room(self) -> None:
        """A local instance cannot grow: refuse devices it can never place."""
        if not self._owns_connection or self.address:
            return  # a cluster may get nodes later (autoscaler, `ray start`): wait for room
        total = self._ray.cluster_resources()
        wanted = sum(1 for s in self.all_slots if s.device == "gpu")
        if wanted > total.get("GPU", 0):
            raise UsageError(f"--devices asks for {wanted} GPU trainer(s) but this machine's Ray instance has "
                             f"{int(total.get('GPU', 0))} GPU(s); use --devices cpu, or --ray-address for a cluster")

    def _launch(self, slot: Slot) -> None:
        resources = {"num_cpus": 1, "num_gpus": 1} if slot.device == "gpu" else {"num_cpus": self._cpu_share()}
        options = {**resources, **self.actor_options}
        actor = self._actor_class.options(**options).remote("cpu" if slot.device == "cpu" else "cuda", self.scratch_root)
        stream = actor.events.options(num_returns="streaming").remote()
        slot.attach(_ActorState(actor=actor, stream=stream))

    def _cpu_share(self) -> int:
        """The CPUs a CPU trainer reserves: on the instance this run started, an equal share of the
        machine's (as the local executor gives its trainers threads); on a cluster, 1.

        Ray sets a task's ``OMP_NUM_THREADS`` to its ``num_cpus``: with 1 a lone CPU trainer
        would train on one core of the machine's two.
        """
        if not self._owns_connection or self.address:
            return 1
        cpu_slots = sum(1 for s in self.all_slots if s.device == "cpu")
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)) // max(cpu_slots, 1))

    def pid(self, slot: Slot) -> int | None:
        state: _ActorState | None = slot.handle
        return state.pid if state else None

    def submit(self, slot: Slot, request: TrainRequest) -> None:
        if slot.handle is None:
            self._launch(slot)
        state: _ActorState = slot.handle
        slot.take(request.job_id)
        state.request = request
        resume_files = None
        if request.resume_from:
            try:
                resume_files = read_tree(Path(request.resume_from), exclude=frozenset({checkpoints.MARKER}))
            except OSError:
                resume_files = None  # unreadable: the job starts over rather than not at all
        # A dead actor shows up on its stream as 'exited'; nothing to catch here.
        state.actor.train.remote(request, resume_files, _data_files(request.job, request.read_roots))

    def stop_job(self, slot: Slot, *, graceful: bool) -> None:
        state: _ActorState | None = slot.handle
        if state is not None and state.request is not None:
            state.actor.stop.remote(state.request.job_id, state.request.epoch, graceful)

    def kill(self, slot: Slot) -> None:
        """Kill the slot's actor (a stall, a second Ctrl-C); its death arrives as 'exited'."""
        state: _ActorState | None = slot.handle
        if state is not None:
            with contextlib.suppress(Exception):
                self._ray.kill(state.actor, no_restart=True)

    def recycle(self, slot: Slot) -> None:
        """Replace the slot's actor with a fresh one (its memory grew)."""
        self._close(slot, graceful=True)
        self._launch(slot)

    def _close(self, slot: Slot, *, graceful: bool) -> None:
        state: _ActorState | None = slot.handle
        if state is None:
            return
        was_ready = slot.ready
        slot.detach()
        if graceful and was_ready and state.request is None:
            with contextlib.suppress(Exception):
                self._ray.get(state.actor.close.remote(), timeout=10)
        with contextlib.suppress(Exception):
            self._ray.kill(state.actor, no_restart=True)

    def shutdown(self) -> None:
        if self._ray is None:
            return
        for slot in self.all_slots:
            self._close(slot, graceful=not slot.busy)
        if self._owns_connection:
            self._ray.shutdown()  # stops the local instance we started; only disconnects from a cluster
            self._owns_connection = False
        self._ray = None

    # -------------------------------------------------------------- events

    def poll(self, timeout: float) -> list[tuple[Slot, Message]]:
        self._check_progress()
        waiting = []
        for slot in self.all_slots:
            state: _ActorState | None = slot.handle
            if state is not None:
                waiting.append((slot, state.fetching[0] if state.fetching else state.stream))
        if not waiting:
            time.sleep(timeout)
            return []
        ray = self._ray
        ready, _ = ray.wait([w for _, w in waiting], num_returns=1, timeout=timeout)
        if ready:  # and whatever else is ready by now
            ready, _ = ray.wait([w for _, w in waiting], num_returns=len(waiting), timeout=0)
        events: list[tuple[Slot, Message]] = []
        for slot, waitable in waiting:
            if any(r is waitable or r == waitable for r in ready):
                events.extend((slot, ev) for ev in self._drain(slot))
        return events

    def _check_progress(self) -> None:
        """A replacement may wait for room while others work; with no trainer up at all, give up in time."""
        if any(slot.ready for slot in self.all_slots) or not self.all_slots:
            self._none_ready_since = None
            return
        now = time.monotonic()
        if self._none_ready_since is None:
            self._none_ready_since = now
        elif now - self._none_ready_since > self.placement_timeout_s:
            from ..errors import TrainerStartError

            kinds = sorted({slot.device for slot in self.all_slots})
            raise TrainerStartError(
                f"no trainer actor started on the Ray cluster in {self.placement_timeout_s:.0f} s "
                f"({len(self.all_slots)} wanted, {'/'.join(kinds)}, with {self._resources_text()} each); "
                f"the cluster has {_resources(self._ray.available_resources())} free: add nodes, or ask for fewer "
                "trainers with --devices")

    def _resources_text(self) -> str:
        wanted = {"num_cpus": 1, "num_gpus": 1 if any(s.device == "gpu" for s in self.all_slots) else 0}
        wanted.update({k: v for k, v in self.actor_options.items() if k in ("num_cpus", "num_gpus")})
        text = ", ".join(f"{v} {k[4:-1].upper()}" for k, v in wanted.items() if v)  # num_cpus -> CPU
        extra = self.actor_options.get("resources") or {}
        return ", ".join([text] + [f"{v} {k}" for k, v in extra.items()]) if extra else text

    def _drain(self, slot: Slot, limit: int = 200) -> list[Message]:
        """Messages of one slot that are ready now, in order; a file fetch holds back the rest."""
        out: list[Message] = []
        for _ in range(limit):
            state: _ActorState | None = slot.handle
            if state is None:
                break
            if state.fetching is not None:
                ref, message = state.fetching
                if not self._ray.wait([ref], timeout=0)[0]:
                    break
                state.fetching = None
                try:
                    files = self._ray.get(ref)
                except Exception as exc:  # the actor or its node is gone with the files
                    out.append(self._exited(slot, exc))
                    break
                out.append(self._store_files(state, message, files))
                continue
            if not self._ray.wait([state.stream], timeout=0)[0]:
                break
            try:
                ref = next(state.stream)
                shipment = self._ray.get(ref)
            except StopIteration:
                out.append(self._exited(slot, None))
                break
            except Exception as exc:  # RayActorError, ObjectLostError, ...: the actor is gone
                out.append(self._exited(slot, exc))
                break
            out.extend(self._receive(slot, state, shipment))
        return out

    def _receive(self, slot: Slot, state: _ActorState, shipment: Shipment) -> list[Message]:
        message = shipment.message
        event = message.event
        if isinstance(event, Ready):
            slot.became_ready()
            state.node, state.ip, state.pid = event.node, event.ip, event.pid
            return [message]
        request = state.request
        if request is None or (message.job_id, message.epoch) != (request.job_id, request.epoch):
            return []  # a late event of a job this slot no longer runs
        if shipment.log:
            _append(Path(request.log_path), shipment.log)
        if shipment.fetch is not None:
            state.fetching = (state.actor.fetch.remote(shipment.fetch), message)
            return []
        return [self._translate(state, message)]

    def _store_files(self, state: _ActorState, message: Message, files: dict[str, bytes]) -> Message:
        """Write shipped files into the home; the message then names the home's folder."""
        request = state.request
        assert request is not None
        event = message.event
        try:
            if isinstance(event, CheckpointSaved):
                target = Path(request.checkpoints_dir) / checkpoints.checkpoint_name(event.step)
                store_folder(target, files, step=event.step)
                event = dataclasses.replace(event, path=str(target))
            elif isinstance(event, Done):
                store_folder(Path(request.staging_dir), files)
                event = dataclasses.replace(event, result=dataclasses.replace(event.result, staging=request.staging_dir))
        except (OSError, ValueError) as exc:
            if isinstance(event, Done):
                event = Failed(failure=FailureKind.IO, memory=event.memory, base_loads=event.base_loads,
                               message=f"cannot store the adapter shipped from the Ray actor in {request.staging_dir}: {exc}")
            else:  # a checkpoint that cannot be stored is skipped; a retry resumes from an older one
                step = getattr(event, "step", None)
                _append(Path(request.log_path), f"loraq: could not store checkpoint {step}: {exc}\n".encode())
                event = Heartbeat(step=step)
        return self._translate(state, dataclasses.replace(message, event=event))

    def _translate(self, state: _ActorState, message: Message) -> Message:
        """Paths in events name the home's folders, never the actor's scratch."""
        request = state.request
        assert request is not None
        event = message.event
        if isinstance(event, Started) and event.resume_from:
            message = dataclasses.replace(message, event=dataclasses.replace(event, resume_from=request.resume_from))
        elif isinstance(event, Done):
            resumed = request.resume_from if event.result.resumed_from else None
            message = dataclasses.replace(message, event=dataclasses.replace(
                event, result=dataclasses.replace(event.result, resumed_from=resumed)))
        if event.kind in FINAL_KINDS:
            state.request = None
        return message

    def _exited(self, slot: Slot, exc: BaseException | None) -> Message:
        state: _ActorState | None = slot.handle
        was_ready = slot.ready
        where = f"node {state.node} ({state.ip}), actor pid {state.pid}" if state and state.node else "its node"
        reason = ("trainer actor ended its event stream" if exc is None
                  else f"trainer actor died: {type(exc).__name__}: {_summary(exc)}")
        self._close(slot, graceful=False)
        return Message(Exited(reason=reason, was_ready=was_ready,
                              log=f"Ray worker logs on {where} (/tmp/ray/session_latest/logs there)"), job_id=slot.job_id)


def store_folder(target: Path, files: dict[str, bytes], *, step: int | None = None) -> None:
    """Write ``files`` as folder ``target``, which appears whole, in one rename, or not at all.

    With ``step`` the folder is a checkpoint, marked complete before the rename. The
    files are written plainly into the hidden folder of ``fsutil.building_dir`` and
    fsynced once each (by ``mark_complete`` or ``fsync_tree``): half the fsyncs of
    writing each one atomically; nothing can see them before the rename.
    """
    with fsutil.building_dir(target) as tmp:
        write_tree(tmp, files)
        if step is not None:
            checkpoints.mark_complete(tmp, step=step)
        else:
            fsutil.fsync_tree(tmp)


def _data_files(job: JobInput, roots: list[str] | None = None) -> dict[str, tuple[str, bytes]]:
    """Datasets small enough to send with the job: ``{field: (file name, bytes)}``.

    Read as the trainer reads them: a regular file inside the job's roots, on the
    descriptor checked (a FIFO swapped in must not block the supervisor).
    """
    from ..errors import PathError
    from ..sandbox import Roots, read_fd

    # A request without roots (an older worker's): the folders of its own datasets.
    allowed = Roots.of(roots or [str(Path(p).parent) for p in (job.dataset_path, job.eval_dataset_path) if p])
    out = {}
    for field in ("dataset_path", "eval_dataset_path"):
        path = getattr(job, field)
        if not path:
            continue
        try:
            fd, st = allowed.open_file(path, what="dataset")
        except PathError:
            continue  # the trainer refuses it with the reason
        try:
            if st.st_size <= SHIP_DATA_MAX_BYTES:
                out[field] = (Path(path).name, read_fd(fd, SHIP_DATA_MAX_BYTES + 1))
        except OSError:
            continue  # the node reads it at its path, and says so if it cannot
        finally:
            os.close(fd)
    return out


def _resources(available: dict[str, float]) -> str:
    shown = {k: v for k, v in available.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "nothing"


def _append(path: Path, data: bytes) -> None:
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fh.write(data)


def _summary(exc: BaseException) -> str:
    """The first line of a Ray error, and its last (the cause, where Ray quotes a traceback)."""
    import re

    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
