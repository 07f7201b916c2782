"""The trainer process: ``python -m loraq.train`` serves a :class:`TrainerService` over two pipes.

Requests and commands arrive as JSON lines on one file descriptor, events leave on
the other (the local executor holds the other ends).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from typing import Any

from ..model.base import device_memory
from .service import TrainerService, versions


class PipeChannel:
    """JSON lines over two file descriptors shared with the supervisor."""

    def __init__(self, fd_in: int, fd_out: int) -> None:
        self._in = os.fdopen(fd_in, "r", encoding="utf-8")
        self._out = os.fdopen(fd_out, "w", encoding="utf-8")
        self._lock = threading.Lock()

    def send(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=str)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def receive(self) -> dict[str, Any] | None:
        line = self._in.readline()
        return json.loads(line) if line else None


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
    jobs: list[dict[str, Any]] = []
    wake = threading.Condition()
    done = threading.Event()

    def reader() -> None:
        while True:
            try:
                message = channel.receive()
            except (OSError, ValueError):
                message = None
            if message is None:  # the supervisor is gone: an orphan must not go on training
                os._exit(3)
            op = message.get("op")
            if op == "train":
                # Cleared here, not when the job starts: a stop or abort sent while the
                # trainer is still between jobs or loading belongs to this job and must hold.
                service.flags.clear()
                with wake:
                    jobs.append(message)
                    wake.notify()
            elif op == "stop":
                service.flags.graceful.set()
            elif op == "abort":
                service.flags.abort.set()
            elif op == "exit":
                done.set()
                with wake:
                    wake.notify()
                return

    threading.Thread(target=reader, name="loraq-commands", daemon=True).start()
    channel.send({"ev": "ready", "pid": os.getpid(), "device": service.device, "versions": versions()})
    while True:
        with wake:
            while not jobs and not done.is_set():
                wake.wait()
            if done.is_set() and not jobs:
                break
            request = jobs.pop(0)

        def emit(event: dict[str, Any], _job: int = request["job_id"]) -> None:
            channel.send({**event, "job_id": _job})

        outcome = service.run_job(request, emit, clear_flags=False)
        # A done job's memory was measured after its cleanup; report that same figure.
        memory = (outcome.get("result") or {}).get("memory") or device_memory()
        emit({**outcome, "memory": memory, "base_loads": service.cache.loads})


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
