"""Successive halving's state in the store: each member's round (``halving_members``) and each decided
round (``halving_rounds``), migration 6; and the store's moves of a sweep's jobs between rounds.

Everything here runs inside a transaction of the store, which passes itself in: a
round ends (:func:`end`) and is decided (:func:`decide`) in the transaction of the
event that ends it, so a killed worker never loses or repeats a decision. What a
round decides is :func:`.halving.settle` (pure); what a member's moves are is
:data:`.records.ROUND_TRANSITIONS`, checked in :func:`move`, which guards its
``UPDATE`` with the state it read, as the store's ``_transition`` does for a job.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
from collections.abc import Sequence
from typing import Any

from ..errors import TransitionError
from . import halving
from .records import (
    CANCELLED,
    HALVING_KIND,
    JOB_SELECT,
    OUTCOME_CANCELLED,
    OUTCOME_ROUND,
    PENDING,
    PRUNED,
    RETRIED,
    ROUND_TRANSITIONS,
    RUNNING,
    TRAINING,
    WAITING,
    Job,
    Moves,
    SqlExpr,
)

#: An SQL condition on ``jobs``: the job does not wait for its halving round to be decided (the claim's).
NOT_WAITING = f"NOT EXISTS (SELECT 1 FROM halving_members w WHERE w.job_id = jobs.id AND w.state = '{WAITING}')"


def enroll(conn: sqlite3.Connection, job_id: int, sweep: str) -> None:
    """A job of a halving sweep, just enqueued: it trains round 1."""
    conn.execute("INSERT INTO halving_members (job_id, sweep, round, state) VALUES (?, ?, 1, ?)",
                 (job_id, sweep, TRAINING))


def move(conn: sqlite3.Connection, job_id: int, to_state: str, **sets: Any) -> str:
    """Move a member to ``to_state`` (with ``sets``: round, eval_loss, why, history …); return the state it left."""
    row = conn.execute("SELECT state FROM halving_members WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        raise TransitionError(f"job {job_id} is in no halving round")
    current = str(row["state"])
    if (current, to_state) not in ROUND_TRANSITIONS:
        raise TransitionError(f"job {job_id}: halving {current} -> {to_state} is not allowed")
    values = {"state": to_state, **_encoded(sets)}
    clause = ", ".join(f"{k} = ?" for k in values)
    if conn.execute(f"UPDATE halving_members SET {clause} WHERE job_id = ? AND state = ?",
                    [*values.values(), job_id, current]).rowcount != 1:
        raise TransitionError(f"job {job_id} changed while moving it to halving {to_state}")
    return current


def note(conn: sqlite3.Connection, job_id: int, **sets: Any) -> None:
    """Record ``why`` and ``history`` of a member whose state stays (it had failed or was cancelled)."""
    values = _encoded(sets)
    conn.execute(f"UPDATE halving_members SET {', '.join(f'{k} = ?' for k in values)} WHERE job_id = ?",
                 [*values.values(), job_id])


def members(conn: sqlite3.Connection, sweep: str, round_no: int) -> list[Job]:
    """The jobs of ``sweep`` in round ``round_no``, oldest first."""
    rows = conn.execute(f"{JOB_SELECT} WHERE h.sweep = ? AND h.round = ? ORDER BY jobs.id", (sweep, round_no))
    return [Job.from_row(r) for r in rows]


def waiting_rounds(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    """``(sweep, round)`` of every round a member waits in."""
    rows = conn.execute("SELECT DISTINCT sweep, round FROM halving_members WHERE state = ? ORDER BY sweep, round",
                        (WAITING,))
    return [(str(r["sweep"]), int(r["round"])) for r in rows]


def is_decided(conn: sqlite3.Connection, sweep: str, round_no: int) -> bool:
    return conn.execute("SELECT 1 FROM halving_rounds WHERE sweep = ? AND round = ?",
                        (sweep, round_no)).fetchone() is not None


def record(conn: sqlite3.Connection, sweep: str, round_no: int, verdicts: Sequence[dict[str, Any]]) -> None:
    """The round's decision, made once: a second one would be a bug (the primary key refuses it)."""
    conn.execute("INSERT INTO halving_rounds (sweep, round, verdicts) VALUES (?, ?, ?)",
                 (sweep, round_no, json.dumps(list(verdicts))))


def _encoded(sets: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(list(v)) if k == "history" else v for k, v in sets.items()}


# ---------------------------------------------------------------- the store's moves (inside its transactions)


def end(store: Moves, conn: sqlite3.Connection, job_id: int, epoch: int, *, steps: int, eval_loss: float | None,
        train_loss: float | None, metric: str | None, score: float | None) -> None:
    """The running job (owned by ``epoch``) trained to its round's steps: it waits for the rest of the round,
    unpublished, its attempt not counted, and the round is decided if it was the last to end it."""
    member = store._read(conn, job_id).halving
    if member is None:
        raise TransitionError(f"job {job_id} is in no halving round")
    k, rounds_n = member.round, member.plan.rounds
    loss = eval_loss if eval_loss is not None and math.isfinite(eval_loss) else None
    released = {"attempts": SqlExpr("attempts - 1"), "lease_owner": None, "lease_expires": None}
    if is_decided(conn, member.sweep, k):  # decided without it (it was retried late)
        why = f"halving: round {k} of {rounds_n} was decided while this job was not in it; not kept"
        move(conn, job_id, PRUNED, why=why)
        store._transition(conn, job_id, CANCELLED, reason=why, epoch=epoch, expect=(RUNNING,),
                          sets=released | {"finished_at": store.clock(), "error_kind": HALVING_KIND, "error": why})
        store._end_attempt(conn, job_id, epoch, OUTCOME_CANCELLED, reason=why, counted=False)
        return
    graded = {"metric": metric, "score": score if score is not None and math.isfinite(score) else None}
    move(conn, job_id, WAITING, eval_loss=loss, **(graded if metric is not None else {}))
    shown = f"{loss:.4f}" if loss is not None else "unknown"
    why = f"halving: round {k} of {rounds_n} done at step {steps}, eval loss {shown}; waiting for the rest of the round"
    store._transition(conn, job_id, PENDING, reason=why, epoch=epoch, expect=(RUNNING,),
                      sets=released | {"error_kind": HALVING_KIND, "error": why, "eval_loss": loss,
                                       "train_loss": train_loss})
    store._end_attempt(conn, job_id, epoch, OUTCOME_ROUND, reason=why, counted=False)
    decide(store, conn, member.sweep, k)


def decide_of(store: Moves, conn: sqlite3.Connection, job_id: int) -> bool:
    """Decide the round job ``job_id`` (which just failed or was cancelled) is in, if that ended it."""
    member = store._read(conn, job_id).halving
    return member is not None and member.state != RETRIED and decide(store, conn, member.sweep, member.round)


def decide(store: Moves, conn: sqlite3.Connection, sweep: str, k: int) -> bool:
    """Decide round ``k`` of ``sweep`` if all its jobs have ended it (:func:`.halving.settle`): the better
    half goes on to the next round's steps, the rest are cancelled, and the decision is recorded once."""
    if is_decided(conn, sweep, k):
        return False
    jobs = [j for j in members(conn, sweep, k) if j.halving is not None and j.halving.state != RETRIED]
    seen = []
    for job in jobs:
        assert job.halving is not None
        waiting = job.status == PENDING and job.halving.state == WAITING
        seen.append(halving.Member(job.name, waiting, job.halving.eval_loss if waiting else None,
                                   job.halving.score if waiting else None,
                                   ongoing=job.status == RUNNING or (job.status == PENDING and not waiting)))
    plan = jobs[0].halving.plan if jobs and jobs[0].halving else None
    if plan is None:
        return False
    metric = next((j.halving.metric for j in jobs if j.halving and j.halving.metric), None)
    verdicts = halving.settle(k, plan.rounds, seen, metric=metric)
    if verdicts is None:
        return False
    by_name = {j.name: j for j in jobs}
    for verdict in verdicts:
        job = by_name[verdict.name]
        member = job.halving
        assert member is not None
        history = [*member.history, {"round": k, "eval_loss": member.eval_loss, "rank": verdict.rank,
                                     "of": verdict.of}]
        if verdict.kept:
            steps = plan.steps[k]
            move(conn, job.id, TRAINING, round=k + 1, why=verdict.reason, history=history)
            _set_max_steps(store, conn, job.id, steps)
            conn.execute("UPDATE jobs SET error_kind = ?, error = ? WHERE id = ?",
                         (HALVING_KIND, f"{verdict.reason} ({steps} steps)", job.id))
            store._event(conn, job.id, None, None, f"{verdict.reason} ({steps} steps, resuming from its newest "
                                                   "checkpoint)")
        elif job.status == PENDING and member.state == WAITING:
            move(conn, job.id, PRUNED, why=verdict.reason, history=history)
            store._transition(conn, job.id, CANCELLED, reason=verdict.reason, expect=(PENDING,),
                              sets={"finished_at": store.clock(), "error_kind": HALVING_KIND,
                                    "error": verdict.reason})
        else:  # failed or cancelled already: the ranking is recorded, its state stays
            note(conn, job.id, why=verdict.reason, history=history)
    record(conn, sweep, k, [dataclasses.asdict(v) for v in verdicts])
    group = jobs[0].spec.settings.group or sweep
    store._event(conn, None, None, None, f"halving: sweep {group} round {k} of {plan.rounds} decided: "
                 + ", ".join(f"{v.rank}. {v.name}{'' if v.kept else ' (pruned)'}" for v in verdicts))
    return True


def retry_outside(store: Moves, conn: sqlite3.Connection, job_id: int) -> None:
    """A pruned job (or one whose round was decided without it) retried by the operator trains on
    to the full budget from its checkpoint, as a job of its own: no round waits for it."""
    member = store._read(conn, job_id).halving
    if member is None or member.state == RETRIED:
        return
    if member.state == PRUNED or (is_decided(conn, member.sweep, member.round) and member.round < member.plan.rounds):
        move(conn, job_id, RETRIED)
        _set_max_steps(store, conn, job_id, member.plan.budget)
        store._event(conn, job_id, None, None, "halving: retried outside the sweep's rounds; trains to the "
                                               f"full budget of {member.plan.budget} steps")
    elif member.state == WAITING:  # cancelled while it waited: it ends its round again
        move(conn, job_id, TRAINING)


def _set_max_steps(store: Moves, conn: sqlite3.Connection, job_id: int, steps: int) -> None:
    """The steps the trainer runs (the stored settings it is sent): the next round's, or the full budget."""
    store._rewrite_spec(conn, job_id, lambda s: s.setdefault("spec", {}).setdefault("training", {}).update(
        max_steps=steps))
