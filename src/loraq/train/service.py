"""The trainer: torch, transformers and PEFT live here and nowhere on the supervisor side.

A :class:`TrainerService` runs one job at a time and stays alive across jobs,
keeping the last base model resident (:class:`~loraq.model.base.BaseCache`). Each
job (a :class:`~.job.JobRun`) gets a fresh LoRA on that base; afterwards the LoRA
is removed and a fingerprint of every base weight proves the base unchanged (on
mismatch it is dropped and reloaded).

Memory hygiene: after each job the LoRA, the ``Trainer`` and its optimizer are
dropped, garbage is collected and the CUDA cache emptied; the job's result carries
the process's RSS (and CUDA allocated/reserved/peak). The objects that live as long
as the process (the imported libraries, the resident base) are moved out of the
collector's sight with ``gc.freeze()``, so the collections of each job (ours, and
the ones accelerate makes inside ``Trainer``) look only at what the job made.

The service takes a :class:`~loraq.protocol.TrainRequest` and reports through an
``emit`` callback, one :mod:`loraq.protocol` event at a time. ``python -m
loraq.train`` serves it over two pipes as JSON lines (:mod:`.pipe`, the local
executor); a Ray actor wraps the same service (the Ray executor).

A job's steps, from its base to its result, are :mod:`.job`'s; its data is made
ready in :mod:`.prepare`, its answers scored in :mod:`.quality`; the training
controls live in :mod:`.controls`, and the tests' fault hooks in :mod:`.faults`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FailureKind, TrainingError, classify, describe, raised_at
from ..model.base import BaseCache, device_memory, quiet_libraries, reset_peak_memory
from ..protocol import Aborted, Done, Failed, Final, Memory, Progress, Stopped, TrainRequest, TrainResult
from .job import Emit, Flags, JobRun, Log


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": sys.version.split()[0]}


@dataclass
class TrainerService:
    """Runs jobs one after another in this process, keeping the base model hot."""

    device: str = "cpu"
    cache: BaseCache = field(init=False)
    flags: Flags = field(default_factory=Flags)

    def __post_init__(self) -> None:
        self.cache = BaseCache(device=self.device)
        quiet_libraries()

    def run_job(self, request: TrainRequest, emit: Emit, *, clear_flags: bool = True) -> Final:
        """Train one job; emit events; return its final event (``done``, ``stopped``, ``failed``, ``aborted``).

        Whatever the outcome, the base is verified afterwards (dropped if it changed),
        and the final event carries the memory measured after the job's cleanup and the
        number of base loads so far. A ``done`` result carries them too, with this
        process's pid, ``cuda_visible_devices``, ``torch_threads`` and the libraries' versions; the RSS also goes
        out as the job's last ``progress`` metric (``rss_mb``), so it lands in the metrics table.
        """
        if clear_flags:  # serve() clears them when the job arrives, so an early stop is kept
            self.flags.clear()
        reset_peak_memory()
        started = time.perf_counter()
        log_path = Path(request.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with _redirect_output(log_path) as log:
            outcome: Final | TrainResult
            try:
                outcome = self._train(request, emit, log)
            except TrainingError as exc:
                log(f"FAILED ({exc.kind}): {exc}")
                outcome = Failed(failure=exc.kind, message=str(exc), traceback=traceback.format_exc())
            except BaseException as exc:  # the one catch-all: the traceback goes into the attempt
                kind = classify(exc)
                log(f"FAILED ({kind}): {exc!r}\n{traceback.format_exc()}")
                outcome = Failed(failure=kind, message=describe(exc), traceback=traceback.format_exc(),
                                 where=raised_at(exc) if kind is FailureKind.INTERNAL else None)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
            finally:
                self._check_base(log)
            memory = Memory(**device_memory())
            if not isinstance(outcome, TrainResult):
                return dataclasses.replace(outcome, memory=memory, base_loads=self.cache.loads)
            result = dataclasses.replace(
                outcome, memory=memory, base_loads=self.cache.loads, pid=os.getpid(), versions=versions(),
                cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), torch_threads=_torch_threads(),
                job_s=round(time.perf_counter() - started, 3))
            emit(Progress(step=result.steps, max_steps=result.max_steps, metrics={"rss_mb": memory.rss_mb}))
            log(f"done: eval loss {result.base_eval_loss:.4f} -> {result.eval_loss:.4f}, "
                f"{result.train_s:.1f} s training in {result.job_s:.1f} s; memory {memory}")
        return Done(result=result, memory=memory, base_loads=self.cache.loads)

    def _train(self, request: TrainRequest, emit: Emit, log: Log) -> Stopped | TrainResult | Aborted:
        """The job's steps, top to bottom (:class:`~.job.JobRun`)."""
        run = JobRun(request, emit, log, cache=self.cache, flags=self.flags)
        if run.spec.preference is not None:  # DPO, ORPO, SimPO (issue 23): a JobRun with its own loop
            from .preference import PreferenceRun

            return PreferenceRun(request, emit, log, cache=self.cache, flags=self.flags).train()
        resident = run.load_base()
        run.prepare_data(resident)
        run.measure_base(resident)
        del resident  # the cache holds the base: see JobRun
        return run.train()

    def _check_base(self, log: Log) -> None:
        """Drop the resident base unless its weights are exactly as loaded (a LoRA left in, a merge)."""
        try:
            if self.cache.verify():
                return
            log("base model weights changed during the job: dropped; the next job reloads it")
        except Exception as exc:  # a broken device: start the next job from a fresh load
            log(f"cannot verify the base model ({exc!r}): dropped; the next job reloads it")
            self.cache.resident = None
            gc.unfreeze()


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


@contextlib.contextmanager
def _redirect_output(path: Path) -> Iterator[Log]:
    """Send this process's stdout and stderr (and loraq's own lines) to ``path``.

    fd-level, so output from C extensions lands in the log too. Each attempt has
    its own log file, so a failed attempt's log survives the retry.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)

    def log(line: str) -> None:
        sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
        sys.stdout.flush()

    try:
        yield log
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
