"""The trainer process: ``python -m loraq.train`` serves a :class:`TrainerService` over two pipes.

Commands (a :class:`~loraq.protocol.TrainRequest` to train, stop, abort, exit) arrive
as JSON lines on one file descriptor, events leave on the other as JSON lines, in
the wire form of :mod:`loraq.protocol` (the local executor holds the other ends).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading

from ..errors import ProtocolError
from ..protocol import (
    EXIT_BAD_COMMAND,
    EXIT_ORPHAN,
    Command,
    Event,
    Message,
    Ready,
    TrainRequest,
    command_from_wire,
    to_wire,
)
from .service import TrainerService, versions


class PipeChannel:
    """JSON lines over two file descriptors shared with the supervisor: commands in, messages out."""

    def __init__(self, fd_in: int, fd_out: int) -> None:
        self._in = os.fdopen(fd_in, "r", encoding="utf-8")
        self._out = os.fdopen(fd_out, "w", encoding="utf-8")
        self._lock = threading.Lock()

    def send(self, message: Message) -> None:
        line = json.dumps(to_wire(message))
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def receive(self) -> tuple[Command, TrainRequest | None] | None:
        """The next command; ``None`` once the supervisor has gone."""
        line = self._in.readline()
        return command_from_wire(json.loads(line)) if line else None


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the supervisor dies (no orphans)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def serve(channel: PipeChannel, service: TrainerService) -> None:
    """Run jobs sent over ``channel`` until told to exit or the supervisor goes away."""
    jobs: list[TrainRequest] = []
    wake = threading.Condition()
    done = threading.Event()

    def reader() -> None:
        while True:
            try:
                message = channel.receive()
            except ProtocolError as exc:  # a command this trainer cannot read: say so, and leave
                sys.stderr.write(f"loraq trainer: {exc}\n")
                os._exit(EXIT_BAD_COMMAND)
            except (OSError, ValueError):
                message = None
            if message is None:  # the supervisor is gone: an orphan must not go on training
                os._exit(EXIT_ORPHAN)
            command, request = message
            if request is not None:
                # Cleared here, not when the job starts: a stop or abort sent while the
                # trainer is still between jobs or loading belongs to this job and must hold.
                service.flags.clear()
                with wake:
                    jobs.append(request)
                    wake.notify()
            elif command is Command.STOP:
                service.flags.graceful.set()
            elif command is Command.ABORT:
                service.flags.abort.set()
            elif command is Command.EXIT:
                done.set()
                with wake:
                    wake.notify()
                return

    threading.Thread(target=reader, name="loraq-commands", daemon=True).start()
    channel.send(Message(Ready(pid=os.getpid(), device=service.device, versions=versions())))
    while True:
        with wake:
            while not jobs and not done.is_set():
                wake.wait()
            if done.is_set() and not jobs:
                break
            request = jobs.pop(0)

        def emit(event: Event, _request: TrainRequest = request) -> None:
            channel.send(Message(event, job_id=_request.job_id, epoch=_request.epoch))

        emit(service.run_job(request, emit, clear_flags=False))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m loraq.train")
    parser.add_argument("--fd-in", type=int, required=True)
    parser.add_argument("--fd-out", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    _die_with_parent()
    channel = PipeChannel(args.fd_in, args.fd_out)
    serve(channel, TrainerService(device=args.device))
    return 0
