"""The Ray executor's overhead per job, against the local executor, on the same small queue.

    .venv/bin/python benchmarks/bench_ray.py [--jobs 6] [--steps 20] [--save-steps 10] [--size tiny] [--rounds 2]

Each round works one queue of ``2 × --jobs`` jobs on one trainer slot, once with
``--executor local`` (a trainer process) and once with ``--executor ray`` (a Ray
actor on a local Ray instance that the executor starts and stops itself), through
the same ``Worker`` that ``loraq run`` uses. Every job trains ``--steps`` steps
and saves a checkpoint every ``--save-steps`` steps; under Ray every checkpoint
and every adapter is shipped back to the home as bytes, the train log travels on
the events, and the dataset is sent with the job.

Reported per executor:

- cold: from the start of the run to the first job completed (Ray: starting the
  local instance, placing the actor, importing torch in it; local: spawning the
  trainer process);
- warm per job: the time per job over the second half of the queue, once the
  trainer is warm and the base model resident: ``(t_last - t_mid) / jobs``, where
  ``t_mid`` is when job ``--jobs`` completed. This is what the executor adds to
  each job in steady state: claim, submit, event streaming, file shipping,
  inspection and publishing, around the same training;
- of that, the time in the trainer (``run_job``, the result's ``job_s``) and the
  time outside it: the executor's and the worker's share.

Both executors get the same torch threads (``OMP_NUM_THREADS``, default 1), so
the comparison is of the executors, not of thread counts. (With more threads than
free cores, OpenMP's barriers make a CPU step many times slower, and more so in a
process's main thread, where the local trainer trains, than in the worker thread
of a threaded Ray actor: on a loaded two-core machine 0.47 s against 0.05 s a
step; one thread each, 0.031 s and 0.033 s.) Times are wall clock and noisy on a
shared machine; the ratio is measured within one round.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUEUE_HEAD = """\
defaults:
  base_model: ./models/base
  lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}}
  training: {{max_steps: {steps}, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: {save_steps}, logging_steps: 1, seed: 3}}
  validation: {{split: 0.1}}
retry_backoff_s: 0
jobs:
"""


def prepare(root: Path, size: str) -> None:
    from loraq import demo

    demo.build_model(root / "models" / "base", size=size, pretrain_steps=50)
    rng = random.Random(1)
    (root / "data").mkdir()
    for _key, (name, make) in demo.DATASETS.items():
        demo.write_jsonl(root / "data" / name, make(120, rng))


def run_once(root: Path, executor: str, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    from loraq import api
    from loraq.supervisor.worker import Worker, WorkerConfig
    from loraq.workspace import Home

    datasets = sorted(p.name for p in (root / "data").iterdir())
    body = QUEUE_HEAD.format(steps=args.steps, save_steps=args.save_steps) + "".join(
        f"  - name: job-{i:02d}\n    dataset: ./data/{datasets[i % len(datasets)]}\n" for i in range(2 * args.jobs))
    queue = root / f"queue-{tag}.yaml"
    queue.write_text(body, encoding="utf-8")
    home = Home(root / f"home-{tag}")
    api.submit(queue, home=home)

    done: list[float] = []

    def observer(event: api.RunEvent) -> None:
        if isinstance(event, api.Completed):
            done.append(time.perf_counter())
        elif isinstance(event, api.JobFailed):
            raise SystemExit(f"{tag}: job {event.name} failed: {event.reason}")

    t0 = time.perf_counter()
    ex = api.make_executor(home, api.RunOptions(executor=executor, devices="cpu"))
    with api.open_store(home, check=True) as store:
        summary = Worker(home, store, ex, observer=observer, config=WorkerConfig(heartbeat_s=2.0, poll_s=0.05)).run()
    total = time.perf_counter() - t0
    if len(summary.completed) != 2 * args.jobs:
        raise SystemExit(f"{tag}: only {len(summary.completed)} of {2 * args.jobs} jobs completed")
    with api.open_store(home, create=False) as store:
        measured = sorted(store.jobs(), key=lambda j: j.finished_at or 0)[args.jobs:]
        in_trainer = [j.result.get("job_s") for j in measured if (j.result or {}).get("job_s") is not None]
    per_job = (done[-1] - done[args.jobs - 1]) / args.jobs
    trainer_s = statistics.mean(in_trainer) if len(in_trainer) == len(measured) else float("nan")
    return {"cold_s": done[0] - t0, "warm_per_job_s": per_job, "trainer_s": trainer_s,
            "outside_s": per_job - trainer_s, "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6, help="jobs per half of the queue (warm-up, then measured)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both executors")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    for key, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)

    import ray

    print(f"# bench_ray: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, ray {ray.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"# {2 * args.jobs} jobs a run ({args.jobs} warm-up + {args.jobs} measured), {args.size} model, "
          f"{args.steps} steps, a checkpoint every {args.save_steps}; one slot; OMP_NUM_THREADS={args.threads}")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        root = Path(tmp)
        prepare(root, args.size)
        rows = []
        for r in range(args.rounds):
            for executor in ("local", "ray"):
                result = run_once(root, executor, args, f"{executor}-{r}")
                rows.append((r, executor, result))
                print(f"round {r} {executor:5s}  cold {result['cold_s']:6.2f} s   warm per job {result['warm_per_job_s']:6.3f} s"
                      f" = in the trainer {result['trainer_s']:6.3f} s + outside it {result['outside_s']:6.3f} s"
                      f"   run {result['total_s']:6.1f} s", flush=True)
    ratios = []
    for r in range(args.rounds):
        local = next(res for rr, ex, res in rows if rr == r and ex == "local")
        on_ray = next(res for rr, ex, res in rows if rr == r and ex == "ray")
        ratios.append(on_ray["warm_per_job_s"] / local["warm_per_job_s"])
    per = {ex: statistics.median(res["warm_per_job_s"] for _, e, res in rows if e == ex) for ex in ("local", "ray")}
    cold = {ex: statistics.median(res["cold_s"] for _, e, res in rows if e == ex) for ex in ("local", "ray")}
    outside = {ex: statistics.median(res["outside_s"] for _, e, res in rows if e == ex) for ex in ("local", "ray")}
    print(f"warm per job (median): local {per['local']:.3f} s, ray {per['ray']:.3f} s; "
          f"ray/local per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f} "
          f"(goal <= 1.10)")
    print(f"outside the trainer per job (median): local {outside['local']:.3f} s, ray {outside['ray']:.3f} s "
          f"(claim, submit, events, file shipping, inspection, publishing)")
    print(f"cold start to first job done (median): local {cold['local']:.1f} s, ray {cold['ray']:.1f} s")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
