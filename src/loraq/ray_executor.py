"""The Ray executor: one trainer actor per GPU (or CPU) of a Ray cluster.

The supervisor (the worker) stays where it is and remains the only writer of the
store; it talks to this executor exactly as it talks to :class:`LocalExecutor`.
Each slot is a threaded Ray actor wrapping the same :class:`TrainerService` as a
local trainer process, so the base model stays hot across jobs.

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

This module imports neither ray nor torch at import time: the actor side imports
the trainer when an actor starts, the supervisor side imports ray when the
executor starts.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoints, fsutil
from .errors import UsageError
from .executor import Event, Slot, parse_devices
from .workspace import Home

#: Datasets up to this size travel with the job; larger ones are read at their path on the node.
SHIP_DATA_MAX_BYTES = 256 * 2**20
#: Most log bytes one event carries; the rest follows on the next events.
LOG_CHUNK_BYTES = 1 << 20
#: How long a run waits with no trainer actor up (none placed, or none started) before giving up.
PLACEMENT_TIMEOUT_S = 600.0
#: Concurrent calls an actor serves: its event stream, a job, and stop/fetch calls beside them.
ACTOR_CONCURRENCY = 4
SCRATCH_PREFIX = "loraq-actor-"

FINAL_EVENTS = frozenset({"done", "stopped", "failed", "aborted"})


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


# ================================================================ the actor (runs on a cluster node)


class TrainerActor:
    """A trainer on a Ray node: a :class:`TrainerService` plus event and file plumbing.

    Wrapped with ``ray.remote(max_concurrency=...)`` by :class:`RayExecutor`; plain
    Python here so that importing this module needs no ray.
    """

    def __init__(self, device: str, scratch_root: str | None = None) -> None:
        from . import trainer

        self._trainer = trainer
        self.service = trainer.TrainerService(device=device)
        self.device = device
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._outbox: dict[str, dict[str, bytes]] = {}
        self._stops: dict[tuple[int, int], str] = {}  # (job_id, epoch) -> "graceful" | "abort"
        self._current: tuple[int, int] | None = None
        self._finished: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        root = Path(scratch_root or tempfile.gettempdir())
        _remove_dead_scratch(root)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=root))

    # ------------------------------------------------------------ calls from the supervisor

    def events(self) -> Any:
        """The actor's one event stream (a streaming generator): ``ready``, then every job's events."""
        import ray

        yield {"ev": "ready", "pid": os.getpid(), "device": self.device, "node": ray.get_runtime_context().get_node_id(),
               "ip": ray.util.get_node_ip_address(), "versions": self._trainer.versions()}
        while True:
            event = self._events.get()
            if event is None:
                return
            yield event

    def train(self, request: dict[str, Any], resume_files: dict[str, bytes] | None,
              data_files: dict[str, tuple[str, bytes]]) -> None:
        """Run one job to its end (in this call's thread); its events go to the stream."""
        job_id, epoch = int(request["job_id"]), int(request["epoch"])
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

        def emit(event: dict[str, Any]) -> None:
            event = {**event, "job_id": job_id, "epoch": epoch}
            stop = self._stops.get(key)
            if stop == "graceful":
                self.service.flags.graceful.set()
            elif stop == "abort":
                self.service.flags.abort.set()
            if event.get("ev") == "started":
                event["node"] = self._node_id()
            elif event.get("ev") == "checkpoint":
                # on_save calls emit once the checkpoint is complete and before training goes
                # on, so the folder is whole here; its bytes wait in the outbox for the supervisor.
                files = read_tree(Path(event["path"]), exclude=frozenset({checkpoints.MARKER}))
                event["fetch"] = self._hold(files)
            final = event.get("ev") in FINAL_EVENTS
            chunk = log_delta(None if final else LOG_CHUNK_BYTES)
            if chunk:
                event["log"] = chunk
            self._events.put(event)

        self._current = key
        try:
            local = self._localize(request, work, resume_files, data_files)
            with open(local_log, "ab") as fh:
                fh.write(f"[{time.strftime('%H:%M:%S')}] ray actor pid {os.getpid()} on node "
                         f"{self._node_id()} ({self._node_ip()})\n".encode())
            outcome = self.service.run_job(local, emit)
            if outcome.get("ev") == "done":
                outcome["fetch"] = self._hold(read_tree(Path(outcome["result"]["staging"])))
            emit({**outcome, "memory": self._trainer.device_memory(), "base_loads": self.service.cache.loads})
        except BaseException as exc:  # the job must end with an event, whatever broke around it
            import traceback

            emit({"ev": "failed", "kind": "io" if isinstance(exc, OSError) else "error", "retryable": True,
                  "message": f"ray actor: {type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
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

    def _localize(self, request: dict[str, Any], work: Path, resume_files: dict[str, bytes] | None,
                  data_files: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
        """The request with every path pointing into node-local scratch."""
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        local = copy.deepcopy(request)
        local["checkpoints_dir"] = str(work / "checkpoints")
        local["staging_dir"] = str(work / "staging")
        local["log_path"] = str(work / "train.log")
        if request.get("resume_from") and resume_files:
            folder = work / "resume" / Path(request["resume_from"]).name  # keeps the checkpoint-N name
            write_tree(folder, resume_files)
            local["resume_from"] = str(folder)
        else:
            local["resume_from"] = None
        for field, (name, data) in data_files.items():
            path = work / "data" / field / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            local["job"][field] = str(path)
        return local

    @staticmethod
    def _node_id() -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @staticmethod
    def _node_ip() -> str:
        import ray

        return ray.util.get_node_ip_address()


def _remove_dead_scratch(root: Path) -> None:
    """Scratch folders of actors on this node that died without cleaning up (a kill, a lost job)."""
    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    with contextlib.suppress(OSError):
        for folder in root.glob(f"{SCRATCH_PREFIX}*"):
            pid = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not alive(int(pid)) and folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)


# ================================================================ the executor (runs in the supervisor)


@dataclass
class _ActorState:
    """What the executor knows of a slot's current actor."""

    actor: Any  # ray ActorHandle
    stream: Any  # ObjectRefGenerator of its events() call
    request: dict[str, Any] | None = None  # the job it runs, with the home's paths
    fetching: tuple[Any, Event] | None = None  # (ObjectRef of files, the event they belong to)
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
        resources = {"num_cpus": 1, "num_gpus": 1} if slot.device == "gpu" else {"num_cpus": 1}
        options = {**resources, **self.actor_options}
        actor = self._actor_class.options(**options).remote("cpu" if slot.device == "cpu" else "cuda", self.scratch_root)
        stream = actor.events.options(num_returns="streaming").remote()
        slot.handle = _ActorState(actor=actor, stream=stream)
        slot.ready = False
        slot.hot_base = None
        slot.baseline_rss_mb = None
        slot.last_seen = time.monotonic()

    def pid(self, slot: Slot) -> int | None:
        state: _ActorState | None = slot.handle
        return state.pid if state else None

    def node(self, slot: Slot) -> str | None:
        state: _ActorState | None = slot.handle
        return state.node if state else None

    def submit(self, slot: Slot, request: dict[str, Any]) -> None:
        if slot.handle is None:
            self._launch(slot)
        state: _ActorState = slot.handle
        slot.job_id = int(request["job_id"])
        slot.last_seen = time.monotonic()
        state.request = request
        resume_files = None
        if request.get("resume_from"):
            try:
                resume_files = read_tree(Path(request["resume_from"]), exclude=frozenset({checkpoints.MARKER}))
            except OSError:
                resume_files = None  # unreadable: the job starts over rather than not at all
        # A dead actor shows up on its stream as 'exited'; nothing to catch here.
        state.actor.train.remote(request, resume_files, _data_files(request["job"]))

    def stop_job(self, slot: Slot, *, graceful: bool) -> None:
        state: _ActorState | None = slot.handle
        if state is not None and state.request is not None:
            state.actor.stop.remote(int(state.request["job_id"]), int(state.request["epoch"]), graceful)

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
        slot.handle = None
        slot.ready = False
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

    def poll(self, timeout: float) -> list[tuple[Slot, Event]]:
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
        events: list[tuple[Slot, Event]] = []
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
            from .worker import TrainerStartError

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

    def _drain(self, slot: Slot, limit: int = 200) -> list[Event]:
        """Events of one slot that are ready now, in order; a file fetch holds back the rest."""
        out: list[Event] = []
        for _ in range(limit):
            state: _ActorState | None = slot.handle
            if state is None:
                break
            if state.fetching is not None:
                ref, event = state.fetching
                if not self._ray.wait([ref], timeout=0)[0]:
                    break
                state.fetching = None
                try:
                    files = self._ray.get(ref)
                except Exception as exc:  # the actor or its node is gone with the files
                    out.append(self._exited(slot, exc))
                    break
                out.append(self._store_files(state, event, files))
                continue
            if not self._ray.wait([state.stream], timeout=0)[0]:
                break
            try:
                ref = next(state.stream)
                event = self._ray.get(ref)
            except StopIteration:
                out.append(self._exited(slot, None))
                break
            except Exception as exc:  # RayActorError, ObjectLostError, ...: the actor is gone
                out.append(self._exited(slot, exc))
                break
            out.extend(self._receive(slot, state, event))
        return out

    def _receive(self, slot: Slot, state: _ActorState, event: Event) -> list[Event]:
        slot.last_seen = time.monotonic()
        kind = event.get("ev")
        if kind == "ready":
            slot.ready = True
            slot.failed_starts = 0
            state.node, state.ip, state.pid = event.get("node"), event.get("ip"), event.get("pid")
            return [event]
        request = state.request
        if request is None or event.get("job_id") != request["job_id"] or event.get("epoch") != request["epoch"]:
            return []  # a late event of a job this slot no longer runs
        chunk = event.pop("log", None)
        if chunk:
            _append(Path(request["log_path"]), chunk)
        key = event.pop("fetch", None)
        if key is not None:
            state.fetching = (state.actor.fetch.remote(key), event)
            return []
        return [self._translate(state, event)]

    def _store_files(self, state: _ActorState, event: Event, files: dict[str, bytes]) -> Event:
        """Write shipped files into the home; the event then names the home's folder."""
        request = state.request
        assert request is not None
        kind = event.get("ev")
        try:
            if kind == "checkpoint":
                step = int(event["step"])
                target = Path(request["checkpoints_dir"]) / f"checkpoint-{step}"
                store_folder(target, files, step=step)
                event["path"] = str(target)
            elif kind == "done":
                staging = Path(request["staging_dir"])
                store_folder(staging, files)
                event["result"]["staging"] = str(staging)
        except (OSError, ValueError) as exc:
            if kind == "done":
                event = {"ev": "failed", "job_id": event["job_id"], "kind": "io", "retryable": True,
                         "message": f"cannot store the adapter shipped from the Ray actor in {request['staging_dir']}: {exc}",
                         "memory": event.get("memory")}
            else:  # a checkpoint that cannot be stored is skipped; a retry resumes from an older one
                _append(Path(request["log_path"]), f"loraq: could not store checkpoint {event.get('step')}: {exc}\n".encode())
                event = {"ev": "heartbeat", "job_id": event["job_id"], "step": event.get("step")}
        return self._translate(state, event)

    def _translate(self, state: _ActorState, event: Event) -> Event:
        """Paths in events name the home's folders, never the actor's scratch."""
        request = state.request
        assert request is not None
        kind = event.get("ev")
        if kind == "started" and event.get("resume_from"):
            event["resume_from"] = request.get("resume_from")
        elif kind == "done":
            event["result"]["resumed_from"] = request.get("resume_from") if event["result"].get("resumed_from") else None
        if kind in FINAL_EVENTS:
            state.request = None
        return event

    def _exited(self, slot: Slot, exc: BaseException | None) -> Event:
        state: _ActorState | None = slot.handle
        was_ready = slot.ready
        where = f"node {state.node} ({state.ip}), actor pid {state.pid}" if state and state.node else "its node"
        reason = ("trainer actor ended its event stream" if exc is None
                  else f"trainer actor died: {type(exc).__name__}: {_summary(exc)}")
        self._close(slot, graceful=False)
        return {"ev": "exited", "returncode": None, "job_id": slot.job_id, "reason": reason, "was_ready": was_ready,
                "log": f"Ray worker logs on {where} (/tmp/ray/session_latest/logs there)"}


def store_folder(target: Path, files: dict[str, bytes], *, step: int | None = None) -> None:
    """Write ``files`` as folder ``target``, which appears whole, in one rename, or not at all.

    With ``step`` the folder is a checkpoint, marked complete before the rename. Like
    ``fsutil.write_dir_atomic`` then ``checkpoints.mark_complete``, at half the fsyncs:
    the files are written plainly into the hidden temporary folder and fsynced once
    each (by ``mark_complete`` or ``fsync_tree``); nothing can see them before the rename.
    """
    tmp = fsutil.tmp_sibling(target)
    tmp.mkdir(parents=True)
    try:
        write_tree(tmp, files)
        if step is not None:
            checkpoints.mark_complete(tmp, step=step)
        else:
            fsutil.fsync_tree(tmp)
        if target.exists():
            fsutil.remove_tree(target)
        fsutil.ops.rename(tmp, target)
        fsutil.fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _data_files(job: dict[str, Any]) -> dict[str, tuple[str, bytes]]:
    """Datasets small enough to send with the job: ``{field: (file name, bytes)}``."""
    out = {}
    for field in ("dataset_path", "eval_dataset_path"):
        path = job.get(field)
        if not path:
            continue
        try:
            if Path(path).is_file() and Path(path).stat().st_size <= SHIP_DATA_MAX_BYTES:
                out[field] = (Path(path).name, Path(path).read_bytes())
        except OSError:
            continue  # the node reads it at its path, and says so if it cannot
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
