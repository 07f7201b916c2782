"""``loraq serve`` at scale: the queue page of a big home, and what one live update costs.

    .venv/bin/python benchmarks/bench_serve.py [--sizes 100,1000,10000] [--repeat 15]

For homes of each size (a third of the jobs completed with results and 20 metric
points each, a few failed, the rest pending; every fourth job in one of 10 sweeps):

- **the queue page**, server side: the ASGI app answering ``GET /`` in-process
  (Starlette's TestClient: routing, the read-only store, the page's queries, Jinja),
  for the first page, the last page, a status filter and a sweep filter; beside it, reading
  and rendering every job at once (what a page without pagination would do);
- **a job's page** (a job with 500 metric points);
- **a live update**: the feed's poll when ``k`` jobs changed (1, 10, 50), the changed
  rows rendered as the pages receive them, in wall time and in SQLite
  virtual-machine steps (a count of work, not of time), beside
  re-reading every job's listing row, which a feed without ``seq`` would need;
- **the writers' cost of seq**: claim, 5 progress updates and complete per job,
  with and without migration 3's triggers.

Goals (issue 14): the queue page of 10,000 jobs under a second server-side; a live
update's work in proportion to the jobs that changed, not to the jobs in the home.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _bench import load, machine, median, table

from loraq import api
from loraq.queue.store import NewJob, Store, WorkerId
from loraq.workspace import Home

TOKEN = "bench"


def fill(home: Home, n: int) -> None:
    home.ensure()
    with Store.open(home.db_path) as store:
        store.enqueue([NewJob(name=f"adapter-{i:05d}", base_key="b", spec={
            "name": f"adapter-{i:05d}", "base_model": "/m", "dataset_path": f"/d/{i}.jsonl", "dataset_rows": 120,
            "spec": {"lora": {"r": 8}, "training": {"max_steps": 20}, **({"group": f"sweep-{i % 10}"} if i % 4 == 0 else {})},
        }) for i in range(n)])
        worker = WorkerId.current()
        with store.transaction() as conn:  # results and metrics written directly: faster than n worker round trips
            now = time.time()
            done = list(range(1, n // 3 + 1))
            conn.executemany(
                "UPDATE jobs SET status = 'completed', attempts = 1, progress_step = 20, progress_total = 20, "
                "train_loss = 0.9, eval_loss = 1.1, base_eval_loss = 2.3, verdict = 'pass', result = ?, "
                "started_at = ?, finished_at = ? WHERE id = ?",
                [(f'{{"adapter": "/h/adapters/{i}", "eval_loss": 1.1}}', now - 60, now, i) for i in done])
            conn.executemany("INSERT INTO metrics (job_id, attempt, step, name, value, ts) VALUES (?, 1, ?, 'loss', ?, ?)",
                             [(i, s, 2.0 - s / 20, now) for i in done for s in range(1, 21)])
        for _ in range(3):
            claim = store.claim(worker, lease_s=60)
            assert claim is not None
            store.fail(claim.job.id, claim.epoch, kind="data", reason="row 3: no assistant turn", retryable=False)
        claim = store.claim(worker, lease_s=60)  # one job with a long curve, for the job page
        assert claim is not None
        with store.transaction() as conn:
            conn.executemany("INSERT INTO metrics (job_id, attempt, step, name, value, ts) VALUES (?, 1, ?, 'loss', ?, ?)",
                             [(claim.job.id, s, 2.0 - s / 500, time.time()) for s in range(1, 501)])
        store.record_progress(claim.job.id, claim.epoch, claim.attempt, step=500, total=1000, metrics={"loss": 1.0})


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return median(samples)


def page_times(home: Home, repeat: int) -> dict[str, float]:
    from starlette.testclient import TestClient

    from loraq.serve import Settings, create_app
    from loraq.serve.render import Renderer

    app = create_app(Settings(home=home, token=TOKEN, poll_s=3600))
    running = api.status(home).jobs  # every job (the running one is the one with a long curve)
    long_job = next(j.id for j in running if j.status == "running")
    out = {}
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        client.get(f"/?token={TOKEN}")

        def get(path: str) -> Callable[[], object]:
            def call() -> object:
                response = client.get(path)
                assert response.status_code == 200, (path, response.status_code)
                return response
            return call

        out["GET / (page 1)"] = timed(get("/"), repeat)
        out["GET /?page=N (the last)"] = timed(get(f"/?page={-(-len(running) // 100)}"), repeat)
        out["GET /?status=pending"] = timed(get("/?status=pending"), repeat)
        out["GET /?group=sweep-3"] = timed(get("/?group=sweep-3"), repeat)
        out["GET /jobs/ID (500 points)"] = timed(get(f"/jobs/{long_job}"), repeat)
    renderer = Renderer(TOKEN, home.root)

    def everything() -> object:
        return "".join(renderer.row(row) for row in api.status(home).jobs)

    out["every job, unpaginated"] = timed(everything, max(3, repeat // 3))
    return out


class Steps:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.n = 0
        conn.set_progress_handler(self._tick, 1)

    def _tick(self) -> int:
        self.n += 1
        return 0


def update_costs(home: Home, changed: list[int], repeat: int) -> dict[str, tuple[float, int]]:
    """The feed's poll after ``k`` jobs made progress, for each ``k``; and a full re-read of every job."""
    from loraq.serve.feed import Feed
    from loraq.serve.render import Renderer

    renderer = Renderer(TOKEN, home.root)  # as the app does: each update rendered once, for every page
    feed = Feed(home, prepare=lambda c: renderer.queue_update(c.seq, c.rows, c.counts, c.groups, c.queue))
    feed.poll()
    assert feed._store is not None
    steps = Steps(feed._store.conn)
    out: dict[str, tuple[float, int]] = {}
    with Store.open(home.db_path) as writer:
        worker = WorkerId.current()
        claims = []
        for _ in range(max(changed)):
            claim = writer.claim(worker, lease_s=3600)
            assert claim is not None
            claims.append(claim)
        feed.poll()
        step = 0
        for k in changed:
            walls, counts = [], []
            for _ in range(repeat):
                step += 1
                with writer.transaction() as conn:  # k jobs' progress in one commit (the trigger gives each a seq)
                    for claim in claims[:k]:
                        conn.execute("UPDATE jobs SET progress_step = ?, updated_at = ? WHERE id = ?",
                                     (step, time.time(), claim.job.id))
                steps.n = 0
                t0 = time.perf_counter()
                change = feed.poll()
                walls.append(time.perf_counter() - t0)
                counts.append(steps.n)
                assert change is not None and len(change.rows) == k, (k, change and len(change.rows))
            out[f"poll, {k} changed"] = (median(walls), int(median(counts)))
    walls, counts = [], []
    store = feed._store
    for _ in range(max(3, repeat // 3)):
        steps.n = 0
        t0 = time.perf_counter()
        store.listing()
        walls.append(time.perf_counter() - t0)
        counts.append(steps.n)
    out["re-read every job"] = (median(walls), int(median(counts)))
    feed.stop()
    return out


def writer_cost(root: Path, n: int = 200, rounds: int = 5) -> dict[bool, tuple[float, int]]:
    """Per job (claim, 5 progress updates, complete), with the seq triggers and without: the median wall
    seconds over alternating rounds (an fsync on every commit: the disk's load decides much of it) and
    SQLite VM steps (the work itself, the same from run to run)."""
    samples: dict[bool, list[float]] = {True: [], False: []}
    steps: dict[bool, int] = {}
    for r in range(rounds):
        for triggers in ((True, False) if r % 2 == 0 else (False, True)):
            path = root / f"writer-{r}-{triggers}.db"
            with Store.open(path) as store:
                if not triggers:
                    store.conn.execute("DROP TRIGGER jobs_seq_insert")
                    store.conn.execute("DROP TRIGGER jobs_seq_update")
                store.enqueue([NewJob(name=f"j{i}", spec={"spec": {}}, base_key="b") for i in range(n)])
                counted = Steps(store.conn)
                worker = WorkerId.current()
                t0 = time.perf_counter()
                for _ in range(n):
                    claim = store.claim(worker, lease_s=60)
                    assert claim is not None
                    for step in range(1, 6):
                        store.record_progress(claim.job.id, claim.epoch, claim.attempt, step=step, total=5,
                                              metrics={"loss": 1.0 / step})
                    store.complete(claim.job.id, claim.epoch, result={"eval_loss": 1.0})
                samples[triggers].append((time.perf_counter() - t0) / n)
                steps[triggers] = counted.n // n
    return {t: (median(samples[t]), steps[t]) for t in (True, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"bench_serve: homes of {', '.join(f'{n:,}' for n in sizes)} jobs; medians of {args.repeat}")
    print(f"machine: {machine()}; SQLite {sqlite3.sqlite_version}")
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    pages: dict[int, dict[str, float]] = {}
    updates: dict[int, dict[str, tuple[float, int]]] = {}
    try:
        for n in sizes:
            home = Home(root / f"home-{n}")
            fill(home, n)
            pages[n] = page_times(home, args.repeat)
            updates[n] = update_costs(home, [1, 10, 50], args.repeat)
        writers = writer_cost(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    print("server-side answer, milliseconds (median)")
    names = list(pages[sizes[0]])
    print(table(["request"] + [f"{n:,} jobs" for n in sizes],
                [[name] + [f"{pages[n][name] * 1000:.1f}" for n in sizes] for name in names]))
    print()
    print("a live update: wall milliseconds / SQLite VM steps (median)")
    names = list(updates[sizes[0]])
    print(table(["feed"] + [f"{n:,} jobs" for n in sizes],
                [[name] + [f"{updates[n][name][0] * 1000:.2f} / {updates[n][name][1]:,}" for n in sizes]
                 for name in names]))
    big, small = sizes[-1], sizes[0]
    one_big, one_small = updates[big]["poll, 1 changed"][1], updates[small]["poll, 1 changed"][1]
    print()
    print(f"one changed job: {one_big:,} VM steps at {big:,} jobs vs {one_small:,} at {small:,} "
          f"({one_big / one_small:.2f}x for {big // small}x the jobs); a full re-read at {big:,} jobs: "
          f"{updates[big]['re-read every job'][1]:,} steps ({updates[big]['re-read every job'][1] / one_big:.0f}x)")
    first = pages[big]["GET / (page 1)"]
    print(f"queue page of {big:,} jobs: {first * 1000:.0f} ms server-side (goal under 1 s: "
          f"{'met' if first < 1 else 'MISSED'}); every job unpaginated {pages[big]['every job, unpaginated']:.2f} s")
    (with_s, with_steps), (without_s, without_steps) = writers[True], writers[False]
    print(f"writers, a job (claim + 5 progress updates + complete): with the seq triggers {with_steps:,} VM steps and "
          f"{with_s * 1000:.1f} ms, without {without_steps:,} steps and {without_s * 1000:.1f} ms "
          f"({with_steps / without_steps:.2f}x the steps; the wall time is mostly the fsync of each commit)")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
