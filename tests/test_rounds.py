"""Successive halving's rounds as state (queue/rounds.py, migration 6): tables, transitions, upgrade."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from loraq.errors import TransitionError
from loraq.queue import halving, rounds
from loraq.queue.migrations import MIGRATIONS, statements
from loraq.queue.records import PRUNED, RETRIED, ROUND_STATES, ROUND_TRANSITIONS, TRAINING, WAITING
from loraq.queue.store import CANCELLED, FAILED, PENDING, RUNNING, NewJob, Store, WorkerId

W = WorkerId("h", 1, "t")
HELD = 9.0e15  # what an older loraq stored as not_before of a job waiting for its round


def test_the_round_states_and_their_moves_are_one_table_that_migration_6_agrees_with() -> None:
    assert set(ROUND_STATES) == {TRAINING, WAITING, PRUNED, RETRIED}
    assert {s for pair in ROUND_TRANSITIONS for s in pair} <= set(ROUND_STATES)
    assert "CHECK (state IN ('training','waiting','pruned','retried'))" in MIGRATIONS[5]
    assert len(MIGRATIONS) == 6


def test_a_member_moves_only_as_the_table_says(tmp_path: Path) -> None:
    with Store.open(tmp_path / "loraq.db") as store:
        (job_id,) = store.enqueue([NewJob(name="a", spec={"spec": {"name": "a", "group": "g"},
                                                          "halving": halving.plan(2, 4)}, base_key="b")])
        with store.transaction() as conn:
            with pytest.raises(TransitionError, match="training -> training"):
                rounds.move(conn, job_id, TRAINING)
            assert rounds.move(conn, job_id, WAITING, eval_loss=1.0) == TRAINING
            assert rounds.move(conn, job_id, PRUNED) == WAITING
            with pytest.raises(TransitionError, match="pruned -> waiting"):
                rounds.move(conn, job_id, WAITING)
        member = store.job(job_id).halving
        assert member is not None and (member.state, member.round, member.eval_loss) == (PRUNED, 1, 1.0)


def test_a_waiting_job_is_pending_and_never_claimed_without_a_sentinel(tmp_path: Path) -> None:
    with Store.open(tmp_path / "loraq.db") as store:
        plan = halving.plan(2, 4)
        store.enqueue([NewJob(name=n, spec={"spec": {"name": n, "group": "g"}, "halving": plan}, base_key="b")
                       for n in ("a", "b")])
        a = store.claim(W, lease_s=60)
        assert a is not None and a.job.halving is not None and a.job.halving.is_round_end
        assert store.end_round(a.job.id, a.epoch, steps=2, eval_loss=1.0)
        waiting = store.job("a")
        assert (waiting.status, waiting.not_before, waiting.halving and waiting.halving.state) == (PENDING, 0, WAITING)
        b = store.claim(W, lease_s=60)
        assert b is not None and b.job.name == "b"
        assert store.claim(W, lease_s=60) is None  # a waits for b's end of the round
        assert store.end_round(b.job.id, b.epoch, steps=2, eval_loss=2.0)
        after = {j.name: j for j in store.jobs()}
        assert after["b"].status == CANCELLED and after["b"].halving and after["b"].halving.is_pruned
        assert after["a"].halving is not None and (after["a"].halving.round, after["a"].halving.state) == (2, TRAINING)
        assert after["a"].spec.settings.training["max_steps"] == 4
        last = store.claim(W, lease_s=60)
        assert last is not None and last.job.name == "a" and not last.job.halving.is_round_end  # type: ignore[union-attr]


def test_the_decision_is_pure_and_waits_for_every_member() -> None:
    members = [halving.Member("a", True, 1.0), halving.Member("b", False, None, ongoing=True)]
    assert halving.settle(1, 2, members) is None
    members[1] = halving.Member("b", True, 0.5)
    verdicts = halving.settle(1, 2, members)
    assert verdicts is not None and [(v.name, v.kept) for v in verdicts] == [("b", True), ("a", False)]
    assert halving.settle(2, 2, members) is None  # the last round is trained, never decided


def _store_at_schema_5(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:5]:
        for statement in statements(migration):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    return conn


def _old_job(conn: sqlite3.Connection, job_id: int, name: str, status: str, plan: dict, *, group: str,
             not_before: float = 0.0, max_steps: int = 2, error: str | None = None) -> None:
    spec = {"spec": {"name": name, "group": group, "training": {"max_steps": max_steps}}, "halving": plan,
            "base_model": "/m", "dataset_path": "/d"}
    conn.execute("INSERT INTO jobs (id, name, status, priority, spec, base_key, max_retries, not_before, error_kind, "
                 "error, created_at, updated_at) VALUES (?, ?, ?, 0, ?, 'b', 0, ?, ?, ?, 0, 0)",
                 (job_id, name, status, json.dumps(spec, sort_keys=True), not_before,
                  "halving" if error else None, error))


def test_a_home_at_schema_5_upgrades_with_its_halving_rounds_intact(tmp_path: Path) -> None:
    """Mid-sweep, written as an older loraq kept it: the plan's state in the spec JSON, a held not_before,
    each decision a queue_state key. Migration 6 moves all of it to the rounds' tables."""
    db = tmp_path / "loraq.db"
    conn = _store_at_schema_5(db)
    steps = [2, 4, 8]
    base = {"configs": 4, "budget": 8, "steps": steps, "sweep": "s1"}
    kept = [{"round": 1, "eval_loss": 1.0, "rank": 1, "of": 4}]
    # round 1 decided: a and b kept (round 2), c pruned, d failed; a has ended round 2 and waits; b trains it
    _old_job(conn, 1, "a", "pending", base | {"round": 2, "state": "waiting", "eval_loss": 0.5, "history": kept,
                                              "why": "halving: round 1 of 3 ... goes on"},
             group="g", not_before=HELD, max_steps=4, error="waiting for the rest of the round")
    _old_job(conn, 2, "b", "running", base | {"round": 2, "state": "training", "history": kept}, group="g",
             max_steps=4)
    _old_job(conn, 3, "c", "cancelled", base | {"round": 1, "state": "pruned", "why": "halving: pruned c",
                                                "history": [{"round": 1, "eval_loss": 3.0, "rank": 3, "of": 4}]},
             group="g", error="halving: pruned c")
    _old_job(conn, 4, "d", "failed", base | {"round": 1, "state": "training", "why": "halving: failed d"},
             group="g")
    # a sweep from before sweep ids: its rounds are keyed by its group
    old = {"configs": 2, "budget": 4, "steps": [2, 4], "round": 1, "state": "training", "history": []}
    _old_job(conn, 5, "e", "pending", old, group="h")
    verdicts = [{"name": "a", "rank": 1, "of": 4, "kept": True, "reason": "r"}]
    conn.execute("INSERT INTO queue_state (key, value) VALUES ('halving:s1:1', ?)", (json.dumps(verdicts),))
    conn.execute("INSERT INTO queue_state (key, value) VALUES ('pause_after_failures', '3')")
    conn.close()

    with Store.open(db) as store:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == 6
        jobs = {j.name: j for j in store.jobs()}
        a, b, c, d, e = (jobs[n].halving for n in "abcde")
        assert a is not None and (a.sweep, a.round, a.state, a.eval_loss, a.history) == ("s1", 2, WAITING, 0.5,
                                                                                          tuple(kept))
        assert jobs["a"].not_before == 0 and jobs["a"].status == PENDING
        assert b is not None and (b.round, b.state) == (2, TRAINING)
        assert c is not None and (c.state, c.why) == (PRUNED, "halving: pruned c") and c.history[0]["rank"] == 3
        assert d is not None and (d.state, d.why) == (TRAINING, "halving: failed d")
        assert e is not None and (e.sweep, e.round, e.state, e.plan.steps) == ("h", 1, TRAINING, (2, 4))
        assert a.plan.budget == 8 and a.as_json()["steps"] == steps and a.as_json()["round"] == 2
        # the plan stays in the stored JSON; where the job stands does not
        assert set(jobs["a"].spec.doc["halving"]) == {"configs", "budget", "steps", "sweep"}
        assert store.conn.execute("SELECT key FROM queue_state WHERE key LIKE 'halving:%'").fetchall() == []
        assert json.loads(store.conn.execute("SELECT verdicts FROM halving_rounds WHERE sweep = 's1' AND round = 1")
                          .fetchone()[0]) == verdicts
        assert store.queue_state().pause_after_failures == 3  # the rest of queue_state is untouched

        assert store.decide_rounds() == 0  # round 1 was decided before the upgrade: never again
        assert store.claim(W, lease_s=60).job.name == "e"  # type: ignore[union-attr]  # a waits for b; b is running
        assert store.claim(W, lease_s=60) is None
        # b (running under an older loraq's lease) ends round 2: decided now, a goes on to the last round
        epoch = store.job("b").epoch
        assert store.end_round(2, epoch, steps=4, eval_loss=2.0)
        after = {j.name: j for j in store.jobs()}
        assert after["b"].status == CANCELLED and after["b"].halving and after["b"].halving.state == PRUNED
        final = after["a"].halving
        assert final is not None and (final.round, final.state) == (3, TRAINING)
        assert [h["round"] for h in final.history] == [1, 2] and after["a"].spec.settings.training["max_steps"] == 8
        assert after["d"].status == FAILED


def test_a_reader_of_a_schema_5_home_upgrades_it_once(tmp_path: Path) -> None:
    db = tmp_path / "loraq.db"
    conn = _store_at_schema_5(db)
    _old_job(conn, 1, "a", "pending", {"configs": 2, "budget": 4, "steps": [2, 4], "round": 1, "state": "waiting",
                                       "eval_loss": 1.5, "sweep": "s"}, group="g", not_before=HELD)
    conn.close()
    with Store.open(db, readonly=True) as store:
        job = store.job("a")
        assert job.halving is not None and (job.halving.state, job.halving.eval_loss) == (WAITING, 1.5)
        assert job.not_before == 0


def test_retried_out_of_the_rounds_trains_to_the_budget(tmp_path: Path) -> None:
    with Store.open(tmp_path / "loraq.db") as store:
        plan = halving.plan(2, 4)
        store.enqueue([NewJob(name=n, spec={"spec": {"name": n, "group": "g", "training": {"max_steps": 2}},
                                            "halving": plan}, base_key="b", max_retries=0) for n in ("a", "b")])
        claims = {c.job.name: c for c in (store.claim(W, lease_s=60) for _ in range(2)) if c is not None}
        assert store.end_round(claims["a"].job.id, claims["a"].epoch, steps=2, eval_loss=2.0)
        assert store.end_round(claims["b"].job.id, claims["b"].epoch, steps=2, eval_loss=1.0)
        assert store.job("a").status == CANCELLED
        retried = store.retry("a")
        assert retried.halving is not None and retried.halving.state == RETRIED and retried.status == PENDING
        assert retried.spec.settings.training["max_steps"] == 4
        claim = store.claim(W, lease_s=60)
        assert claim is not None and claim.job.status == RUNNING and not claim.job.halving.is_round_end  # type: ignore[union-attr]


KILLER = """
import os, signal, sys
from loraq.queue import rounds
from loraq.queue.store import Store

db, when = sys.argv[1], sys.argv[2]
store = Store.open(db)
b = store.job("b")
if when == "inside":  # the decision is written, the transaction not yet committed
    record = rounds.record

    def record_then_die(*args, **kwargs):
        record(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    rounds.record = record_then_die
store.end_round(b.id, b.epoch, steps=2, eval_loss=2.0)
os.kill(os.getpid(), signal.SIGKILL)  # after the commit: nothing closes the store
"""


@pytest.mark.parametrize("when", ["inside", "after"])
def test_a_worker_killed_while_deciding_a_round_neither_loses_nor_repeats_the_decision(tmp_path: Path,
                                                                                       when: str) -> None:
    """kill -9 in the transaction that ends the last job's round: all of it or none of it is there."""
    import os
    import signal
    import subprocess
    import sys

    db = tmp_path / "loraq.db"
    with Store.open(db) as store:
        store.enqueue([NewJob(name=n, spec={"spec": {"name": n, "group": "g", "training": {"max_steps": 2}},
                                            "halving": halving.plan(2, 4)}, base_key="b") for n in ("a", "b")])
        claims = {c.job.name: c for c in (store.claim(W, lease_s=600) for _ in range(2)) if c is not None}
        assert store.end_round(claims["a"].job.id, claims["a"].epoch, steps=2, eval_loss=1.0)
    killed = subprocess.run([sys.executable, "-c", KILLER, str(db), when], capture_output=True, text=True,
                            env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    def decisions(store: Store) -> list[str]:
        return [e.reason for e in store.events() if e.reason and e.reason.startswith("halving: sweep g round 1")]

    with Store.open(db) as store:
        b = store.job("b")
        if when == "inside":  # none of it: b still runs its round, a still waits, nothing was decided
            assert b.status == RUNNING and b.halving is not None and b.halving.state == TRAINING
            assert store.job("a").halving.state == WAITING  # type: ignore[union-attr]
            assert decisions(store) == [] and store.decide_rounds() == 0
            assert store.end_round(b.id, b.epoch, steps=2, eval_loss=2.0)  # the worker's successor ends it again
        assert decisions(store) == ["halving: sweep g round 1 of 2 decided: 1. a, 2. b (pruned)"]
        assert store.decide_rounds() == 0  # made once
        after = {j.name: j for j in store.jobs()}
        assert after["a"].halving is not None and (after["a"].halving.round, after["a"].halving.state) == (2, TRAINING)
        assert after["b"].status == CANCELLED and after["b"].halving is not None and after["b"].halving.is_pruned
        assert store.conn.execute("SELECT COUNT(*) FROM halving_rounds").fetchone()[0] == 1
