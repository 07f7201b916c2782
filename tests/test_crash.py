"""The queue's promise, proved with real processes: kill -9, SIGSTOP, SIGINT/SIGTERM.

No job is lost, none is completed twice, no half-written adapter is ever visible,
and a retried job continues from its newest complete checkpoint, not from step 0.
Every test here runs ``loraq`` as an operator would (the CLI, real trainer
processes, real signals) and judges the result from the outside (``loraq.db``,
the files in the home, the inspector).

The chaos test prints its figures (``pytest -s``) and, with
``LORAQ_RELIABILITY_OUT=DIR``, writes them to ``DIR/chaos.json`` for
docs/reliability.md. ``LORAQ_CHAOS_SEED`` and ``LORAQ_CHAOS_ROUNDS`` change the run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from crashutil import (
    STARTUP_S,
    Worker,
    attempts,
    check_published,
    completions,
    events,
    integrity,
    jobs,
    loraq,
    make_workdir,
    query,
    queue_file,
    wait_for,
    wait_gone,
)
from loraq import fsutil

pytestmark = pytest.mark.slow

#: Long enough to be killed mid-training (a step takes ~0.05-0.3 s here), with a
#: checkpoint every 4 steps; eval only at the end to keep the steps cheap.
LONG = "max_steps: {steps}, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 4, eval_steps: {steps}, logging_steps: 1, seed: 3"


@pytest.fixture
def work(tmp_path: Path, tiny_model: Path, demo_datasets: dict[str, Path]) -> Path:
    return make_workdir(tmp_path / "project", tiny_model, demo_datasets)


def live_attempts(home: Path, *, trained: bool = True) -> list[dict]:
    """Attempts the store has not ended; with ``trained``, only those that have reported progress."""
    sql = "SELECT a.*, j.name FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.ended_at IS NULL"
    if trained:
        sql += " AND a.last_step IS NOT NULL"
    return query(home, sql)


def at_step(home: Path, name: str, step: int) -> dict | None:
    """The live attempt of job ``name`` once it has trained to ``step`` (not an earlier attempt's progress)."""
    rows = [a for a in live_attempts(home) if a["name"] == name and a["last_step"] >= step]
    return rows[0] if rows else None


def loss_steps(home: Path, name: str, attempt: int) -> list[int]:
    rows = query(home, """SELECT m.step FROM metrics m JOIN jobs j ON j.id = m.job_id
                          WHERE j.name = ? AND m.attempt = ? AND m.name = 'loss' ORDER BY m.step""", (name, attempt))
    return [r["step"] for r in rows]


def assert_resumes_continue(home: Path, name: str) -> list[int]:
    """Every attempt that trained after a complete checkpoint existed resumed from it (or a newer one),
    and its first training step came after that checkpoint, not from step 0. Returns the resume steps."""
    resumed, newest_saved = [], 0
    for a in attempts(home, name):
        if a["last_step"] is not None:  # it started training (the trainer reported 'started')
            if newest_saved:
                assert a["resumed_from_step"] is not None and a["resumed_from_step"] >= newest_saved, (name, a)
            if a["resumed_from_step"]:
                resumed.append(a["resumed_from_step"])
                steps = loss_steps(home, name, a["n"])
                assert not steps or steps[0] > a["resumed_from_step"], (name, a["n"], steps[:3])
        newest_saved = max(newest_saved, a["checkpoint_step"] or 0)
    return resumed


def assert_clean_home(home: Path) -> None:
    assert not [p for p in (home / "adapters").iterdir() if p.name.startswith(fsutil.TMP_PREFIX)]
    assert not list(home.glob("jobs/*/attempt-*/staging"))
    assert not list(home.glob("jobs/*/attempt-*/checkpoints"))  # completed jobs keep no checkpoints
    assert not list(home.glob("jobs/*/attempt-*/resume"))


# ---------------------------------------------------------------- chaos


def test_chaos_kill9_of_workers_and_trainers_loses_nothing_and_duplicates_nothing(work: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("LORAQ_CHAOS_SEED", "1234"))
    rounds = int(os.environ.get("LORAQ_CHAOS_ROUNDS", "14"))
    names = ["chaos-chat", "chaos-sql", "chaos-stories"]
    home = work / ".loraq"
    loraq(home, "submit", str(queue_file(work, names, training=LONG.format(steps=48), dropout=0.05, max_retries=60)))
    rng = random.Random(seed)
    kills: Counter[str] = Counter()
    started = time.monotonic()
    worker: Worker | None = None
    for number in range(rounds):
        if worker is None or not worker.alive():
            if worker is not None:
                worker.wait()
            if all(j["status"] == "completed" for j in jobs(home).values()):
                break
            # Two trainers, so kills land on more than one job at a time.
            worker = Worker(home, "--lease", "5", log=tmp_path / f"worker-{number}.log", devices="cpu,cpu")
            if rng.random() < 0.2:  # now and then while it starts: reconcile, claim, trainer start
                time.sleep(rng.uniform(0.0, 3.0))
                wait_gone(worker.kill9())
                kills["worker while starting"] += 1
                continue
        current = worker
        # Mostly a few steps into training (whatever the machine's speed), sometimes a random
        # time later (evaluation, saving, inspection, publishing, the next claim).
        steps = rng.randint(1, 10) if rng.random() < 0.75 else 0

        def training() -> list[dict] | bool:
            return [a for a in live_attempts(home) if a["last_step"] >= (a["resumed_from_step"] or 0) + steps] \
                or not current.alive()

        wait_for(training, timeout=STARTUP_S, what=f"a job to train {steps} step(s)")
        if not worker.alive():
            continue  # the queue ran out before this round's kill
        time.sleep(rng.uniform(0.0, 0.3) if steps else rng.uniform(0.0, 2.0))
        if rng.random() < 0.5:
            wait_gone(worker.kill9())
            kills["worker"] += 1
        else:
            busy = worker.busy_trainers()  # only trainers in a job: one still starting is not "training"
            if not busy or not worker.alive():
                continue
            trainer, log = rng.choice(busy)
            victim = (int(log.parent.parent.name), int(log.parent.name.split("-")[1]))  # jobs/<id>/attempt-<n>
            trainer.kill()
            kills["trainer"] += 1
            # The worker notices the death and ends that attempt before the next round picks a victim.
            wait_for(lambda: victim not in {(a["job_id"], a["n"]) for a in live_attempts(home, trained=False)}
                     or not worker.alive(), timeout=60, what=f"attempt {victim} to end after its trainer's death")
    if worker is not None and worker.alive():
        wait_gone(worker.kill9())
        kills["worker"] += 1

    final = Worker(home, "--lease", "5", log=tmp_path / "worker-final.log", devices="cpu,cpu")
    assert final.wait() == 0, final.output()

    state = jobs(home)
    assert {n: state[n]["status"] for n in names} == {n: "completed" for n in names}
    assert completions(home) == {n: 1 for n in names}  # one completion event each: none lost, none twice
    assert integrity(home) == "ok"
    check_published(home, set(names))
    assert_clean_home(home)
    resumed = {n: assert_resumes_continue(home, n) for n in names}
    all_attempts = attempts(home)
    for a in all_attempts:
        if a["outcome"] == "retry":  # every failed attempt says which and why
            assert a["error_kind"] in ("died", "lost") and a["reason"] and a["retryable"] == 1, a
        if a["last_step"] is not None:  # each attempt has its own log, kept after the retry
            log = home / "jobs" / str(a["job_id"]) / f"attempt-{a['n']}" / "train.log"
            assert f"attempt {a['n']}:" in log.read_text(), log
    for n in names:
        shown = json.loads(loraq(home, "show", n, "--json").stdout)
        assert [x["n"] for x in shown["attempts"]] == [a["n"] for a in all_attempts if a["name"] == n]
        first = next((a for a in all_attempts if a["name"] == n and a["last_step"] is not None), None)
        if first is not None and first["outcome"] != "completed":  # an earlier attempt's log, after the retries
            assert f"attempt {first['n']}:" in loraq(home, "logs", n, "--attempt", str(first["n"])).stdout
    assert sum(kills.values()) >= rounds // 2, kills
    assert sum(len(r) for r in resumed.values()) >= 1, "no attempt resumed from a checkpoint"
    summary = {
        "seed": seed, "rounds": rounds, "jobs": len(names), "kills": dict(kills), "kills_total": sum(kills.values()),
        "attempts": len(all_attempts), "attempts_resumed_from_checkpoint": sum(len(r) for r in resumed.values()),
        "resume_steps": resumed, "jobs_lost": 0, "jobs_completed_twice": 0, "integrity_check": integrity(home),
        "adapters_valid": len(names), "seconds": round(time.monotonic() - started, 1),
    }
    print("\nchaos summary: " + json.dumps(summary))
    if os.environ.get("LORAQ_RELIABILITY_OUT"):
        out = Path(os.environ["LORAQ_RELIABILITY_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "chaos.json").write_text(json.dumps(summary, indent=2) + "\n")


# ---------------------------------------------------------------- resume is exact


def test_a_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(work: Path, tmp_path: Path) -> None:
    """Two identical jobs (same data, seed, dropout > 0 so the RNG state must be restored too):
    one runs through; the other loses its trainer to kill -9, then its worker, and resumes twice."""
    import torch
    from safetensors.torch import load_file

    home = work / ".loraq"
    queue = work / "queue.yaml"
    queue.write_text(f"""\
defaults:
  base_model: ./models/tiny
  lora: {{r: 4, alpha: 8, dropout: 0.1, target_modules: [q_proj, v_proj]}}
  training: {{{LONG.format(steps=40)}}}
  validation: {{split: 0.1}}
retry_backoff_s: 0
jobs:
  - name: straight
    dataset: ./data/support.jsonl
  - name: interrupted
    dataset: ./data/support.jsonl
""")
    loraq(home, "submit", str(queue))
    worker = Worker(home, "--lease", "5", log=tmp_path / "w1.log")
    # 1. kill -9 the trainer once a checkpoint exists (stopped first, so the step we see is where it dies)
    wait_for(lambda: at_step(home, "interrupted", 10), timeout=STARTUP_S, what="'interrupted' to reach step 10")
    (trainer,) = worker.trainers()
    trainer.suspend()
    trainer.kill()
    wait_for(lambda: (at_step(home, "interrupted", 22) or {}).get("n") == 2,
             timeout=STARTUP_S, what="attempt 2 to train past step 22")
    # 2. kill -9 the worker (its trainer dies with it); a new worker takes over at once (same host)
    for t in worker.trainers():
        t.suspend()
    wait_gone(worker.kill9())
    worker = Worker(home, "--lease", "5", log=tmp_path / "w2.log")
    assert worker.wait() == 0, worker.output()

    tries = attempts(home, "interrupted")
    assert [a["outcome"] for a in tries] == ["retry", "retry", "completed"], tries
    assert [a["error_kind"] for a in tries[:2]] == ["died", "lost"]
    assert 8 <= tries[1]["resumed_from_step"] and 20 <= tries[2]["resumed_from_step"], tries
    assert_resumes_continue(home, "interrupted")
    a = load_file(home / "adapters" / "straight" / "adapter_model.safetensors")
    b = load_file(home / "adapters" / "interrupted" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), (key, (a[key] - b[key]).abs().max())
    largest = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\nresume: resumed from steps {[t['resumed_from_step'] for t in tries[1:]]}; "
          f"largest weight difference to the uninterrupted run {largest:g}")
    assert jobs(home)["straight"]["eval_loss"] == pytest.approx(jobs(home)["interrupted"]["eval_loss"], abs=1e-6)


# ---------------------------------------------------------------- a stale owner


def test_a_worker_stopped_past_its_lease_cannot_heartbeat_write_or_complete(work: Path, tmp_path: Path) -> None:
    home = work / ".loraq"
    loraq(home, "submit", str(queue_file(work, ["contested"], training=LONG.format(steps=40))))
    a = Worker(home, "--lease", "5", log=tmp_path / "a.log")
    wait_for(lambda: at_step(home, "contested", 6), timeout=STARTUP_S, what="A to train past a checkpoint")
    a.freeze(home)  # A freezes (a VM pause, a debugger); its trainer goes on and finishes
    try:
        log = home / "jobs" / "1" / "attempt-1" / "train.log"
        wait_for(lambda: "done:" in log.read_text(), timeout=120, what="A's trainer to finish training")
        metrics_of_a = query(home, "SELECT COUNT(*) AS n FROM metrics WHERE attempt = 1")[0]["n"]
        b = Worker(home, "--lease", "5", log=tmp_path / "b.log")
        assert b.wait() == 0, b.output()
        assert completions(home) == {"contested": 1}
        published = (home / "adapters" / "contested" / "loraq-manifest.json").read_text()
    finally:
        a.signal(signal.SIGCONT)
    assert a.wait() == 0, a.output()  # it wakes up, finds the job taken over, publishes nothing
    assert "lost" in a.output()

    assert completions(home) == {"contested": 1}
    check_published(home, {"contested"})
    assert (home / "adapters" / "contested" / "loraq-manifest.json").read_text() == published
    manifest = json.loads(published)
    assert manifest["attempt"] == 2  # B's
    tries = attempts(home, "contested")
    assert [(t["outcome"], t["error_kind"]) for t in tries] == [("retry", "lost"), ("completed", None)]
    assert "expired" in tries[0]["reason"]
    # A's late progress, metrics and checkpoint notes were refused: nothing of attempt 1 changed after the freeze.
    assert query(home, "SELECT COUNT(*) AS n FROM metrics WHERE attempt = 1")[0]["n"] == metrics_of_a
    moves = [(e["from_state"], e["to_state"]) for e in events(home, "contested") if e["from_state"] != e["to_state"]]
    assert moves == [(None, "pending"), ("pending", "running"), ("running", "pending"), ("pending", "running"),
                     ("running", "completed")]
    assert integrity(home) == "ok"
    assert_clean_home(home)


# ---------------------------------------------------------------- graceful stop, stop at once, stall


def test_signals_stop_gracefully_then_at_once_and_a_stalled_trainer_is_replaced(work: Path, tmp_path: Path) -> None:
    home = work / ".loraq"
    loraq(home, "submit", str(queue_file(work, ["first", "second"], training=LONG.format(steps=40))))

    # 1. SIGINT: the trainer checkpoints where it is and stops; the job goes back without using an attempt.
    w = Worker(home, "--lease", "30", log=tmp_path / "w1.log")
    wait_for(lambda: at_step(home, "first", 6), timeout=STARTUP_S, what="'first' to train")
    trainers = [p.pid for p in w.trainers()]
    w.signal(signal.SIGINT)
    assert w.wait(timeout=120) == 130, w.output()
    wait_gone(trainers)
    state = jobs(home)
    assert (state["first"]["status"], state["first"]["attempts"]) == ("pending", 0)
    assert (state["second"]["status"], state["second"]["attempts"]) == ("pending", 0)  # not claimed after the signal
    (stop,) = attempts(home, "first")
    assert (stop["outcome"], stop["counted"], stop["reason"]) == ("stopped", 0, "graceful stop")
    assert stop["checkpoint_step"] == stop["last_step"] >= 6  # saved exactly where it stopped
    assert "checkpoint and stop" in w.output() and "no attempt used" in w.output()

    # 2. SIGTERM twice, with the trainer frozen so it cannot stop by itself: the second stops at once.
    w = Worker(home, "--lease", "30", log=tmp_path / "w2.log")
    wait_for(lambda: at_step(home, "first", stop["last_step"] + 2), timeout=STARTUP_S, what="'first' to resume")
    (trainer,) = w.trainers()
    trainer.suspend()
    w.signal(signal.SIGTERM)
    time.sleep(1.0)
    assert w.alive()  # waiting for the trainer's checkpoint
    w.signal(signal.SIGTERM)
    assert w.wait(timeout=60) == 130, w.output()
    wait_gone([trainer.pid])
    tries = attempts(home, "first")
    assert [(t["outcome"], t["counted"]) for t in tries] == [("stopped", 0), ("stopped", 0)]
    assert tries[1]["reason"] == "stopped at once" and tries[1]["resumed_from_step"] == stop["last_step"]
    assert jobs(home)["first"]["attempts"] == 0

    # 3. A trainer that stops making progress (frozen) is killed by the watchdog; the job is retried,
    #    counted, resumes from its checkpoint, and the queue finishes.
    w = Worker(home, "--lease", "30", "--stall-timeout", "5", log=tmp_path / "w3.log")
    wait_for(lambda: at_step(home, "first", stop["last_step"] + 2), timeout=STARTUP_S, what="'first' to resume")
    (trainer,) = w.trainers()
    trainer.suspend()
    assert w.wait() == 0, w.output()
    tries = attempts(home, "first")
    assert [t["outcome"] for t in tries] == ["stopped", "stopped", "retry", "completed"]
    assert tries[2]["error_kind"] == "stalled" and "no progress for 5 s" in tries[2]["reason"]
    assert tries[3]["resumed_from_step"] >= stop["last_step"]
    assert jobs(home)["first"]["attempts"] == 2  # the stall counted, the stops did not
    assert_resumes_continue(home, "first")
    assert completions(home) == {"first": 1, "second": 1}
    check_published(home, {"first", "second"})
    assert_clean_home(home)
    shown = loraq(home, "show", "first").stdout
    assert "#1 stopped (not counted)" in shown and "stalled: no progress" in shown and "(retryable)" in shown
