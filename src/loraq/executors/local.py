"""The local executor: a trainer process per device on this machine, spoken to over two pipes.

Each trainer is ``python -m loraq.train`` in its own session, pinned to its device
with ``CUDA_VISIBLE_DEVICES``; commands go to it and messages come back as JSON
lines, in :mod:`loraq.protocol`'s wire form. This module never imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol import Command, Exited, Message, Ready, TrainRequest, command_to_wire, from_wire
from .base import Slot, describe_exit, trainer_env


@dataclass
class _Proc:
    popen: subprocess.Popen[bytes]
    to_child: Any  # text file, JSON lines to the trainer
    from_child: int  # fd, JSON lines from the trainer
    buffer: bytes = b""


class LocalExecutor:
    """A trainer process per device on this machine, each pinned with ``CUDA_VISIBLE_DEVICES``."""

    def __init__(self, devices: list[str], *, log_dir: Path, python: str = sys.executable) -> None:
        self.slots = [Slot(index=i, device=d) for i, d in enumerate(devices)]
        self.log_dir = log_dir
        self.python = python
        self._selector = selectors.DefaultSelector()

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        for slot in self.slots:
            if slot.handle is None:
                self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = trainer_env(slot.device, self.slots)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"trainer-{slot.index}.log", "ab")  # noqa: SIM115 (the child owns it)
        try:
            popen = subprocess.Popen(
                [self.python, "-m", "loraq.train", "--fd-in", str(to_child_r), "--fd-out", str(from_child_w),
                 "--device", "cpu" if slot.device == "cpu" else "cuda"],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                # Its own session: a Ctrl-C in the terminal reaches the supervisor only,
                # which then asks the trainer to checkpoint and stop.
                start_new_session=True,
            )
        finally:
            log.close()
            os.close(to_child_r)
            os.close(from_child_w)
        os.set_blocking(from_child_r, False)
        proc = _Proc(popen=popen, to_child=os.fdopen(to_child_w, "w", encoding="utf-8"), from_child=from_child_r)
        slot.attach(proc)
        self._selector.register(from_child_r, selectors.EVENT_READ, slot)

    def pid(self, slot: Slot) -> int | None:
        proc: _Proc | None = slot.handle
        return proc.popen.pid if proc else None

    def _send(self, slot: Slot, command: Command, request: TrainRequest | None = None) -> bool:
        proc: _Proc | None = slot.handle
        if proc is None:
            return False
        try:
            proc.to_child.write(json.dumps(command_to_wire(command, request)) + "\n")
            proc.to_child.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def submit(self, slot: Slot, request: TrainRequest) -> None:
        if slot.handle is None:
            self._spawn(slot)
        slot.take(request.job_id)
        self._send(slot, Command.TRAIN, request)  # a dead trainer shows up as an 'exited' message

    def stop_job(self, slot: Slot, *, graceful: bool) -> None:
        self._send(slot, Command.STOP if graceful else Command.ABORT)

    def kill(self, slot: Slot) -> None:
        """SIGKILL the slot's trainer (a stall, a second Ctrl-C); its death arrives as 'exited'."""
        proc: _Proc | None = slot.handle
        if proc is not None and proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)

    def recycle(self, slot: Slot) -> None:
        """Replace the slot's trainer with a fresh process (memory grew, base changed badly)."""
        self._close(slot, graceful=True)
        self._spawn(slot)

    def _close(self, slot: Slot, *, graceful: bool, timeout: float = 10.0) -> int | None:
        proc: _Proc | None = slot.handle
        if proc is None:
            return None
        if graceful:
            self._send(slot, Command.EXIT)
        with contextlib.suppress(OSError, ValueError):
            proc.to_child.close()
        try:
            code = proc.popen.wait(timeout=timeout if graceful else 0.01)
        except subprocess.TimeoutExpired:
            self.kill(slot)
            code = proc.popen.wait()
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(proc.from_child)
        with contextlib.suppress(OSError):
            os.close(proc.from_child)
        slot.detach()
        return code

    def shutdown(self) -> None:
        for slot in self.slots:
            self._close(slot, graceful=not slot.busy, timeout=10.0)
        self._selector.close()

    # -------------------------------------------------------------- events

    def poll(self, timeout: float) -> list[tuple[Slot, Message]]:
        events: list[tuple[Slot, Message]] = []
        if not self._selector.get_map():
            time.sleep(timeout)
            return events
        for key, _mask in self._selector.select(timeout):
            slot: Slot = key.data
            events.extend((slot, ev) for ev in self._read(slot))
        return events

    def _read(self, slot: Slot) -> list[Message]:
        proc: _Proc = slot.handle
        events: list[Message] = []
        try:
            chunk = os.read(proc.from_child, 1 << 16)
        except BlockingIOError:
            return events
        except OSError:
            chunk = b""
        if chunk:
            proc.buffer += chunk
            *lines, proc.buffer = proc.buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line from a dying trainer carries nothing to act on
                message = from_wire(data)
                if isinstance(message.event, Ready):
                    slot.became_ready()
                events.append(message)
            return events
        # EOF: the trainer is gone
        was_ready = slot.ready
        code = self._close(slot, graceful=False, timeout=5.0)
        events.append(Message(Exited(returncode=code, reason=describe_exit(code), was_ready=was_ready,
                                     log=str(self.log_dir / f"trainer-{slot.index}.log")), job_id=slot.job_id))
        return events
