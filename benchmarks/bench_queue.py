"""Queue operations at 10,000 jobs: loraq's SQLite store vs a JSON file rewritten on every update.

    .venv/bin/python benchmarks/bench_queue.py [--jobs 10000] [--sample 200]

loraq (``loraq.queue.store.Store``, the code ``loraq submit`` / ``run`` / ``status`` use;
WAL, ``synchronous=FULL``, one ``BEGIN IMMEDIATE`` transaction per operation):

- submit: the 10,000 jobs enqueued in one transaction (``loraq submit``, all or
  none), and one transaction per job (a queue file of one job at a time);
- claim + complete: every one of the 10,000 jobs claimed (lease, attempt row,
  event) and completed (fenced by its epoch), jobs on two base models, the claim
  preferring the base the trainer has loaded;
- status: ``api.status`` (every job read), and ``loraq status --json`` and
  ``loraq status`` (the table) as processes.

The naive design users glue together: a list of jobs in one JSON file, loaded and
rewritten on every update: the whole file written to a temporary file, fsync'd
and renamed over the old one (so a crash leaves the old or the new file, never
half of one), and the same without fsync (what many scripts do; not crash-safe).
Each naive operation on a 10,000-job file is timed on ``--sample`` jobs and
reported as a rate; draining all 10,000 at that rate is extrapolated, not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _bench import LORAQ, load, machine, median, quiet_env, run, table

from loraq import api
from loraq.queue.store import NewJob, Store, WorkerId
from loraq.workspace import Home


def spec(i: int) -> dict[str, Any]:
    """A job as the store keeps it (ResolvedJob.model_dump of a typical queue entry)."""
    base = f"/data/models/base-{i % 2}"
    return {
        "spec": {"name": f"job-{i:05d}", "base_model": base, "revision": None, "trust_remote_code": False,
                 "dataset": {"path": f"./data/customer-{i}.jsonl", "format": "chat"},
                 "lora": {"r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": "all-linear"},
                 "training": {"epochs": 3.0, "max_steps": None, "learning_rate": 0.0002, "batch_size": 8, "grad_accum": 1,
                              "max_seq_len": 512, "save_steps": 50, "logging_steps": 5, "eval_steps": None, "seed": 42,
                              "warmup_ratio": 0.0, "weight_decay": 0.0, "lr_scheduler": "linear", "precision": "auto"},
                 "validation": {"split": 0.05, "dataset": None, "min_eval_loss_drop": 0.0},
                 "max_retries": 2, "priority": 0},
        "queue_file": "/data/queue.yaml", "base_model": base, "dataset_path": f"/data/data/customer-{i}.jsonl",
        "eval_dataset_path": None,
    }


def base_key(i: int) -> str:
    return json.dumps([f"/data/models/base-{i % 2}", None, "auto"])


def new_jobs(n: int, start: int = 0) -> list[NewJob]:
    return [NewJob(name=f"job-{i:05d}", spec=spec(i), base_key=base_key(i), dataset_sha256="0" * 64,
                   queue_file="/data/queue.yaml") for i in range(start, start + n)]


RESULT = {"steps": 150, "train_loss": 0.91, "eval_loss": 1.02, "base_eval_loss": 2.3, "adapter": "/h/adapters/x",
          "memory": {"rss_mb": 650.0}, "versions": {"torch": "2.13.0"}}


# ---------------------------------------------------------------- the naive JSON queue


class JsonQueue:
    """Jobs in one JSON file, loaded and rewritten whole on every update."""

    def __init__(self, path: Path, *, fsync: bool) -> None:
        self.path, self.fsync = path, fsync

    def load(self) -> list[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as fh:
            return json.load(fh)  # type: ignore[no-any-return]

    def save(self, jobs: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(jobs, fh)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        if self.fsync:
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def enqueue(self, job: dict[str, Any]) -> None:
        jobs = self.load()
        jobs.append(job)
        self.save(jobs)

    def claim(self, worker: str, prefer_base: str | None) -> dict[str, Any] | None:
        jobs = self.load()
        pending = [j for j in jobs if j["status"] == "pending"]
        if not pending:
            return None
        best = min(pending, key=lambda j: (-j["priority"], j["base_key"] != prefer_base, j["id"]))
        best.update(status="running", lease_owner=worker, lease_expires=time.time() + 60, attempts=best["attempts"] + 1)
        self.save(jobs)
        return best

    def complete(self, job_id: int, result: dict[str, Any]) -> None:
        jobs = self.load()
        job = next(j for j in jobs if j["id"] == job_id)
        job.update(status="completed", result=result, finished_at=time.time(), lease_owner=None)
        self.save(jobs)


def json_job(i: int) -> dict[str, Any]:
    return {"id": i + 1, "name": f"job-{i:05d}", "status": "pending", "priority": 0, "spec": spec(i),
            "base_key": base_key(i), "attempts": 0, "lease_owner": None, "lease_expires": None, "result": None}


# ---------------------------------------------------------------- measuring


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "-"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def bench_loraq(root: Path, n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    home = Home(root / "loraq-batch")
    home.ensure()
    with Store.open(home.db_path) as store:
        jobs = new_jobs(n)
        out["submit_batch"], _ = timed(lambda: store.enqueue(jobs))
    per_job = Home(root / "loraq-per-job")
    per_job.ensure()
    with Store.open(per_job.db_path) as store:
        out["submit_each"], _ = timed(lambda: [store.enqueue([job]) for job in new_jobs(n)])

    # status of a full queue: in process, and as the commands a person types
    out["status_api"] = median([timed(lambda: api.status(home))[0] for _ in range(3)])
    env = quiet_env() | {"COLUMNS": "160"}
    out["status_json_cli"] = median([run([LORAQ, "--home", str(home.root), "status", "--json"], env=env).wall_s
                                     for _ in range(3)])
    out["status_table_cli"] = median([run([LORAQ, "--home", str(home.root), "status"], env=env).wall_s
                                      for _ in range(3)])

    worker = WorkerId.current()
    with Store.open(home.db_path) as store:
        hot: str | None = None
        claims: list[float] = []
        completes: list[float] = []
        order: list[str] = []
        for _ in range(n):
            t0 = time.perf_counter()
            claim = store.claim(worker, lease_s=60, prefer_base=hot)
            t1 = time.perf_counter()
            assert claim is not None
            hot = claim.job.base_key
            order.append(hot)
            store.complete(claim.job.id, claim.epoch, result=RESULT)
            claims.append(t1 - t0)
            completes.append(time.perf_counter() - t1)
        assert store.claim(worker, lease_s=60) is None
        assert store.counts()["completed"] == n
        out["claim"], out["complete"] = sum(claims), sum(completes)
        out["claim_first"] = sum(claims[:100]) / 100
        out["claim_last"] = sum(claims[-100:]) / 100
        out["claim_order_base_switches"] = sum(1 for a, b in zip(order, order[1:]) if a != b)
    return out


def bench_json(root: Path, n: int, sample: int, *, fsync: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    queue = JsonQueue(root / f"queue-{'fsync' if fsync else 'nofsync'}.json", fsync=fsync)
    jobs = [json_job(i) for i in range(n)]
    out["submit_batch"], _ = timed(lambda: queue.save(jobs))
    out["file_mb"] = queue.path.stat().st_size / 1e6
    out["status"] = median([timed(queue.load)[0] for _ in range(3)])
    # one more job at a time, into a file of n jobs: the per-job submit rate at this size
    out["submit_each_rate"] = sample / timed(lambda: [queue.enqueue(json_job(n + k)) for k in range(sample)])[0]
    queue.save(jobs)
    hot: str | None = None
    t_claim = t_complete = 0.0
    for _ in range(sample):
        t0 = time.perf_counter()
        job = queue.claim("bench", hot)
        t1 = time.perf_counter()
        assert job is not None
        hot = job["base_key"]
        queue.complete(job["id"], RESULT)
        t_claim += t1 - t0
        t_complete += time.perf_counter() - t1
    out["claim_rate"], out["complete_rate"] = sample / t_claim, sample / t_complete
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=50, help="naive operations timed on a 10,000-job file")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    n = args.jobs
    print(f"bench_queue: {n:,} jobs; naive JSON operations timed on {args.sample} jobs at that size")
    print(f"machine: {machine()}")
    root = Path(tempfile.mkdtemp(prefix="bench-queue-", dir=args.dir))
    try:
        lq = bench_loraq(root, n)
        js = bench_json(root, n, args.sample, fsync=True)
        jn = bench_json(root, n, args.sample, fsync=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    lq_cycle = n / (lq["claim"] + lq["complete"])
    js_cycle = 1 / (1 / js["claim_rate"] + 1 / js["complete_rate"])
    jn_cycle = 1 / (1 / jn["claim_rate"] + 1 / jn["complete_rate"])
    rows = [
        ["submit, all jobs at once (jobs/s)", rate(n, lq["submit_batch"]), rate(n, js["submit_batch"]),
         rate(n, jn["submit_batch"]), f"{js['submit_batch'] / lq['submit_batch']:.2f}x"],
        ["submit, one job per update (jobs/s)", rate(n, lq["submit_each"]), f"{js['submit_each_rate']:,.0f}",
         f"{jn['submit_each_rate']:,.0f}", f"{(n / lq['submit_each']) / js['submit_each_rate']:.1f}x"],
        ["claim (ops/s)", rate(n, lq["claim"]), f"{js['claim_rate']:,.0f}", f"{jn['claim_rate']:,.0f}",
         f"{(n / lq['claim']) / js['claim_rate']:.1f}x"],
        ["complete (ops/s)", rate(n, lq["complete"]), f"{js['complete_rate']:,.0f}", f"{jn['complete_rate']:,.0f}",
         f"{(n / lq['complete']) / js['complete_rate']:.1f}x"],
        ["claim + complete (jobs/s)", f"{lq_cycle:,.0f}", f"{js_cycle:,.0f}", f"{jn_cycle:,.0f}", f"{lq_cycle / js_cycle:.1f}x"],
        [f"drain {n:,} jobs (s)", f"{n / lq_cycle:.1f}", f"{n / js_cycle:.0f} (extrap.)", f"{n / jn_cycle:.0f} (extrap.)",
         f"{(n / js_cycle) / (n / lq_cycle):.1f}x"],
        ["status, in process (s)", f"{lq['status_api']:.3f}", f"{js['status']:.3f}", f"{jn['status']:.3f}",
         f"{js['status'] / lq['status_api']:.2f}x"],
    ]
    print()
    print(table(["operation", "loraq (SQLite)", "JSON + fsync", "JSON, no fsync", "loraq / JSON+fsync"], rows))
    print()
    print(f"  JSON file at {n:,} jobs: {js['file_mb']:.1f} MB, rewritten whole on every claim and every completion")
    print(f"  loraq claim: {lq['claim_first'] * 1e3:.2f} ms (first 100 claims, queue full) vs "
          f"{lq['claim_last'] * 1e3:.2f} ms (last 100); base switches in claim order: "
          f"{lq['claim_order_base_switches']:.0f} (jobs alternate between 2 bases)")
    print(f"  loraq status as a process ({n:,} jobs): --json {lq['status_json_cli']:.2f} s, "
          f"table {lq['status_table_cli']:.2f} s (median of 3)")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
