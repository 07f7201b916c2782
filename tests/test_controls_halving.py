"""Successive halving for a sweep (``sweep_strategy: halving``, issue 12), through the CLI on the tiny model.

The rule itself (plan and ranking) on its own; the validation at submit; then a
real run of three configurations whose learning rates differ by orders of
magnitude, so the ranking is deterministic: round 1 prunes the slowest, round 2
the next, and only the best trains the full budget, resuming from its checkpoints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import TINY_DEFAULTS, write_queue
from loraq.queue import halving, sweep
from test_controls_submit import loraq, stored
from test_controls_train import jobs


def test_the_plan_halves_the_budget_per_round_and_the_ranking_keeps_the_better_half() -> None:
    assert halving.steps_for(4, 8) == [2, 4, 8] and halving.counts(4) == [4, 2, 1]
    assert halving.steps_for(3, 8) == [2, 4, 8] and halving.counts(3) == [3, 2, 1]
    assert halving.steps_for(2, 5) == [2, 5] and halving.steps_for(5, 8) == [1, 2, 4, 8]
    assert halving.budget_problem(5, 7) is not None and halving.budget_problem(5, 8) is None

    members = [halving.Member("d", True, 1.5), halving.Member("a", True, 2.0), halving.Member("c", False, None),
               halving.Member("b", True, 1.5), halving.Member("e", True, math.nan)]
    verdicts = halving.decide(1, 3, members)
    # lower loss first; a tie by name; no finite loss, then failed or cancelled, last; ceil(5/2) = 3 go on
    assert [(v.name, v.rank, v.kept) for v in verdicts] == [
        ("b", 1, True), ("d", 2, True), ("a", 3, True), ("e", 4, False), ("c", 5, False)]
    assert verdicts[2].reason == "halving: round 1 of 3, eval loss 2.0000 ranked 3 of 5: goes on to round 2"
    assert "failed or cancelled, counted as worst" in verdicts[4].reason and "pruned" in verdicts[4].reason
    # a failed job is never kept, even where the half would reach it
    assert [v.kept for v in halving.decide(1, 2, [halving.Member("x", False, None), halving.Member("y", True, 3.0)])] \
        == [True, False]


HALVING = TINY_DEFAULTS + """
jobs:
  - name: lr
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    sweep_strategy: halving
    training: {max_steps: 8, lr_scheduler: constant}
    sweep:
      training.learning_rate: [1.0e-6, 3.0e-4, 3.0e-3]
"""


def test_halving_is_validated_at_submit_with_one_line_naming_the_field(workdir: Path) -> None:
    body = TINY_DEFAULTS + """
jobs:
  - name: one
    dataset: ./data/sql.jsonl
    sweep_strategy: halving
    sweep: {training.learning_rate: [1.0e-3]}
  - name: nosteps
    dataset: ./data/sql.jsonl
    sweep_strategy: halving
    training: {max_steps: null}
    sweep: {training.learning_rate: [1.0e-3, 2.0e-3]}
  - name: short
    dataset: ./data/sql.jsonl
    sweep_strategy: halving
    training: {max_steps: 3}
    sweep: {training.learning_rate: [1.0e-3, 2.0e-3, 3.0e-3]}
  - name: odd
    dataset: ./data/sql.jsonl
    sweep_strategy: bayes
    sweep: {training.learning_rate: [1.0e-3, 2.0e-3]}
  - name: plain
    dataset: ./data/sql.jsonl
    sweep_strategy: halving
  - name: early
    dataset: ./data/sql.jsonl
    sweep_strategy: halving
    validation: {early_stopping: {patience: 2}}
    sweep: {training.learning_rate: [1.0e-3, 2.0e-3]}
"""
    queue = write_queue(workdir, body)
    home = workdir / ".loraq"
    result = loraq(home, "submit", str(queue))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    expected = [
        "job 'one': sweep_strategy: halving needs at least 2 configurations; the sweep gives 1",
        "job 'nosteps': training.max_steps: sweep_strategy: halving needs training.max_steps",
        "job 'short': training.max_steps: sweep_strategy: halving over 3 configurations needs at least 4 steps",
        "job 'odd': sweep_strategy: must be one of grid, halving (got 'bayes')",
        "job 'plain': sweep_strategy: applies to a sweep",
        "job 'early': validation.early_stopping: cannot be combined with sweep_strategy: halving",
    ]
    for text in expected:
        assert sum(f"{queue}: {text}" in line for line in lines) == 1, (text, lines)
    assert len(lines) == len(expected), lines
    assert not home.exists()

    dry = loraq(home, "submit", str(write_queue(workdir, HALVING, name="ok.yaml")), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert ("sweep lr: 3 job(s); successive halving in 3 rounds: 3 jobs to 2 steps, then 2 jobs to 4 steps, "
            "then 1 job to 8 steps") in dry.stdout


@pytest.mark.slow
def test_halving_prunes_the_worse_half_each_round_and_the_survivors_resume_from_their_checkpoints(workdir: Path) -> None:
    home = workdir / ".loraq"
    submitted = loraq(home, "submit", str(write_queue(workdir, HALVING)))
    assert submitted.returncode == 0, submitted.stderr
    name = {lr: sweep.child_name("lr", {"training.learning_rate": lr}) for lr in (1e-6, 3e-4, 3e-3)}
    specs = stored(home)
    assert {specs[n]["spec"]["training"]["max_steps"] for n in name.values()} == {2}  # round 1's share
    assert all(specs[n]["halving"]["steps"] == [2, 4, 8] for n in name.values())

    ran = loraq(home, "run", "--devices", "cpu")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    final = jobs(home)
    slow, mid, best = final[name[1e-6]], final[name[3e-4]], final[name[3e-3]]
    assert (slow.status, mid.status, best.status) == ("cancelled", "cancelled", "completed")
    assert slow.error_kind == mid.error_kind == "halving"
    assert slow.error.startswith("halving: round 1 of 3, eval loss ") and "ranked 3 of 3: pruned" in slow.error
    assert mid.error.startswith("halving: round 2 of 3, eval loss ") and "ranked 2 of 2: pruned" in mid.error
    assert best.progress_step == 8 and best.spec.settings.training["max_steps"] == 8

    # Only the survivor is published; the pruned ones were never trained further.
    published = sorted(p.name for p in (home / "adapters").iterdir() if not p.name.startswith("."))
    assert published == [name[3e-3]]
    with_attempts = {}
    for job in (slow, mid, best):
        shown = json.loads(loraq(home, "show", job.name, "--json").stdout)
        with_attempts[job.name] = [(a["outcome"], a["resumed_from_step"], a["last_step"]) for a in shown["attempts"]]
    assert with_attempts[slow.name] == [("round", None, 2)]
    assert with_attempts[mid.name] == [("round", None, 2), ("round", 2, 4)]
    assert with_attempts[best.name] == [("round", None, 2), ("round", 2, 4), ("completed", 4, 8)]
    assert best.attempts <= 1  # rounds use no attempts
    events = [e["reason"] for e in json.loads(loraq(home, "show", best.name, "--json").stdout)["events"]]
    assert any("resumes from checkpoint step 2" in e for e in events)
    assert any("resumes from checkpoint step 4" in e for e in events)
    assert any(e.startswith("halving: round 1 of 3, eval loss ") and "ranked 1 of 3: goes on to round 2" in e
               for e in events)

    # status, show and the report say the round and why a job was pruned.
    table = loraq(home, "status").stdout
    assert "halving: round 1 of 3" in table and "ranked 3 of 3: pruned" in table
    shown = loraq(home, "show", slow.name).stdout
    assert "halving:    round 1 of 3 (pruned)" in shown and "ranked 3 of 3: pruned" in shown
    report = loraq(home, "report", "--format", "json")
    assert report.returncode == 0, report.stderr
    ranking = json.loads(report.stdout)["sweeps"]["lr"]["ranking"]
    assert [(r["name"], r["round"], r["best"]) for r in ranking] == [
        (name[3e-3], 3, True), (name[3e-4], 2, False), (name[1e-6], 1, False)]
    assert ranking[2]["pruned"] == slow.error


def test_a_round_is_decided_once_in_the_transaction_of_the_event_that_ends_it(tmp_path: Path) -> None:
    """The store's side: a failed job ends its round too (and ranks last); the decision is made once."""
    from loraq.queue.store import NewJob, Store, WorkerId

    with Store.open(tmp_path / "loraq.db") as store:
        plan = halving.plan(3, 8)
        store.enqueue([NewJob(name=n, spec={"spec": {"name": n, "group": "g", "training": {"max_steps": 2}},
                                            "halving": plan}, base_key="b", max_retries=0) for n in ("a", "b", "c")])
        worker = WorkerId("h", 1, "t")
        claims = {c.job.name: c for c in (store.claim(worker, lease_s=60) for _ in range(3)) if c is not None}
        assert store.end_round(claims["a"].job.id, claims["a"].epoch, steps=2, eval_loss=2.5)
        assert store.end_round(claims["b"].job.id, claims["b"].epoch, steps=2, eval_loss=1.5)
        assert store.claim(worker, lease_s=60) is None  # waiting jobs are held until their round is decided
        store.fail(claims["c"].job.id, claims["c"].epoch, kind="data", reason="bad row", retryable=False)
        after = {job.name: job for job in store.jobs()}
        assert after["c"].status == "failed" and "failed or cancelled, counted as worst" in after["c"].halving.why
        for name in ("a", "b"):  # ceil(3 / 2) = 2 go on, each to round 2's share
            assert after[name].status == "pending" and after[name].not_before == 0
            assert after[name].halving.round == 2 and after[name].spec.settings.training["max_steps"] == 4
        assert [h["rank"] for h in after["b"].halving.history] == [1]
        assert store.decide_rounds() == 0  # already decided: never twice
        decided = [e.reason for e in store.events() if e.reason and e.reason.startswith("halving: sweep g round 1")]
        assert decided == ["halving: sweep g round 1 of 3 decided: 1. b, 2. a, 3. c (pruned)"]


def test_two_sweeps_of_one_name_never_share_a_round(tmp_path: Path) -> None:
    """Submitted again with other values, a sweep of the same name is another sweep: its rounds are its own."""
    from loraq.queue import spec as spec_module
    from loraq.queue.store import NewJob, Store, WorkerId

    def plans(values: list[float]) -> dict[str, dict]:
        raw = [{"name": "lr", "dataset": "./d.jsonl", "sweep_strategy": "halving", "training": {"max_steps": 4},
                "sweep": {"training.learning_rate": values}}]
        problems: list = []
        _, _, found = sweep.expand_jobs(raw, {}, "q.yaml", problems, schema=spec_module.JobSpec)
        assert not problems, problems
        return found

    first, second = plans([1e-3, 2e-3]), plans([3e-3, 4e-3])
    assert len({p["sweep"] for p in first.values()}) == 1 and len({p["sweep"] for p in second.values()}) == 1
    assert {p["sweep"] for p in first.values()} != {p["sweep"] for p in second.values()}
    assert plans([2e-3, 1e-3]) == first  # the same sweep again: the same id

    with Store.open(tmp_path / "loraq.db") as store:
        worker = WorkerId("h", 1, "t")
        for batch in (first, second):
            store.enqueue([NewJob(name=n, spec={"spec": {"name": n, "group": "lr", "training": {"max_steps": 2}},
                                                "halving": plan}, base_key="b", max_retries=0)
                           for n, plan in batch.items()])
        claims = {c.job.name: c for c in (store.claim(worker, lease_s=60) for _ in range(4)) if c is not None}
        for loss, name in enumerate(first, start=1):  # the first sweep ends its round 1
            assert store.end_round(claims[name].job.id, claims[name].epoch, steps=2, eval_loss=float(loss))
        after = {job.name: job for job in store.jobs()}
        kept = [n for n in first if after[n].status == "pending" and after[n].halving.round == 2]
        assert len(kept) == 1 and sum(after[n].status == "cancelled" for n in first) == 1
        # the second sweep's round 1 is still going on: it was not decided with the first one's
        assert all(after[n].status == "running" for n in second)
        for loss, name in enumerate(second, start=1):
            assert store.end_round(claims[name].job.id, claims[name].epoch, steps=2, eval_loss=float(loss))
        after = {job.name: job for job in store.jobs()}
        assert sum(after[n].status == "cancelled" for n in second) == 1
        assert not any("decided while this job was not in it" in (after[n].error or "") for n in second)
