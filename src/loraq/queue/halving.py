"""Successive halving for a sweep (``sweep_strategy: halving``, issue 12).

A sweep of *N* configurations with ``training.max_steps: B`` (the full budget)
trains in ``R + 1`` rounds, ``R = ceil(log2 N)``: round *k* trains the jobs still in
it up to ``B // 2**(R + 1 - k)`` steps (the last round to ``B``). Once every job of a
round has ended it, the round is decided: its jobs are ranked by eval loss (lower
first; ties by name; a job that failed or was cancelled counts as worst), the
better half (``ceil(n / 2)``) goes on, resuming from its own newest checkpoint with
the next round's ``max_steps``, and the rest are cancelled with the reason
(``halving: round 1 of 3, eval loss 2.31 ranked 3 of 3``). After ``R`` decisions one
job is left; only it trains to ``B`` and is published. N = 4, B = 8: 4 jobs to 2
steps, 2 to 4, 1 to 8: 2 B of training instead of the grid's 4 B.

The plan rides in the stored job (``halving``: configs, budget, steps, the sweep's id)
and never changes; where each job stands is state, in the store's tables
(``halving_members``, ``halving_rounds``: queue/rounds.py). The store moves a job
between rounds (:meth:`~loraq.queue.store.Store.end_round`) and decides a round with
:func:`settle`, a pure function, in the transaction of the event that ends it, so a
killed worker never loses or repeats a decision. Standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .records import TRAINING

STRATEGIES = ("grid", "halving")


def rounds_for(configs: int) -> int:
    """Decisions needed to halve ``configs`` down to one (``ceil(log2 N)``)."""
    return max(1, math.ceil(math.log2(configs)))


def steps_for(configs: int, budget: int) -> list[int]:
    """Each round's ``max_steps``: ``budget // 2**(R + 1 - k)`` for k = 1 … R + 1 (the last is ``budget``)."""
    decisions = rounds_for(configs)
    return [budget // 2 ** (decisions - k) for k in range(decisions + 1)]


def plan(configs: int, budget: int) -> dict[str, Any]:
    """The plan stored with each job of the sweep (each starts in round 1: queue/rounds.py)."""
    return {"configs": configs, "budget": budget, "steps": steps_for(configs, budget)}


#: What a plan held besides itself before rounds were state (migration 6): a job as submitted
#: then is hashed with them, so a sweep submitted again is still recognised as the same.
SUBMITTED_AS: dict[str, Any] = {"round": 1, "state": TRAINING, "history": []}


def budget_problem(configs: int, budget: int) -> str | None:
    """Why ``budget`` steps cannot be halved over ``configs`` configurations (``None`` if they can)."""
    need = 2 ** rounds_for(configs)
    if budget < need:
        return (f"sweep_strategy: halving over {configs} configurations needs at least {need} steps "
                f"(the first of its {rounds_for(configs) + 1} rounds trains max_steps/{need}); got {budget}")
    return None


def counts(configs: int) -> list[int]:
    """How many jobs each round trains: 5 → [5, 3, 2, 1]."""
    out = [configs]
    while out[-1] > 1:
        out.append(math.ceil(out[-1] / 2))
    return out


def describe(halving: dict[str, Any]) -> str:
    """``3 rounds: 4 jobs to 2 steps, 2 to 4, 1 to 8``: the plan, for people (``--dry-run``)."""
    parts = [f"{n} job{'s' if n != 1 else ''} to {s} step{'s' if s != 1 else ''}"
             for n, s in zip(counts(halving["configs"]), halving["steps"], strict=False)]
    return f"successive halving in {len(halving['steps'])} rounds: " + ", then ".join(parts)


@dataclass(frozen=True)
class Member:
    """One job of a round, as the decision sees it."""

    name: str
    waiting: bool  # it ended the round with an eval loss and waits; otherwise it failed or was cancelled
    eval_loss: float | None
    score: float | None = None  # the sweep's gate metric (a grader, higher is better), when it gates on one
    ongoing: bool = False  # it has not ended the round yet (running, or pending to train it)


@dataclass(frozen=True)
class Verdict:
    name: str
    rank: int
    of: int
    kept: bool
    reason: str


def decide(round_no: int, rounds: int, members: list[Member], metric: str | None = None) -> list[Verdict]:
    """Rank a round's members and keep the better half (``ceil(n / 2)``), best first.

    Lower eval loss first, or with ``metric`` (a grader the sweep gates on) the higher
    ``score``; a job with no finite value, one that failed or was cancelled ranks after
    every job that has one; ties go by name, so a decision made again gives the same
    answer. Only waiting jobs can be kept.
    """
    def value(m: Member) -> float | None:
        v = m.score if metric else m.eval_loss
        return None if v is None or not math.isfinite(v) else (-v if metric else v)

    def key(m: Member) -> tuple[bool, bool, float, str]:
        usable = m.waiting and value(m) is not None
        return (not usable, not m.waiting, value(m) if usable else math.inf, m.name)  # type: ignore[return-value]

    ranked = sorted(members, key=key)
    keep = math.ceil(len(ranked) / 2)
    out = []
    for rank, m in enumerate(ranked, 1):
        kept = rank <= keep and m.waiting
        finite = value(m) is not None
        measured = m.score if metric else m.eval_loss
        loss = f"{metric or 'eval loss'} {measured:.4f}" if m.waiting and finite and measured is not None else (
            f"no {metric or 'eval loss'}" if m.waiting else "failed or cancelled, counted as worst")
        what = f"goes on to round {round_no + 1}" if kept else f"pruned (the better {keep} go{'es' if keep == 1 else ''} on)"
        out.append(Verdict(m.name, rank, len(ranked), kept,
                           f"halving: round {round_no} of {rounds}, {loss} ranked {rank} of {len(ranked)}: {what}"))
    return out


def settle(round_no: int, rounds: int, members: list[Member], metric: str | None = None) -> list[Verdict] | None:
    """The decision of a round, once every member has ended it: ``None`` while one has not.

    Pure: the store gathers the members and applies the verdicts in one transaction
    (queue/rounds.py), so the decision is made once, with the state it was made on.
    """
    if round_no >= rounds or not members or any(m.ongoing for m in members):
        return None
    return decide(round_no, rounds, members, metric=metric)
