"""An executor whose trainers do not train: the executor contract on the fast tier.

:class:`ScriptedTrainers` keeps the executor protocol (:class:`loraq.executors.base.Executor`)
as the local and Ray executors do, with a real process per slot standing in for the
trainer (``sleep``: it can be killed, and its death arrives as ``exited``), and a script
in place of training: per poll, one step of the job; a complete checkpoint every
``save_steps``; at the end a valid adapter in staging and ``done``. It resumes from the
checkpoint it is handed, stops with a checkpoint when asked to stop gracefully, and
aborts at once when asked to. Its log says what a trainer's says, in the same words.

So the contract suite (tests/test_executor_contract.py) runs in seconds without torch,
and the real executors run the same tests on the slow tier.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import adapters
from loraq import checkpoints
from loraq.executors.base import Slot, describe_exit
from loraq.protocol import (
    Aborted,
    CheckpointSaved,
    Done,
    Event,
    Exited,
    Message,
    Progress,
    Ready,
    Started,
    Stopped,
    TrainRequest,
    TrainResult,
)


@dataclass
class _Trainer:
    """A slot's stand-in trainer: its process, and the job it is playing."""

    process: subprocess.Popen[bytes]
    log: Path
    request: TrainRequest | None = None
    step: int = 0
    max_steps: int = 0
    save_steps: int = 0
    started: bool = False
    outbox: list[Event] = field(default_factory=list)

    def write_log(self, line: str) -> None:
        assert self.request is not None
        with open(self.request.log_path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


class ScriptedTrainers:
    """One stand-in trainer per device; see the module docstring."""

    def __init__(self, devices: list[str], *, log_dir: Path, poll_wait_s: float = 0.005) -> None:
        self.slots = [Slot(index=i, device=d) for i, d in enumerate(devices)]
        self.log_dir = log_dir
        self.poll_wait_s = poll_wait_s

    # ------------------------------------------------------------ the protocol

    def start(self) -> None:
        for slot in self.slots:
            if slot.handle is None:
                self._spawn(slot)

    def submit(self, slot: Slot, request: TrainRequest) -> None:
        if slot.handle is None:
            self._spawn(slot)
        trainer: _Trainer = slot.handle
        slot.take(request.job_id)
        training = request.job.spec["training"]
        resumed = checkpoints.step_of(request.resume_from) if request.resume_from else None
        trainer.request, trainer.step, trainer.started = request, resumed or 0, False
        trainer.max_steps, trainer.save_steps = int(training["max_steps"]), int(training.get("save_steps") or 0)
        Path(request.log_path).parent.mkdir(parents=True, exist_ok=True)

    def poll(self, timeout: float) -> list[tuple[Slot, Message]]:
        time.sleep(min(timeout, self.poll_wait_s))
        messages: list[tuple[Slot, Message]] = []
        for slot in self.slots:
            trainer: _Trainer | None = slot.handle
            if trainer is None:
                continue
            code = trainer.process.poll()
            if code is not None:  # killed: what a dead trainer's executor says
                was_ready = slot.ready
                slot.detach()
                messages.append((slot, Message(Exited(returncode=code, reason=describe_exit(code), was_ready=was_ready,
                                                      log=str(trainer.log)), job_id=None, epoch=None)))
                continue
            if trainer.request is not None and not trainer.outbox:
                self._advance(trainer)
            while trainer.outbox:
                event = trainer.outbox.pop(0)
                request = trainer.request
                if isinstance(event, Ready):
                    slot.became_ready()
                messages.append((slot, Message(event, job_id=request.job_id if request else None,
                                               epoch=request.epoch if request else None)))
                if isinstance(event, (Done, Stopped, Aborted)):
                    trainer.request = None
        return messages

    def stop_job(self, slot: Slot, *, graceful: bool) -> None:
        trainer: _Trainer | None = slot.handle
        if trainer is None or trainer.request is None:
            return
        trainer.outbox.clear()
        if graceful:
            self._checkpoint(trainer)
            trainer.write_log(f"stopped at step {trainer.step}")
            trainer.outbox.append(Stopped(step=trainer.step))
        else:
            trainer.outbox.append(Aborted())

    def kill(self, slot: Slot) -> None:
        trainer: _Trainer | None = slot.handle
        if trainer is not None and trainer.process.poll() is None:
            trainer.process.send_signal(signal.SIGKILL)
            trainer.process.wait()

    def recycle(self, slot: Slot) -> None:
        self._close(slot)
        self._spawn(slot)

    def shutdown(self) -> None:
        for slot in self.slots:
            self._close(slot)

    def pid(self, slot: Slot) -> int | None:
        trainer: _Trainer | None = slot.handle
        return trainer.process.pid if trainer else None

    # ------------------------------------------------------------ the script

    def _spawn(self, slot: Slot) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL)
        trainer = _Trainer(process=process, log=self.log_dir / f"trainer-{slot.index}.log")
        trainer.outbox.append(Ready(pid=process.pid, device=slot.device))
        slot.attach(trainer)

    def _close(self, slot: Slot) -> None:
        trainer: _Trainer | None = slot.handle
        if trainer is not None:
            self.kill(slot)
            slot.detach()

    def _advance(self, trainer: _Trainer) -> None:
        """One poll of training: start, then a step (and a checkpoint when due), then done."""
        request = trainer.request
        assert request is not None
        if not trainer.started:
            trainer.started = True
            trainer.write_log(f"training {request.job.spec.get('name')}: {trainer.max_steps} steps"
                              + (f", resuming from step {trainer.step}" if trainer.step else ""))
            trainer.outbox.append(Started(max_steps=trainer.max_steps, base_eval_loss=2.0, base_reused=False,
                                          n_train=100, n_eval=10, resume_from=request.resume_from))
            return
        if trainer.step < trainer.max_steps:
            trainer.step += 1
            loss = 2.0 - trainer.step / (2 * trainer.max_steps)
            trainer.write_log(f"step {trainer.step}/{trainer.max_steps} loss {loss:.4f}")
            trainer.outbox.append(Progress(step=trainer.step, max_steps=trainer.max_steps, metrics={"loss": loss}))
            if trainer.save_steps and trainer.step % trainer.save_steps == 0 and trainer.step < trainer.max_steps:
                self._checkpoint(trainer)
            return
        staging = Path(request.staging_dir)
        adapters.synthetic(staging, seed=request.job_id)
        trainer.write_log("done: eval loss 1.0000 (base 2.0000)")
        trainer.outbox.append(Done(result=TrainResult(
            staging=str(staging), steps=trainer.step, max_steps=trainer.max_steps, train_loss=1.5, eval_loss=1.0,
            base_eval_loss=2.0, n_train=100, n_eval=10, resumed_from=request.resume_from,
            pid=trainer.process.pid)))

    def _checkpoint(self, trainer: _Trainer) -> None:
        """A complete checkpoint of the current step, as transformers' Trainer lays one out."""
        request = trainer.request
        assert request is not None
        folder = Path(request.checkpoints_dir) / checkpoints.checkpoint_name(trainer.step)
        if folder.exists():
            return
        adapters.synthetic(folder, seed=trainer.step)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": trainer.step, "log_history": []}))
        (folder / "optimizer.pt").write_bytes(os.urandom(64))
        checkpoints.mark_complete(folder, step=trainer.step)
        trainer.write_log(f"checkpoint saved at step {trainer.step}")
        trainer.outbox.append(CheckpointSaved(step=trainer.step, path=str(folder)))


def make(devices: str, home: Any) -> ScriptedTrainers:
    """What ``api.make_executor`` would make for ``--executor scripted``: one trainer per device."""
    from loraq.executors.base import parse_devices

    return ScriptedTrainers(parse_devices(devices), log_dir=home.root / "logs")
