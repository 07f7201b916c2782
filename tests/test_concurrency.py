"""Several processes on one home: two workers, submits, status and cancel, all at once.

Every job runs once (one claim, one completion), every submit is kept, and no
user ever sees "database is locked" or a traceback.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from crashutil import (
    JOB_S,
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
    queue_file,
    wait_for,
)

pytestmark = pytest.mark.slow

QUICK = "max_steps: 6, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 3, logging_steps: 1, seed: 3"
LONG = "max_steps: 5000, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 100, eval_steps: 5000, logging_steps: 1, seed: 3"


def test_two_workers_concurrent_submits_status_and_cancel_run_every_job_once(
        tmp_path: Path, tiny_model: Path, demo_datasets: dict[str, Path]) -> None:
    work = make_workdir(tmp_path / "project", tiny_model, demo_datasets)
    home = work / ".loraq"
    first = queue_file(work, ["start-a", "start-b"], training=QUICK, name="start.yaml")
    first.write_text(first.read_text() + f"  - name: slowpoke\n    dataset: ./data/sql.jsonl\n    priority: -5\n"
                     f"    training: {{{LONG}}}\n")
    loraq(home, "submit", str(first))
    workers = [Worker(home, "--wait", "--lease", "10", log=tmp_path / f"worker-{i}.log") for i in range(2)]

    results: list[tuple[str, object]] = []
    stop = threading.Event()

    def submits(tag: str) -> None:
        for i in range(2):
            names = [f"{tag}-{i}-a", f"{tag}-{i}-b"]
            path = queue_file(work, names, training=QUICK, name=f"{tag}-{i}.yaml")
            results.append(("submit", loraq(home, "submit", str(path), check=False)))

    def statuses() -> None:
        while not stop.is_set():
            results.append(("status", loraq(home, "status", "--json", check=False)))
            time.sleep(0.2)

    threads = [threading.Thread(target=submits, args=(tag,)) for tag in ("x", "y")]
    threads.append(threading.Thread(target=statuses))
    for t in threads:
        t.start()
    try:
        for t in threads[:2]:
            t.join(timeout=JOB_S)
        quick = {n for n in jobs(home) if n != "slowpoke"}
        assert len(quick) == 2 + 2 * 2 * 2
        wait_for(lambda: all(jobs(home)[n]["status"] == "completed" for n in quick), timeout=JOB_S,
                 what="every quick job to complete")
        # The low-priority long job is claimed once the rest is done; cancel it while it trains.
        wait_for(lambda: (jobs(home)["slowpoke"]["progress_step"] or 0) >= 3, timeout=STARTUP_S,
                 what="'slowpoke' to train")
        results.append(("cancel", loraq(home, "cancel", "slowpoke", check=False)))
        wait_for(lambda: not [a for a in attempts(home, "slowpoke") if a["ended_at"] is None], timeout=60,
                 what="the cancelled attempt to end")
    finally:
        stop.set()
        threads[2].join(timeout=60)
        for w in workers:
            if w.alive():
                w.signal(signal.SIGTERM)  # --wait workers run until told to stop
        codes = [w.wait(timeout=120) for w in workers]

    assert all(code in (0, 130) for code in codes), [w.output() for w in workers]
    for kind, result in results:
        assert result.returncode == 0, (kind, result.stdout, result.stderr)
        assert "locked" not in result.stderr and "Traceback" not in result.stderr, (kind, result.stderr)
        if kind == "status":
            json.loads(result.stdout)
        elif kind == "submit":
            assert "enqueued 2 job(s)" in result.stdout
    for w in workers:
        assert "locked" not in w.output() and "Traceback" not in w.output(), w.output()

    state = jobs(home)
    assert len(state) == len(quick) + 1  # every submit kept
    assert state["slowpoke"]["status"] == "cancelled"
    assert completions(home) == {n: 1 for n in quick} | {"slowpoke": 0}
    for name in state:
        claims = [e for e in events(home, name) if (e["from_state"], e["to_state"]) == ("pending", "running")]
        assert len(claims) == 1, (name, claims)  # claimed exactly once: no double claim, nothing retried
        assert len(attempts(home, name)) == 1
    check_published(home, quick)
    assert integrity(home) == "ok"
    statuses_seen = sum(1 for kind, _ in results if kind == "status")
    by_worker = {a["worker"].rsplit(":", 1)[0] for a in attempts(home)}
    print(f"\nconcurrency: {len(state)} jobs, 4 concurrent submits, {statuses_seen} status calls, "
          f"jobs spread over {len(by_worker)} worker(s)")
