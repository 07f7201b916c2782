"""How a job's rows are laid out for training and evaluation: packed or padded, and the memory options.

:class:`Layout` is decided once per job, after the data is encoded and before the base
is evaluated:

- packing (``training.packing``, on by default) unless the base model lets packed rows
  attend to each other, which :func:`~loraq.model.batching.attends_across_rows` checks
  on the model itself once per resident base (an architecture whose mask ignores
  ``position_ids`` would train on the wrong attention without any error): then the job
  trains padded, and says so;
- the plan of steps and micro-batches (:mod:`loraq.data.packing`): the steps per epoch
  come from it, so that the trainer's ``max_steps`` is what ``--dry-run`` estimated;
- the eval micro-batches (packed up to the same token budget a training micro-batch
  holds on average, or padded by length), for loraq's own eval loss and ``Trainer``'s;
- gradient checkpointing (``auto`` resolved from the largest micro-batch) and the fused
  loss (:mod:`.memory`).

What it decided goes into the result's ``extras["packing"]`` and ``extras["memory"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..data import packing
from ..model.batching import EvalBatches, MicroBatches, attends_across_rows, collator_for, sequential_trainer
from ..queue.spec import JobSpec
from . import memory

#: id(model) -> the largest logit gap packed rows showed (None: they stay apart); one probe per resident base.
_PROBED: dict[int, float | None] = {}


def trainer_class(trainer: Any) -> Any:
    return sequential_trainer(trainer)


@dataclass
class Layout:
    packed: bool
    collator: Any
    eval: EvalBatches
    steps_per_epoch: int
    gradient_checkpointing: bool
    liger_args: dict[str, Any]
    notes: dict[str, Any] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, spec: JobSpec, prepared: Any, resident: Any, device: str, log: Callable[[str], None]) -> Layout:
        t = spec.training
        batch, accum = int(t.batch_size), t.grad_accum  # type: ignore[arg-type]
        packed, notes = t.packing, {}
        if packed:
            key = id(resident.model)
            if key not in _PROBED:
                _PROBED.clear()
                _PROBED[key] = attends_across_rows(resident.model, int(resident.model.config.vocab_size))
            if _PROBED[key] is not None:
                packed = False
                notes["fallback"] = (f"packed rows attended to each other in {type(resident.model).__name__} (logits "
                                     f"off by {_PROBED[key]:.3g}): trained padded instead")
                log(f"packing: {notes['fallback']}")
        lengths = prepared.train.lengths
        plan = packing.plan_train(lengths, batch_size=batch, grad_accum=accum, packing=packed, seed=t.seed)
        eval_lengths = prepared.eval.lengths
        eval_micro = packing.plan_eval(eval_lengths, budget=packing.micro_budget(lengths, batch), batch_size=batch,
                                       packing=packed)
        laid_out = [sum(lengths[i] for i in m) if packed else len(m) * max((lengths[i] for i in m), default=0)
                    for step in plan.steps for m in step]
        dtype_bytes = int(getattr(getattr(resident.model, "dtype", None), "itemsize", 4) or 4)
        checkpointing, memory_note = memory.checkpointing(t.gradient_checkpointing, resident.model.config,
                                                          max(laid_out, default=1), dtype_bytes, device)
        fused, why_not = memory.fused_loss(t.fused_loss, device, resident.model)
        memory_note["fused_loss"] = fused
        if why_not:
            memory_note["fused_loss_note"] = why_not
            log(why_not)
        log(f"batches: {'packed' if packed else 'padded, by length'}; {plan.n_steps} steps an epoch of "
            f"{accum} micro-batch(es); gradient checkpointing {'on' if checkpointing else 'off'}"
            f"{' (auto)' if t.gradient_checkpointing == 'auto' else ''}; fused loss {'on' if fused else 'off'}")
        return cls(packed=packed, collator=collator_for(packed, resident.tokenizer.pad_token_id),
                   eval=EvalBatches(prepared.eval.items, eval_micro, packed), steps_per_epoch=plan.n_steps,
                   gradient_checkpointing=checkpointing, liger_args=memory.liger_args(fused),
                   notes={"packing": notes, "memory": memory_note}, lengths=lengths)

    def plan(self, batch_size: int, grad_accum: int, seed: int) -> packing.Plan:
        return packing.plan_train(self.lengths, batch_size=batch_size, grad_accum=grad_accum, packing=self.packed,
                                  seed=seed)

    def train(self, prepared: Any, batching: Any, seed: int) -> MicroBatches:
        """The training set for ``Trainer`` at ``batching`` (the OOM back-off's current micro-batch and accumulation)."""
        plan = self.plan(batching.batch_size, batching.grad_accum, seed)
        if plan.n_steps != self.steps_per_epoch:  # the steps depend on batch_size x grad_accum only
            raise RuntimeError(f"the plan at {batching} has {plan.n_steps} steps an epoch, not {self.steps_per_epoch}")
        return MicroBatches(prepared.train.items, plan, seed)

    def extras(self, batching: Any, seed: int, prepared: Any) -> dict[str, Any]:
        """``extras["packing"]`` (the plan's token figures) and ``extras["memory"]`` of the result."""
        stats = self.plan(batching.batch_size, batching.grad_accum, seed).stats(self.lengths)
        stats["eval_micro_batches"] = len(self.eval)
        stats.update(self.notes.get("packing", {}))
        note = dict(self.notes.get("memory", {}))
        note["gradient_checkpointing"] = batching.gradient_checkpointing  # the back-off may have turned it on
        return {"packing": stats, "memory": note}
