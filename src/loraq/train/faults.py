"""The tests' fault hooks in the trainer: a job made to fail as a bug or an out-of-memory error would.

Tests only; nothing here acts unless the environment asks for it:

- ``LORAQ_TEST_BUG_TRIGGER``: a job whose dataset holds that text raises an
  exception loraq does not recognise while preparing its data, as a bug of ours
  would (:func:`injected_bug`); the error-classification tests use it to drive a
  real trainer into an ``internal`` failure.
- ``LORAQ_TEST_FAULT`` as well: such a job raises that fault instead, during
  training at the step it names (:class:`Fault`): the real out-of-memory
  exceptions of CUDA and of the CPU allocator, raised by :class:`FaultCallback`
  where a real one would come from. The OOM back-off tests use it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .controls import Batching

#: The text that makes a job's data trigger a bug.
BUG_TRIGGER_ENV = "LORAQ_TEST_BUG_TRIGGER"
#: What a triggered job raises instead, and at which step (:meth:`Fault.parse`).
FAULT_ENV = "LORAQ_TEST_FAULT"


def injected_bug(rows: list[dict[str, Any]]) -> Fault | None:
    """Raise what a bug would, for a job whose data holds ``$LORAQ_TEST_BUG_TRIGGER``;
    with ``$LORAQ_TEST_FAULT``, return the fault that job meets in training instead."""
    trigger = os.environ.get(BUG_TRIGGER_ENV)
    if trigger and any(trigger in json.dumps(row) for row in rows):
        fault = Fault.from_env()
        if fault is not None:
            return fault
        raise RuntimeError(f"injected bug: a row holds {trigger!r}")
    return None


@dataclass(frozen=True)
class Fault:
    """What a triggered job raises during training: ``cuda-oom@3``, ``cpu-oom@2:batch>2``, ``...:nogc``.

    ``kind@step`` raises at the start of optimizer step ``step`` (1-based), as long
    as the micro-batch is above ``batch>N`` (if given) and, with ``nogc``, only while
    gradient checkpointing is off: the error a real device gives where the memory a
    step needs grows with the micro-batch.
    """

    kind: str
    step: int
    above_batch: int = 0
    without_gc: bool = False

    @classmethod
    def parse(cls, text: str | None) -> Fault | None:
        if not text or text == "bug":
            return None
        match = re.fullmatch(r"(cuda-oom|cpu-oom)@(\d+)((?::batch>\d+|:nogc)*)", text.strip())
        if match is None:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected bug, or cuda-oom|cpu-oom@STEP[:batch>N][:nogc]")
        conditions = match.group(3)
        above = re.search(r"batch>(\d+)", conditions)
        return cls(match.group(1), int(match.group(2)), int(above.group(1)) if above else 0, ":nogc" in conditions)

    @classmethod
    def from_env(cls) -> Fault | None:
        return cls.parse(os.environ.get(FAULT_ENV))

    def applies(self, step: int, batch_size: int, gradient_checkpointing: bool) -> bool:
        return step == self.step and batch_size > self.above_batch and not (self.without_gc and gradient_checkpointing)

    def exception(self, batch_size: int) -> BaseException:
        """The exception itself, with the message the real allocator gives."""
        import torch

        wanted = (1 << 27) * batch_size  # "needs" memory in proportion to the micro-batch
        if self.kind == "cuda-oom":
            return torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {wanted / 2**30:.2f} GiB. GPU 0 has a total capacity of "
                "79.19 GiB of which 112.00 MiB is free. Including non-PyTorch memory, this process has 79.07 GiB "
                "memory in use. (injected by LORAQ_TEST_FAULT)")
        return RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                            f"you tried to allocate {wanted} bytes. Error code 12 (Cannot allocate memory)")


class FaultCallback:
    def __init__(self, fault: Fault, batching: Batching) -> None:
        self.fault, self.batching = fault, batching

    def callback(self) -> Any:
        from transformers import TrainerCallback

        hook = self

        class InjectedFault(TrainerCallback):  # type: ignore[misc]
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                b = hook.batching
                if hook.fault.applies(state.global_step + 1, b.batch_size, b.gradient_checkpointing):
                    raise hook.fault.exception(b.batch_size)

        return InjectedFault()
