"""Which examples train together: a job's optimizer steps and micro-batches, planned from token counts.

Torch-free: ``loraq submit --dry-run`` plans with the lengths it counted, the trainer
with the lengths it encoded, and the same lengths give the same plan, so the step and
epoch estimates of a dry run are what the trainer runs.

A plan is made once per job from its seed: a list of optimizer steps, each a list of
``grad_accum`` micro-batches, each a tuple of example indices. Every epoch visits the
same steps in its own order (:func:`epoch_order`), so the number of steps per epoch
never changes between epochs.

- **Packed** (``training.packing: true``, the default): whole examples, in a seeded
  random order, are put into steps by best fit, each step holding at most
  ``grad_accum x batch_size x L`` tokens, where ``L`` is the mean length of the
  training rows rounded up (:func:`step_budget`): a step holds ``batch_size x
  grad_accum`` examples on average, as a padded step does, without the padding. An
  example is never split (one longer than the budget is a step of its own). Each step
  is then split into ``grad_accum`` micro-batches of about equal tokens (longest
  first, into the lightest micro-batch); the trainer lays each micro-batch out as one
  row with ``position_ids`` restarting at every example.
- **Padded** (``packing: false``): grouped by length. The seeded order is cut into
  chunks of 64 steps, each sorted by length, and cut into steps of ``batch_size x
  grad_accum`` examples; a step's micro-batches are ``batch_size`` consecutive
  (similar-length) examples each.

Either way, which examples share an optimizer step depends only on ``batch_size x
grad_accum``, not on how a step is cut into micro-batches: the OOM back-off (micro-batch
halved, ``grad_accum`` doubled) goes on with the same steps, and since the loss is the
mean over the trainable tokens of the whole step (transformers' ``num_items_in_batch``),
with the same loss. A step may have fewer examples than ``grad_accum``; its remaining
micro-batches are empty (the trainer feeds them as one untrained token).
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Padded batches are grouped by length within chunks of this many steps (transformers' LengthGroupedSampler
#: uses megabatches of 50 batches; a power of two here, the exact figure matters little).
GROUP_STEPS = 64

MicroBatch = tuple[int, ...]
Step = tuple[MicroBatch, ...]


def mean_length(lengths: Sequence[int]) -> int:
    """The mean token count of the rows, rounded up (integer arithmetic: both sides get the same figure)."""
    return max(1, -(-sum(lengths) // max(1, len(lengths))))


def step_budget(lengths: Sequence[int], batch_size: int, grad_accum: int) -> int:
    """The most tokens a packed optimizer step holds: ``batch_size x grad_accum`` rows of mean length."""
    return batch_size * grad_accum * mean_length(lengths)


def micro_budget(lengths: Sequence[int], batch_size: int) -> int:
    """The tokens a packed micro-batch holds on average (and an eval micro-batch at most, unless one row is longer)."""
    return batch_size * mean_length(lengths)


@dataclass(frozen=True)
class Plan:
    """A job's optimizer steps, each of ``grad_accum`` micro-batches of example indices."""

    steps: tuple[Step, ...]
    packed: bool
    grad_accum: int
    budget: int | None = None  # tokens per step, when packed

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def n_micro(self) -> int:
        return len(self.steps) * self.grad_accum

    def micro(self, step: int, index: int) -> MicroBatch:
        return self.steps[step][index]

    def stats(self, lengths: Sequence[int]) -> dict[str, Any]:
        """What the plan costs in tokens: what ``extras["packing"]`` and ``--dry-run`` show."""
        tokens = sum(lengths[i] for step in self.steps for micro in step for i in micro)
        laid_out = sum(_laid_out(micro, lengths, self.packed) for step in self.steps for micro in step)
        padded = sum(_laid_out(micro, lengths, False) for step in self.steps for micro in step)
        micro_tokens = [sum(lengths[i] for i in micro) for step in self.steps for micro in step if micro]
        return {
            "packed": self.packed,
            "steps_per_epoch": self.n_steps,
            "micro_batches_per_epoch": self.n_micro,
            "empty_micro_batches": sum(1 for step in self.steps for micro in step if not micro),
            "tokens_per_epoch": tokens,
            "laid_out_tokens_per_epoch": laid_out,  # what the model computes on, padding included
            "padding_share": round(1 - tokens / laid_out, 4) if laid_out else 0.0,
            "step_budget": self.budget,
            "fill": round(tokens / (self.budget * self.n_steps), 4) if self.budget and self.n_steps else None,
            "max_micro_tokens": max(micro_tokens, default=0),
            "mean_rows_per_step": round(sum(len(micro) for step in self.steps for micro in step) / max(1, self.n_steps),
                                        2),
            # the same micro-batch size, padded as transformers' default collator pads a random batch
            "padded_random_tokens_per_epoch": padded_random_tokens(lengths, self.grad_accum, self.n_steps),
            "padded_grouped_tokens_per_epoch": padded,
        }


def _laid_out(micro: MicroBatch, lengths: Sequence[int], packed: bool) -> int:
    if not micro:
        return 1  # an empty micro-batch is fed as one untrained token
    if packed:
        return sum(lengths[i] for i in micro)
    return len(micro) * max(lengths[i] for i in micro)


def padded_random_tokens(lengths: Sequence[int], grad_accum: int, n_steps: int) -> int:
    """Tokens a padded collator lays out over random batches of the same mean size (seeded, for comparison only)."""
    if not lengths or not n_steps:
        return 0
    batch = max(1, round(len(lengths) / (n_steps * grad_accum)))
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    return sum(len(order[i:i + batch]) * max(lengths[j] for j in order[i:i + batch])
               for i in range(0, len(order), batch))


def _order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def plan_train(lengths: Sequence[int], *, batch_size: int, grad_accum: int, packing: bool, seed: int) -> Plan:
    """The optimizer steps of one epoch over examples of ``lengths`` tokens (see the module docstring)."""
    if not lengths:
        return Plan((), packing, grad_accum)
    order = _order(len(lengths), seed)
    if packing:
        budget = step_budget(lengths, batch_size, grad_accum)
        bins = best_fit(order, lengths, budget)
        steps = tuple(balance(members, lengths, grad_accum) for members in bins)
        return Plan(steps, True, grad_accum, budget)
    per_step = batch_size * grad_accum
    grouped: list[int] = []
    chunk = GROUP_STEPS * per_step
    for start in range(0, len(order), chunk):
        grouped += sorted(order[start:start + chunk], key=lambda i: (-lengths[i], i))
    padded_steps = []
    for start in range(0, len(grouped), per_step):
        members = grouped[start:start + per_step]
        micros = [tuple(members[k:k + batch_size]) for k in range(0, len(members), batch_size)]
        padded_steps.append(tuple(micros + [()] * (grad_accum - len(micros))))
    return Plan(tuple(padded_steps), False, grad_accum)


def best_fit(order: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Examples (in ``order``) into bins of at most ``budget`` tokens: each into the fullest bin it fits in.

    A bin keeps the order its examples arrived in; bins are returned in the order they were opened.
    An example longer than ``budget`` gets a bin of its own.
    """
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin), sorted: the fullest bin that fits is found by bisect
    for index in order:
        need = lengths[index]
        at = bisect.bisect_left(room, (need, -1))
        if at < len(room):
            left, b = room.pop(at)
            bins[b].append(index)
            if left - need > 0:
                bisect.insort(room, (left - need, b))
        else:
            bins.append([index])
            if budget - need > 0:
                bisect.insort(room, (budget - need, len(bins) - 1))
    return bins


def balance(members: Sequence[int], lengths: Sequence[int], parts: int) -> Step:
    """``members`` split into ``parts`` micro-batches of about equal tokens (longest first into the lightest).

    Fewer members than parts leaves the last micro-batches empty; each keeps its members in index order.
    """
    heap = [(0, k) for k in range(parts)]
    groups: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(members, key=lambda i: (-lengths[i], i)):
        tokens, k = heapq.heappop(heap)
        groups[k].append(index)
        heapq.heappush(heap, (tokens + lengths[index], k))
    groups.sort(key=lambda g: (not g, g[:1]))  # the empty ones last, the rest by their first index
    return tuple(tuple(sorted(g)) for g in groups)


def plan_eval(lengths: Sequence[int], *, budget: int, batch_size: int, packing: bool) -> list[MicroBatch]:
    """Evaluation micro-batches, in a fixed order: packed up to ``budget`` tokens, or padded ``batch_size`` rows
    grouped by length."""
    if packing:
        return [tuple(sorted(b)) for b in best_fit(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)),
                                                   lengths, budget)]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [tuple(order[k:k + batch_size]) for k in range(0, len(order), batch_size)]


def epoch_order(n_steps: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the plan's steps (a seeded permutation)."""
    order = list(range(n_steps))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def steps_per_epoch(lengths: Sequence[int], *, batch_size: int, grad_accum: int, packing: bool, seed: int) -> int:
    """Optimizer steps in one epoch: what ``--dry-run`` estimates with and what the trainer runs."""
    if not packing:
        return max(1, math.ceil(len(lengths) / (batch_size * grad_accum)))
    return max(1, plan_train(lengths, batch_size=batch_size, grad_accum=grad_accum, packing=True, seed=seed).n_steps)
