"""The worker: the supervisor that works the queue. It never imports torch.

It claims jobs with a lease, hands each to an idle trainer slot of its executor,
writes the progress the trainer streams into the store, renews the lease while the
trainer lives, and on success inspects the staged adapter and publishes it. It
stops a job whose lease it lost or that was cancelled, kills a trainer that
stalled, and on SIGINT/SIGTERM asks every trainer to checkpoint and stop (a second
signal stops at once).

On start it reconciles what a killed predecessor left: jobs leased by dead
processes on this host go back to the queue, staging folders of dead attempts are
removed, and an adapter published but not recorded is recognised by its manifest.

It speaks to trainers only in :mod:`loraq.protocol` messages. Its timers (heartbeats,
the watchdog, lease sweeps) read ``clock``, a parameter, so tests move time by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoints, fsutil
from ..errors import (
    FailureKind,
    LeaseLost,
    LoraqError,
    PublishConflict,
    StoreFaultError,
    TrainerStartError,
    TransitionError,
)
from ..executors.base import Executor, Slot, pid_alive
from ..protocol import (
    Aborted,
    CheckpointSaved,
    Done,
    Exited,
    Failed,
    Final,
    JobInput,
    Message,
    OomAdjusted,
    Progress,
    Started,
    Stopped,
    StopReason,
    TrainRequest,
    TrainResult,
    to_wire,
)
from ..queue.records import COMPLETED, FAILED, RUNNING, Claim, StoredJob, WorkerId
from ..queue.store import Store
from ..supervisor import publish
from ..supervisor.events import (
    Claimed,
    Completed,
    Fault,
    FaultCleared,
    JobFailed,
    JobOomAdjusted,
    JobProgress,
    JobStarted,
    JobStopped,
    LeaseExpired,
    Lost,
    Observer,
    Reclaimed,
    Recovered,
    Recycled,
    RoundEnded,
    RunEvent,
    Stalled,
    Stopping,
    StoppingNow,
)
from ..workspace import ADAPTER_WEIGHTS, Home

Clock = Callable[[], float]
MAX_FAILED_STARTS = 3
STARTUP_GRACE_S = 600.0  # how long a trainer process may take to become ready before the watchdog acts
FAULT_RETRY_S = 1.0  # first back-off before a store write the machine refused is tried again
MAX_FAULT_RETRY_S = 30.0
RESUME_DIR = "resume"  # attempt-<n>/resume/checkpoint-<step>: what the attempt resumed from


@dataclass
class WorkerConfig:
    lease_s: float = 60.0
    heartbeat_s: float = 2.0
    stall_s: float = 600.0  # no event from a busy trainer for this long: kill it, retry the job
    poll_s: float = 0.2
    idle_exit: bool = True  # return when nothing is left to run (else wait for new jobs)
    recycle_growth_mb: float = 2048.0  # RSS growth over the trainer's first job that recycles it
    max_jobs: int | None = None  # stop claiming after this many (tests, benchmarks)


@dataclass
class Running:
    """A job this worker has handed to a trainer; times are the worker's clock."""

    claim: Claim
    slot: Slot
    attempt_dir: Path
    started: float
    last_heartbeat: float  # when the lease was last renewed
    last_seen: float  # when its trainer last sent anything (the watchdog's measure)
    stopping: StopReason | None = None  # why the worker asked the trainer to stop


@dataclass
class RunSummary:
    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    interrupted: bool = False
    paused: str | None = None


class Worker:
    def __init__(
        self,
        home: Home,
        store: Store,
        executor: Executor,
        *,
        config: WorkerConfig | None = None,
        observer: Observer | None = None,
        worker_id: WorkerId | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.home = home
        self.store = store
        self.executor = executor
        self.config = config or WorkerConfig()
        self.observer: Observer = observer or _ignore
        self.clock = clock
        self.id = worker_id or WorkerId.current()
        self.store.actor = str(self.id)
        self.running: dict[int, Running] = {}
        self.summary = RunSummary()
        self._signals = 0
        self._claimed = 0
        # Store writes the machine refused (a full disk), retried in order with back-off.
        self._pending: list[tuple[str, Callable[[], Any]]] = []
        self._fault: str | None = None
        self._fault_delay = FAULT_RETRY_S
        self._retry_at = 0.0

    # -------------------------------------------------------------- signals

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals += 1
        if self._signals == 1:
            self.observer(Stopping(signal=signal.Signals(signum).name, running=len(self.running)))
            for run in self.running.values():
                run.stopping = StopReason.SIGNAL
                self.executor.stop_job(run.slot, graceful=True)
        else:
            self.observer(StoppingNow(signal=signal.Signals(signum).name))

    @contextlib.contextmanager
    def _signal_handlers(self) -> Any:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # -------------------------------------------------------------- main loop

    def run(self) -> RunSummary:
        self.reconcile()
        # Signal handlers can only be installed from the main thread; a worker run in another
        # thread (an embedding application, a test) is stopped by its owner instead.
        in_main_thread = threading.current_thread() is threading.main_thread()
        with self._signal_handlers() if in_main_thread else contextlib.nullcontext():
            self.executor.start()
            try:
                self._loop()
            finally:
                self._stop_all_now()
                self.executor.shutdown()
        state = self.store.queue_state()
        self.summary.paused = state.pause_reason if state.paused else None
        return self.summary

    def _loop(self) -> None:
        last_sweep = 0.0
        while True:
            if self._signals >= 2:
                self.summary.interrupted = True
                return
            if self._pending and self.clock() >= self._retry_at:
                self._retry_pending()
            if self._signals == 0:
                self._fill_slots()
            for slot, message in self.executor.poll(self.config.poll_s):
                self._handle(slot, message)
            now = self.clock()
            self._heartbeats(now)
            self._watchdog(now)
            if now - last_sweep > max(self.config.lease_s / 4, 1.0) and not self._fault:
                last_sweep = now
                try:
                    for job_id in self.store.expire_leases():
                        self.observer(LeaseExpired(job_id=job_id))
                except StoreFaultError as exc:
                    self._on_fault(exc)
            if not self.running and not self._pending:
                if self._signals:
                    self.summary.interrupted = True
                    return
                if self._done():
                    return

    def _done(self) -> bool:
        if self.config.max_jobs is not None and self._claimed >= self.config.max_jobs:
            return True
        if not self.config.idle_exit:
            return False
        state = self.store.queue_state()
        if state.paused:
            return True
        # Jobs running elsewhere or pending behind a backoff keep this worker waiting.
        return not self.store.has_runnable()

    # -------------------------------------------------------------- faults of the machine

    def _on_fault(self, exc: StoreFaultError) -> None:
        """The state database cannot be written: claim nothing new, pause the queue (once it can be
        written), and try again with back-off. Running trainers go on."""
        if self._fault is None:
            self._fault = str(exc)
            self.observer(Fault(reason=str(exc)))
            reason = f"the machine cannot write the state database ({exc}); free space or fix the disk, then 'loraq resume'"
            self._pending.insert(0, ("pause the queue", lambda: self.store.pause(reason)))
        self._retry_at = self.clock() + self._fault_delay
        self._fault_delay = min(self._fault_delay * 2, MAX_FAULT_RETRY_S)

    def _write(self, what: str, action: Callable[[], Any]) -> None:
        """Run a store write now; if the machine refuses it, keep it to run again, in order."""
        if self._pending:  # earlier writes wait: they keep their order
            self._pending.append((what, action))
            return
        try:
            action()
        except StoreFaultError as exc:
            self._on_fault(exc)
            self._pending.append((what, action))

    def _retry_pending(self) -> None:
        while self._pending:
            what, action = self._pending[0]
            try:
                action()
            except StoreFaultError as exc:
                self._on_fault(exc)
                return
            self._pending.pop(0)
            self.observer(FaultCleared(done=what))
        self._fault, self._fault_delay = None, FAULT_RETRY_S

    def _requeue_fault(self, claim: Claim, kind: FailureKind, reason: str) -> None:
        """A fault of the machine ended this attempt: the job goes back uncounted and the queue pauses."""
        def requeue() -> None:
            with contextlib.suppress(LeaseLost, TransitionError):
                self.store.requeue_fault(claim.job.id, claim.epoch, kind=kind.value, reason=reason)
                self.summary.requeued.append(claim.job.name)
                self.observer(JobFailed(name=claim.job.name, failure=kind.value, final=False,
                                        reason=f"{reason} (a fault of the machine: not counted; queue paused)"))

        self._write(f"requeue {claim.job.name}", requeue)

    def _requeue_stopped(self, claim: Claim, reason: str) -> None:
        with contextlib.suppress(LeaseLost):
            self.store.requeue_stopped(claim.job.id, claim.epoch, reason=reason)
            self.summary.requeued.append(claim.job.name)

    def _fill_slots(self) -> None:
        if self._fault or self._pending:
            return  # nothing new while the machine cannot record it
        for slot in self.executor.slots:
            if slot.busy:
                continue
            if self.config.max_jobs is not None and self._claimed >= self.config.max_jobs:
                return
            try:
                claim = self.store.claim(self.id, lease_s=self.config.lease_s, prefer_base=slot.hot_base)
            except StoreFaultError as exc:
                self._on_fault(exc)
                return
            if claim is None:
                return
            self._claimed += 1
            self._start(slot, claim)

    def _start(self, slot: Slot, claim: Claim) -> None:
        job = claim.job
        try:
            adopted = publish.adopt_published(self.store, self.home, claim)
        except StoreFaultError as exc:
            self._on_fault(exc)
            self._requeue_fault(claim, FailureKind.IO, f"cannot record the job's start: {exc}")
            return
        if adopted:
            self.observer(Recovered(name=job.name, job_id=job.id))
            self.summary.completed.append(job.name)
            return
        if job.spec.settings.after and not job.spec.init_from_path:
            bound = self._start_after(claim)
            if bound is None:
                return
            claim, job = bound, bound.job
        job_dir = self.home.job_dir(job.id)
        attempt_dir = self.home.attempt_dir(job.id, claim.attempt)
        try:
            attempt_dir.mkdir(parents=True, exist_ok=True)
            checkpoints.remove_incomplete(job_dir, except_attempt=claim.attempt)
            # The attempt resumes from its own hard-linked copy of the newest complete
            # checkpoint: a stale trainer of an earlier attempt may still be deleting
            # its old checkpoints while this one loads.
            resume = checkpoints.snapshot_for_resume(job_dir, attempt_dir / RESUME_DIR)
        except OSError as exc:
            self._fail(claim, kind=FailureKind.IO, reason=f"cannot prepare {attempt_dir}: {exc}")
            return
        request = TrainRequest(
            job_id=job.id,
            attempt=claim.attempt,
            epoch=claim.epoch,
            job=_job_input(job.spec),
            log_path=str(attempt_dir / "train.log"),
            checkpoints_dir=str(attempt_dir / "checkpoints"),
            staging_dir=str(attempt_dir / "staging"),
            resume_from=str(resume.path) if resume else None,
            # Where the trainer may read: the roots the job was checked against at submit (a job
            # submitted by an older loraq: the home's roots and its queue file's folder).
            read_roots=list(job.spec.read_roots or [
                str(root) for root in self.home.roots(
                    queue_dir=Path(job.queue_file).parent if job.queue_file else None).read]),
        )
        now = self.clock()
        self.running[job.id] = Running(claim=claim, slot=slot, attempt_dir=attempt_dir, started=now,
                                       last_heartbeat=now, last_seen=now)
        slot.take(job.id, job.base_key)
        self.executor.submit(slot, request)
        self.observer(Claimed(name=job.name, job_id=job.id, attempt=claim.attempt, slot=slot.name,
                              resume_step=resume.step if resume else None))

    def _start_after(self, claim: Claim) -> Claim | None:
        """A job that waited on another (``after``) starts from its published adapter, checked as an
        ``init_from`` is at submit and recorded in the store as one; ``None`` if it cannot start."""
        from ..inspect import warm_start  # torch-free: the adapter's config and safetensors header

        job = claim.job
        after = str(job.spec.settings.after)
        folder, lines = warm_start.published(self.home, after, job.spec.settings.lora, job.spec.base_model)
        if lines:
            self._fail(claim, kind=FailureKind.DEPENDENCY, reason=f"after: {after}: {lines[0]}")
            return None
        try:
            sha256 = fsutil.sha256_file(folder / ADAPTER_WEIGHTS)
            bound = self.store.bind_warm_start(job.id, claim.epoch, path=str(folder), sha256=sha256, after=after)
        except StoreFaultError as exc:
            self._on_fault(exc)
            self._requeue_fault(claim, FailureKind.IO, f"cannot record the job's start: {exc}")
            return None
        except OSError as exc:
            self._fail(claim, kind=FailureKind.IO, reason=f"after: {after}: cannot read its adapter: {exc}")
            return None
        if bound is None:
            self.observer(Lost(name=job.name, why="the job was taken over or cancelled"))
            return None
        return dataclasses.replace(claim, job=bound)

    # -------------------------------------------------------------- events

    def _handle(self, slot: Slot, message: Message) -> None:
        try:
            self._on_message(slot, message)
        except StoreFaultError as exc:  # progress, a checkpoint note: lost, the next one carries it
            self._on_fault(exc)

    def _on_message(self, slot: Slot, message: Message) -> None:
        event = message.event
        if isinstance(event, Exited):
            self._trainer_died(slot, event)
            return
        current = next((r for r in self.running.values() if r.slot is slot), None)
        if current is not None:
            current.last_seen = self.clock()  # anything from its trainer says that it lives
        run = self.running.get(message.job_id) if message.job_id is not None else None
        if run is None or run is not current:
            return  # 'ready', or a late event of a job this worker already let go
        claim = run.claim
        if isinstance(event, Started):
            if event.resume_from:
                step = checkpoints.step_of(event.resume_from) or 0
                self.store.note_resume(claim.job.id, claim.epoch, claim.attempt, step)
            self._progress(run, 0, event.max_steps, {"base_eval_loss": event.base_eval_loss})
            self.observer(JobStarted(name=claim.job.name, event=event))
        elif isinstance(event, Progress):
            self._progress(run, event.step, event.max_steps, event.metrics)
            self.observer(JobProgress(name=claim.job.name, event=event))
        elif isinstance(event, CheckpointSaved):
            self.store.note_checkpoint(claim.job.id, claim.epoch, claim.attempt, event.step)
            with contextlib.suppress(OSError):  # a prune that fails now is done at the next checkpoint
                checkpoints.prune(self.home.job_dir(claim.job.id), keep=2)
        elif isinstance(event, OomAdjusted):
            from ..queue.controls import adjustment_line

            record = to_wire(event)
            line = adjustment_line(record)
            if not self.store.adjust_after_oom(claim.job.id, claim.epoch, after=event.after, record=record,
                                               reason=line):
                self._lost(run)
            self.observer(JobOomAdjusted(name=claim.job.name, event=event, line=line))
        elif isinstance(event, Done):
            # The trainer is free: hand it the next job first, then inspect and publish this
            # one from its own staging folder, so the trainer does not idle while we do.
            self._after_job(slot, event)
            if self._signals == 0:
                self._fill_slots()
            self._release(run)
            result = event.result
            self._write(f"finish {claim.job.name}", lambda: self._finish(run, result))
        elif isinstance(event, Stopped):
            self._release(run)
            why = str(run.stopping or "stopped")
            self._write(f"requeue {claim.job.name}", lambda: self._requeue_stopped(claim, why))
            self.observer(JobStopped(name=claim.job.name, step=event.step))
            self._after_job(slot, event)
        elif isinstance(event, Failed):
            self._release(run)
            if run.stopping is StopReason.SIGNAL and event.failure is FailureKind.INTERRUPTED:
                self._write(f"requeue {claim.job.name}", lambda: self._requeue_stopped(claim, "graceful stop"))
            else:
                self._fail(claim, kind=event.failure, reason=event.reason, traceback=event.traceback)
            self._after_job(slot, event)
        elif isinstance(event, Aborted):
            self._release(run)
            self._after_job(slot, event)
        # ready and heartbeat only say that the trainer lives (last_seen, above)

    def _progress(self, run: Running, step: int, total: int | None, metrics: dict[str, float]) -> None:
        claim = run.claim
        if not self.store.record_progress(claim.job.id, claim.epoch, claim.attempt, step=step, total=total, metrics=metrics):
            self._lost(run)

    def _after_job(self, slot: Slot, event: Final) -> None:
        slot.job_ended(event.memory.rss_mb if event.memory is not None else None)
        if event.memory is None:
            return
        rss = event.memory.rss_mb
        if slot.baseline_rss_mb is not None and rss - slot.baseline_rss_mb > self.config.recycle_growth_mb:
            self.observer(Recycled(slot=slot.name, rss_mb=rss, baseline_mb=slot.baseline_rss_mb))
            self.executor.recycle(slot)

    def _release(self, run: Running) -> None:
        self.running.pop(run.claim.job.id, None)

    def _fail(self, claim: Claim, *, kind: FailureKind, reason: str, traceback: str | None = None, **extra: Any) -> None:
        if kind.retryable and disk_full(reason):
            # A full disk is the machine's fault, not the job's: no attempt is used, and the
            # queue pauses instead of spending every job's attempts on a machine that cannot work.
            self._requeue_fault(claim, kind, reason)
            return

        def record() -> None:
            try:
                new = self.store.fail(claim.job.id, claim.epoch, kind=kind, reason=reason, retryable=kind.retryable,
                                      traceback=traceback, **extra)
            except LeaseLost:
                return
            if new == FAILED:
                self.summary.failed.append(claim.job.name)
            self.observer(JobFailed(name=claim.job.name, failure=kind.value, reason=reason, final=new == FAILED))
            if new == FAILED:
                self._report_dependents(claim.job.id)

        self._write(f"fail {claim.job.name}", record)

    def _report_dependents(self, job_id: int) -> None:
        """Say which jobs waiting on ``job_id`` (``after``) its failure failed, and theirs in turn."""
        for job in self.store.dependents(job_id):
            if job.status == FAILED and job.error_kind == FailureKind.DEPENDENCY.value:
                self.summary.failed.append(job.name)
                self.observer(JobFailed(name=job.name, failure=job.error_kind, reason=job.error, final=True))
                self._report_dependents(job.id)

    def _lost(self, run: Running) -> None:
        """This worker no longer owns the job: stop its trainer, keep nothing it makes."""
        if run.stopping is not StopReason.LOST:
            run.stopping = StopReason.LOST
            self.executor.stop_job(run.slot, graceful=False)
            self.observer(Lost(name=run.claim.job.name, why=str(StopReason.LOST)))

    def _trainer_died(self, slot: Slot, event: Exited) -> None:
        run = next((r for r in self.running.values() if r.slot is slot), None)
        slot.trainer_died(was_ready=event.was_ready)
        if run is not None:
            self._release(run)
            if self._signals >= 2 or run.stopping is StopReason.AT_ONCE:
                died = run.claim
                self._write(f"requeue {died.job.name}", lambda: self._requeue_stopped(died, str(StopReason.AT_ONCE)))
            elif run.stopping is StopReason.STALLED:  # the watchdog killed it
                self._fail(run.claim, kind=FailureKind.STALLED,
                           reason=f"no progress for {self.config.stall_s:.0f} s; the trainer was killed")
            elif run.stopping is StopReason.LOST:
                pass  # cancelled or lease lost: the store already says what happened
            else:  # it died on its own, or while stopping gracefully
                self._fail(run.claim, kind=FailureKind.DIED, reason=event.reason)
        if not event.was_ready and slot.failed_starts >= MAX_FAILED_STARTS:
            raise TrainerStartError(
                f"the trainer on {slot.name} died {slot.failed_starts} times before it was ready "
                f"({event.reason}); see {event.log}"
            )
        if self._signals == 0:
            self.executor.start()  # replace the dead trainer

    # -------------------------------------------------------------- leases

    def _heartbeats(self, now: float) -> None:
        for run in list(self.running.values()):
            if now - run.last_heartbeat < self.config.heartbeat_s:
                continue
            run.last_heartbeat = now
            claim = run.claim
            try:
                owned = self.store.heartbeat(claim.job.id, claim.epoch, lease_s=self.config.lease_s)
            except StoreFaultError as exc:
                self._on_fault(exc)  # the trainer goes on; the next heartbeat tries again
                continue
            if not owned:
                self._lost(run)

    def _watchdog(self, now: float) -> None:
        for run in list(self.running.values()):
            # A trainer that is still starting (importing torch, on a busy machine) is
            # not stalled; it gets the longer of stall_s and STARTUP_GRACE_S.
            limit = self.config.stall_s if run.slot.ready else max(self.config.stall_s, STARTUP_GRACE_S)
            if now - run.last_seen > limit and run.stopping is not StopReason.STALLED:
                run.stopping = StopReason.STALLED
                self.observer(Stalled(name=run.claim.job.name))
                self.executor.kill(run.slot)

    def _stop_all_now(self) -> None:
        """On the way out: trainers still running are killed and their jobs requeued uncounted."""
        for run in list(self.running.values()):
            run.stopping = StopReason.AT_ONCE
            self.executor.kill(run.slot)
            with contextlib.suppress(LeaseLost, StoreFaultError):  # else the next run reclaims it
                self.store.requeue_stopped(run.claim.job.id, run.claim.epoch, reason=str(StopReason.AT_ONCE))
                self.summary.requeued.append(run.claim.job.name)
            self._release(run)

    # -------------------------------------------------------------- finishing

    def _finish(self, run: Running, trained: TrainResult) -> None:
        from .. import inspect as inspector  # numpy only; loaded when the first adapter is done
        from ..queue.spec import ValidationSpec  # pydantic: not needed before the first adapter is done

        claim = run.claim
        staging = Path(trained.staging)
        if not self.store.heartbeat(claim.job.id, claim.epoch, lease_s=self.config.lease_s):
            # This worker was frozen past its lease (or the job was cancelled) while its trainer
            # finished: another worker owns the job now and may already have removed this staging.
            self.observer(Lost(name=claim.job.name, why="the job was taken over or cancelled; nothing published"))
            with contextlib.suppress(OSError):
                fsutil.remove_tree(staging)
            return
        if claim.job.halving is not None and claim.job.halving.is_round_end:
            self._end_round(run, trained)
            return
        try:
            # The base's config.json (no weights) lets the inspector judge the serving engines.
            base_config = inspector.serving.read_base_config(claim.job.spec.base_model)
            report = inspector.inspect_adapter(staging, roots=self.home.roots(), base_config=base_config)
        except (LoraqError, OSError) as exc:  # the staged folder vanished or cannot be read
            self._fail(claim, kind=FailureKind.IO, reason=f"cannot inspect the trained adapter in {staging}: {exc}")
            return
        validation = ValidationSpec.model_validate(claim.job.spec.settings.validation)
        verdict = inspector.verdict(report, trained, validation, list(claim.job.spec.serving))
        inspection = verdict.to_json()
        # What the store records as the job's result: the trainer's, as JSON, and the inspection.
        result: dict[str, Any] = to_wire(trained) | {"inspection": inspection}
        if not verdict.passed:
            errors = verdict.errors()
            reason = "adapter failed inspection: " + "; ".join(f"[{f.code}] {f.message}" for f in errors)
            with contextlib.suppress(OSError):
                fsutil.atomic_write_json(run.attempt_dir / publish.INSPECTION, inspection)
                os.replace(staging, run.attempt_dir / "rejected")
            self._fail(claim, kind=FailureKind.INSPECTION, reason=reason, verdict="fail", result=result)
            return
        try:
            manifest = publish.build_manifest(claim, result, staging, home_id=self.store.home_id())
            publish.stage_metadata(staging, manifest, inspection, claim.job.spec.chat_template_text)
            target = publish.publish(self.store, self.home, claim, staging, result)
        except LeaseLost:
            self.observer(Lost(name=claim.job.name, why="lease lost before publishing; nothing published"))
            with contextlib.suppress(OSError):
                fsutil.remove_tree(staging)
            return
        except PublishConflict as exc:
            self._fail(claim, kind=FailureKind.CONFLICT, reason=str(exc))
            return
        except StoreFaultError:
            raise  # the rename was undone: the whole finish is tried again (see _write)
        except OSError as exc:
            self._fail(claim, kind=FailureKind.IO, reason=f"cannot publish: {exc}")
            return
        self.summary.completed.append(claim.job.name)
        self._cleanup_checkpoints(claim.job.id)
        self.observer(Completed(name=claim.job.name, adapter=str(target), result=trained))

    def _end_round(self, run: Running, trained: TrainResult) -> None:
        """A job of a halving sweep reached its round's steps: nothing is published; it waits, with its
        checkpoints, for the round's decision (made by the store, in the same transaction)."""
        claim = run.claim
        with contextlib.suppress(OSError):
            fsutil.remove_tree(Path(trained.staging))
        from ..queue.spec import ValidationSpec

        gate = ValidationSpec.model_validate(claim.job.spec.settings.validation).gate_metric
        if not self.store.end_round(claim.job.id, claim.epoch, steps=trained.steps,
                                    eval_loss=_finite_or_none(trained.eval_loss),
                                    train_loss=_finite_or_none(trained.train_loss),
                                    metric=gate, score=_finite_or_none(trained.metrics.get(gate)) if gate else None):
            self.observer(Lost(name=claim.job.name, why="the job was taken over or cancelled"))
            return
        round_no = claim.job.halving.round if claim.job.halving else None
        self.observer(RoundEnded(name=claim.job.name, round=round_no, steps=trained.steps, eval_loss=trained.eval_loss))

    def _cleanup_checkpoints(self, job_id: int) -> None:
        """A completed job needs no checkpoints; its logs stay."""
        job_dir = self.home.job_dir(job_id)
        for attempt_dir in job_dir.glob("attempt-*"):
            for folder in ("checkpoints", RESUME_DIR):
                with contextlib.suppress(OSError):
                    fsutil.remove_tree(attempt_dir / folder)

    # -------------------------------------------------------------- reconcile

    def reconcile(self) -> None:
        """Clean up after killed predecessors before claiming anything."""
        self.home.ensure()
        # A published adapter whose job is still marked running: the worker was killed
        # between the rename and the commit. Complete it under the epoch it recorded.
        for job in self.store.jobs(RUNNING):
            manifest = publish.read_manifest(self.home.adapter_dir(job.name))
            if manifest and manifest.get("epoch") == job.epoch and publish.foreign(self.store, job, manifest) is None:
                # The owner may be alive and committing this very publish right now: then
                # it wins and the job is no longer running here (TransitionError).
                with contextlib.suppress(LeaseLost, TransitionError):
                    self.store.complete(job.id, job.epoch,
                                        result=publish.recovered_result(self.home.adapter_dir(job.name), manifest))
                    self.observer(Recovered(name=job.name, job_id=job.id))
        for job_id in self.store.reclaim_dead(self.id.host, pid_alive):
            self.observer(Reclaimed(job_id=job_id))
        self.store.expire_leases()
        self.store.decide_rounds()  # a halving round whose last job ended in an older loraq's hands
        self.store.fail_stranded()  # jobs waiting on a failed job (after) that an older loraq left pending
        fsutil.remove_stale_tmp(self.home.adapters_dir)
        # Only folders of attempts the store has ended: an attempt that is live (another
        # worker claimed it, perhaps a moment ago) keeps its own. One query, and only
        # the folders that exist are visited, however many jobs the home holds.
        ended = self.store.ended_attempts()
        for folder in self.home.jobs_dir.glob("*/attempt-*/*"):
            key = _attempt_key(folder.parent)
            if key is None or key not in ended:
                continue
            if folder.name in ("staging", RESUME_DIR) or (folder.name == "checkpoints" and ended[key] == COMPLETED):
                with contextlib.suppress(OSError):
                    fsutil.remove_tree(folder)


#: What a full disk says, wherever it is reported (the OS, SQLite, torch, safetensors).
_DISK_FULL = ("no space left on device", "database or disk is full", "disk quota exceeded", "file too large",
              "cannot write the state database")


def disk_full(reason: str) -> bool:
    """Whether a failure's reason says the disk was full: a fault of the machine, not the job."""
    text = reason.lower()
    return any(phrase in text for phrase in _DISK_FULL)


def _attempt_key(attempt_dir: Path) -> tuple[int, int] | None:
    """``jobs/<id>/attempt-<n>`` -> ``(id, n)``."""
    try:
        return int(attempt_dir.parent.name), int(attempt_dir.name.removeprefix("attempt-"))
    except ValueError:
        return None


def _ignore(event: RunEvent) -> None:
    """The observer of a worker nobody watches."""


def _finite_or_none(value: Any) -> float | None:
    """JSON has no NaN: a loss that is not a finite number is recorded as unknown."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _job_input(stored: StoredJob) -> JobInput:
    """What the trainer is sent of the stored job (its wire format: the settings as JSON, the paths as resolved)."""
    return JobInput(spec=stored.settings.doc, base_model=stored.base_model, dataset_path=str(stored.dataset_path),
                    eval_dataset_path=stored.eval_dataset_path, dataset_sha256=stored.dataset_sha256,
                    eval_dataset_sha256=stored.eval_dataset_sha256, init_from_path=stored.init_from_path,
                    init_from_sha256=stored.init_from_sha256, chat_template_text=stored.chat_template_text,
                    dataset_bytes=stored.dataset_bytes, eval_dataset_bytes=stored.eval_dataset_bytes,
                    submit_tokenizer=stored.submit_tokenizer, est_steps=stored.est_steps, sweep=stored.sweep)
