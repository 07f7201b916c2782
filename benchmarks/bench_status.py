"""``loraq status`` start-up time against ``python -c "import torch"``, both as fresh processes.

    .venv/bin/python benchmarks/bench_status.py [--repeat 15] [--jobs 20]

``loraq status`` is what a person types over and over while a queue runs; the
supervisor side never imports torch, so it should answer in a fraction of what
importing torch alone takes. Measured, in turns, ``--repeat`` times each (medians):

- ``python -c pass``: the interpreter alone (the floor for any Python command);
- ``python -c "import torch"``;
- ``loraq status`` and ``loraq status --json`` on a home holding ``--jobs`` jobs
  (some completed with results, some failed, some pending), and on a new home.

Goal (issue 6): ``loraq status`` under a third of ``import torch``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _bench import LORAQ, PYTHON, load, machine, median, quiet_env, run, table

from loraq.queue.store import NewJob, Store, WorkerId


def fill(home: Path, n: int) -> None:
    """A home with ``n`` jobs: a third completed (with results), a few failed, the rest pending."""
    with Store.open(home / "loraq.db") as store:
        store.enqueue([NewJob(name=f"adapter-{i:03d}", spec={"spec": {"name": f"adapter-{i:03d}"}, "base_model": "/m"},
                              base_key='["/m", null, "auto"]') for i in range(n)])
        worker = WorkerId.current()
        for i in range(n // 3 + 2):
            claim = store.claim(worker, lease_s=60)
            assert claim is not None
            if i < 2:
                store.fail(claim.job.id, claim.epoch, kind="data", reason="row 3: no assistant turn", retryable=False)
            else:
                store.record_progress(claim.job.id, claim.epoch, claim.attempt, step=100, total=100,
                                      metrics={"loss": 0.9, "eval_loss": 1.1, "base_eval_loss": 2.3})
                store.complete(claim.job.id, claim.epoch, verdict="pass", result={
                    "train_loss": 0.9, "eval_loss": 1.1, "base_eval_loss": 2.3, "adapter": f"/h/adapters/{i}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    print(f"bench_status: {args.repeat} runs of each, in turns; a home of {args.jobs} jobs")
    print(f"machine: {machine()}")
    root = Path(tempfile.mkdtemp(prefix="bench-status-"))
    try:
        fill(root / "home", args.jobs)
        env = quiet_env() | {"COLUMNS": "160"}
        commands = {
            "python -c pass": [PYTHON, "-c", "pass"],
            "python -c 'import torch'": [PYTHON, "-c", "import torch"],
            f"loraq status ({args.jobs} jobs)": [LORAQ, "--home", str(root / "home"), "status"],
            f"loraq status --json ({args.jobs} jobs)": [LORAQ, "--home", str(root / "home"), "status", "--json"],
            "loraq status (new home)": [LORAQ, "--home", str(root / "new"), "status"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for cmd in commands.values():  # warm the page cache once; not counted
            run(cmd, env=env)
        for _ in range(args.repeat):
            for name, cmd in commands.items():
                times[name].append(run(cmd, env=env).wall_s)
                time.sleep(0.05)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    torch_s = median(times["python -c 'import torch'"])
    rows = [[name, f"{median(ts):.3f}", f"{min(ts):.3f}", f"{median(ts) / torch_s:.2f}"] for name, ts in times.items()]
    print()
    print(table(["command", "median s", "min s", "/ import torch"], rows))
    status_s = median(times[f"loraq status ({args.jobs} jobs)"])
    ratio = status_s / torch_s
    print()
    print(f"loraq status: {ratio:.2f} of 'import torch' ({torch_s / status_s:.1f}x faster; goal under 1/3: "
          f"{'met' if ratio < 1 / 3 else 'MISSED'})")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
