"""What every executor shares: slots, the executor protocol, devices, and process helpers.

An executor owns *slots*, one trainer each (a process per device locally, a Ray
actor per GPU on a cluster). The worker hands a :class:`~loraq.protocol.TrainRequest`
to an idle slot and polls for :class:`~loraq.protocol.Message` objects; the trainer keeps
its base model hot between jobs.

A trainer sends ``ready``, then per job ``started``, ``progress``, ``heartbeat``,
``checkpoint`` and one final event (``done``, ``stopped``, ``failed``, ``aborted``);
the executor adds ``exited`` when a trainer dies (:mod:`loraq.protocol`).

This package never imports torch: the supervisor stays light.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import UsageError
from ..protocol import EXIT_BAD_COMMAND, EXIT_ORPHAN, Message, TrainRequest


@dataclass
class Slot:
    """One trainer: its device, what it is doing, and the base model it keeps hot.

    Its fields change only through the methods below, which the worker and every
    executor call: one definition of what a new trainer, a ready one, a job taken,
    a job ended and a dead trainer do to a slot.
    """

    index: int
    device: str
    job_id: int | None = None
    hot_base: str | None = None
    baseline_rss_mb: float | None = None
    jobs_done: int = 0
    ready: bool = False
    failed_starts: int = 0  # trainers in a row that died before they were ready
    handle: Any = None

    @property
    def busy(self) -> bool:
        return self.job_id is not None

    @property
    def name(self) -> str:
        return f"slot-{self.index}({self.device})"

    def attach(self, handle: Any) -> None:
        """A fresh trainer (``handle``: the executor's own) takes the slot: not ready, nothing hot, no baseline."""
        self.handle, self.ready, self.hot_base, self.baseline_rss_mb = handle, False, None, None

    def detach(self) -> None:
        """The slot's trainer is gone (closed or dead)."""
        self.handle, self.ready = None, False

    def became_ready(self) -> None:
        """The trainer said ``ready``: its start succeeded."""
        self.ready, self.failed_starts = True, 0

    def take(self, job_id: int, base_key: str | None = None) -> None:
        """A job is handed to the slot (``base_key``: the base it will load and keep hot; the executor omits it)."""
        self.job_id = job_id
        if base_key is not None:
            self.hot_base = base_key

    def job_ended(self, rss_mb: float | None = None) -> None:
        """The job's final event arrived; the first job's memory (``rss_mb``) is the slot's baseline."""
        self.job_id = None
        self.jobs_done += 1
        if rss_mb is not None and self.baseline_rss_mb is None:
            self.baseline_rss_mb = rss_mb

    def trainer_died(self, *, was_ready: bool) -> None:
        """The trainer died with the job (if any); one that never got ready counts as a failed start."""
        self.job_id = None
        if not was_ready:
            self.failed_starts += 1


class Executor(Protocol):
    """What the worker needs of an executor. Each call returns at once but ``poll``."""

    @property
    def slots(self) -> list[Slot]: ...  # the slots that may take a job now

    def start(self) -> None: ...  # start a trainer for every slot that has none
    def submit(self, slot: Slot, request: TrainRequest) -> None: ...
    def poll(self, timeout: float) -> list[tuple[Slot, Message]]: ...  # waits up to timeout seconds
    def stop_job(self, slot: Slot, *, graceful: bool) -> None: ...  # graceful: checkpoint first
    def kill(self, slot: Slot) -> None: ...  # its death arrives as an 'exited' message
    def recycle(self, slot: Slot) -> None: ...  # a fresh trainer in its place
    def shutdown(self) -> None: ...


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_devices(devices: str | None) -> list[str]:
    """``"0,1"`` -> GPUs 0 and 1; ``"cpu,cpu"`` -> two CPU trainers; ``None`` -> every GPU, else one CPU."""
    if not devices:
        return detect_gpus() or ["cpu"]
    out = []
    for item in devices.split(","):
        item = item.strip()
        if item == "cpu" or _gpu_index(item):
            out.append(item)
        elif item.startswith("cuda:") and _gpu_index(item[5:]):
            out.append(item[5:])
        else:
            raise UsageError(f"--devices: {item!r} is not a GPU index or 'cpu' (e.g. --devices 0,1 or cpu,cpu)")
    if not out:
        raise UsageError("--devices: no device given")
    return out


def _gpu_index(text: str) -> bool:
    """ASCII digits of a plausible GPU index ('١'.isdigit() is true too, and CUDA counts far below 10,000)."""
    return text.isascii() and text.isdigit() and len(text) <= 4


def detect_gpus() -> list[str]:
    """GPU indices visible to this process, without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in (x.strip() for x in visible.split(",")) if d and d != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def trainer_env(device: str, slots: list[Slot], base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a slot's trainer process.

    ``CUDA_VISIBLE_DEVICES`` pins it to its GPU (``""`` for a CPU trainer: it sees no
    GPU at all). CPU trainers share the cores: each gets an equal share of threads
    (``OMP_NUM_THREADS``, unless the operator set it), since two trainers each
    running one thread per core oversubscribe the machine and both slow down.
    Their OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, unless the
    operator set it): spinning threads on a machine whose cores are also busy with
    other work made SmolLM2-135M training steps 3-15x slower and greedy generation
    5-16x slower, measured on the 2-core development machine.
    """
    env = dict(os.environ if base is None else base)
    # No progress bars in the trainer's log (in-process, model.base.quiet_libraries does the same).
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device
    if device == "cpu" and "OMP_NUM_THREADS" not in env:
        cpu_slots = sum(1 for s in slots if s.device == "cpu")
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // max(cpu_slots, 1)))
    if device == "cpu":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def describe_exit(code: int | None) -> str:
    if code is None:
        return "trainer process vanished"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"trainer process killed by {signal.Signals(-code).name}"
        return f"trainer process killed by signal {-code}"
    if code == EXIT_ORPHAN:
        return "trainer process exited: lost its supervisor"
    if code == EXIT_BAD_COMMAND:
        return "trainer process exited: it could not read a command (two versions of loraq?); see its log"
    return f"trainer process exited with code {code}"
