"""Memory of one trainer process over many consecutive jobs: it should stay flat.

    .venv/bin/python benchmarks/bench_memory.py [--jobs 20] [--steps 20] [--size tiny]

A queue of ``--jobs`` adapters on one base runs through ``api.run`` with one CPU
trainer process (the local executor, as ``loraq run --devices cpu``). The jobs vary
as a real queue does: three dataset formats (chat, prompt/completion, alpaca),
LoRA ranks 4/8/16 and q,v or all-linear targets. After each job's cleanup the
trainer measures its RSS (and CUDA allocated/reserved/peak where there is a GPU)
and records it in the job's result and as the ``rss_mb`` metric; this prints the
series from the store.

Goal (issue 6): flat: no job's RSS more than 5% above the first job's.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from pathlib import Path

from _bench import load, machine, quiet_hf

from loraq import api, demo
from loraq.queue.store import Store
from loraq.workspace import Home

DATASETS = [("support.jsonl", "chat"), ("sql.jsonl", "prompt_completion"), ("stories.jsonl", "alpaca")]
LORAS = ["{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", "{r: 8, alpha: 16, target_modules: all-linear}",
         "{r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}"]


def write_project(root: Path, args: argparse.Namespace) -> Path:
    quiet_hf()
    demo.build_model(root / "models" / "base", size=args.size, pretrain_steps=args.pretrain_steps)
    rng = random.Random(0)
    for (filename, _), (_, make) in zip(DATASETS, demo.DATASETS.values()):
        demo.write_jsonl(root / "data" / filename, make(args.rows, rng))
    lines = [
        "defaults:",
        "  base_model: ./models/base",
        f"  training: {{max_steps: {args.steps}, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 128, "
        f"save_steps: {max(1, args.steps // 2)}, logging_steps: 5}}",
        "  validation: {split: 0.1}",
        "jobs:",
    ]
    for i in range(args.jobs):
        filename, fmt = DATASETS[i % 3]
        lines += [f"  - name: job-{i:02d}", f"    dataset: {{path: ./data/{filename}, format: {fmt}}}",
                  f"    lora: {LORAS[(i // 3) % 3]}", f"    training: {{seed: {i}}}"]
    queue = root / "queue.yaml"
    queue.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return queue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--size", choices=sorted(demo.SIZES), default="tiny")
    parser.add_argument("--pretrain-steps", type=int, default=50)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"bench_memory: {args.jobs} consecutive jobs x {args.steps} steps in one trainer process, "
          f"{args.size} demo model")
    print(f"machine: {machine()}")
    root = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=args.dir))
    try:
        queue = write_project(root, args)
        home = Home(root / ".loraq")
        api.submit(queue, home=home)
        result = api.run(home, api.RunOptions(devices="cpu"))
        if not result.ok:
            raise SystemExit(f"the queue did not complete: {result}")
        with Store.open(home.db_path, create=False) as store:
            jobs = sorted(store.jobs(), key=lambda j: j.started_at or 0.0)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    pids = {j.result["pid"] for j in jobs}
    series = [j.result["memory"] for j in jobs]
    rss = [m["rss_mb"] for m in series]
    print(f"\none trainer process: {len(pids) == 1} (pid {', '.join(map(str, sorted(pids)))}); "
          f"base loads: {jobs[-1].result['base_loads']}")
    print()
    print("job  spec                                    rss MB   vs job 1" + ("   cuda alloc/reserved MB" if "cuda_allocated_mb" in series[0] else ""))
    for i, (job, memory) in enumerate(zip(jobs, series)):
        spec = job.spec["spec"]
        what = f"{spec['dataset']['format']}, r={spec['lora']['r']}, {spec['lora']['target_modules']}"
        cuda = (f"   {memory['cuda_allocated_mb']}/{memory['cuda_reserved_mb']}" if "cuda_allocated_mb" in memory else "")
        print(f"{i + 1:>3}  {what[:38]:<38}  {memory['rss_mb']:7.1f}  {100 * (memory['rss_mb'] / rss[0] - 1):+6.2f}%{cuda}")
    worst = max(rss[1:]) if len(rss) > 1 else rss[0]
    growth = worst / rss[0] - 1
    print()
    print(f"RSS after job 1 {rss[0]:.1f} MB, after job {len(rss)} {rss[-1]:.1f} MB ({100 * (rss[-1] / rss[0] - 1):+.2f}%), "
          f"highest {worst:.1f} MB ({100 * growth:+.2f}%); growth after job 2 -> last "
          f"{100 * (rss[-1] / rss[1] - 1) if len(rss) > 1 else 0:+.2f}%")
    print(f"flat (no job over +5% of job 1): {'met' if growth < 0.05 else 'MISSED'}")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
