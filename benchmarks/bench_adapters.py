"""N LoRA adapters on one base model: loraq vs a script per adapter vs a hand-written loop.

    .venv/bin/python benchmarks/bench_adapters.py [--adapters 8] [--steps 40] [--rounds 3] [--size tiny]

Three ways to train the same N adapters (the same rows, split, LoRA, steps, batch
size, learning rate, a checkpoint and an evaluation at the last step):

- script: ``python benchmarks/peft_script.py`` once per adapter, a fresh process
  each (plain PEFT + HF Trainer: what users write today);
- loop: ``python benchmarks/peft_loop.py``: one process, the base loaded once, a
  loop over the adapters (the limit: no queue, no checks, no crash safety);
- loraq: ``loraq submit queue.yaml`` then ``loraq run --devices cpu``, through the
  real CLI: submit-time validation of every row, the SQLite queue, one trainer
  process keeping the base hot, a base-model eval loss, checkpoints marked
  complete, inspection and atomic publishing of every adapter.

Each is timed from the outside (wall clock of the processes, and their CPU
seconds), ``--rounds`` times in rotating order; the medians are compared. Goals
(issues 6 and 11): loraq >= 3x faster than the script per adapter, and within 1.15x of the loop
(1.3x under issue 6).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from _bench import BENCH_DIR, LORAQ, PYTHON, Timed, load, machine, median, quiet_env, quiet_hf, run, table

from loraq import demo

QUEUE = """\
defaults:
  base_model: ./models/base
  lora: {{r: {r}, alpha: {alpha}, dropout: 0.0, target_modules: [q_proj, v_proj]}}
  training: {{max_steps: {steps}, learning_rate: {lr}, batch_size: {batch}, max_seq_len: {max_len}, save_steps: {steps},
             logging_steps: {logging}, lr_scheduler: linear}}
  validation: {{split: {split}}}
jobs:
"""
JOB = """\
  - name: adapter-{i}
    dataset: {{path: ./data/adapter-{i}.jsonl, format: prompt_completion}}
    training: {{seed: {i}}}
"""


def prepare(root: Path, args: argparse.Namespace) -> None:
    quiet_hf()
    demo.build_model(root / "models" / "base", size=args.size, pretrain_steps=args.pretrain_steps)
    for i in range(args.adapters):  # one dataset per adapter (one per customer, task or language)
        demo.write_jsonl(root / "data" / f"adapter-{i}.jsonl", demo.sql_rows(args.rows, random.Random(100 + i)))
    queue = QUEUE.format(r=args.r, alpha=args.alpha, steps=args.steps, lr=args.lr, batch=args.batch_size,
                         max_len=args.max_seq_len, logging=args.logging_steps, split=args.split)
    queue += "".join(JOB.format(i=i) for i in range(args.adapters))
    (root / "queue.yaml").write_text(queue, encoding="utf-8")


def settings(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
            "--lr", str(args.lr), "--r", str(args.r), "--alpha", str(args.alpha), "--split", str(args.split),
            "--logging-steps", str(args.logging_steps)]


def add(parts: list[Timed]) -> Timed:
    return Timed(sum(p.wall_s for p in parts), sum(p.cpu_s for p in parts), "", "", 0)


def run_script(root: Path, out: Path, args: argparse.Namespace) -> tuple[Timed, list[float]]:
    parts, losses = [], []
    for i in range(args.adapters):
        timed = run([PYTHON, str(BENCH_DIR / "peft_script.py"), "--base", str(root / "models" / "base"),
                     "--data", str(root / "data" / f"adapter-{i}.jsonl"), "--out", str(out / f"adapter-{i}"),
                     "--seed", str(i), *settings(args)], env=quiet_env())
        parts.append(timed)
        losses.append(json.loads(timed.stdout.strip().splitlines()[-1])["eval_loss"])
    return add(parts), losses


def run_loop(root: Path, out: Path, args: argparse.Namespace) -> tuple[Timed, list[float]]:
    jobs = [{"data": str(root / "data" / f"adapter-{i}.jsonl"), "out": str(out / f"adapter-{i}"), "seed": i}
            for i in range(args.adapters)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    timed = run([PYTHON, str(BENCH_DIR / "peft_loop.py"), "--base", str(root / "models" / "base"),
                 "--jobs", str(out / "jobs.json"), *settings(args)], env=quiet_env())
    results = json.loads(timed.stdout.strip().splitlines()[-1])["results"]
    return timed, [r["eval_loss"] for r in results]


def run_loraq(root: Path, home: Path, args: argparse.Namespace) -> tuple[Timed, dict[str, Timed], list[float], dict[str, Any]]:
    env = quiet_env()
    submit = run([LORAQ, "--home", str(home), "submit", str(root / "queue.yaml")], env=env)
    ran = run([LORAQ, "--home", str(home), "run", "--devices", "cpu", "--quiet"], env=env)
    jobs = json.loads(run([LORAQ, "--home", str(home), "status", "--json"], env=env).stdout)["jobs"]
    if any(j["status"] != "completed" for j in jobs):
        raise SystemExit(f"loraq did not complete every job: {[(j['name'], j['status'], j['error']) for j in jobs]}")
    jobs.sort(key=lambda j: int(j["name"].rsplit("-", 1)[1]))
    detail = json.loads(run([LORAQ, "--home", str(home), "show", jobs[-1]["name"], "--json"], env=env).stdout)
    return add([submit, ran]), {"submit": submit, "run": ran}, [j["eval_loss"] for j in jobs], detail["job"]["result"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", choices=sorted(demo.SIZES), default="tiny")
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--split", type=float, default=0.1)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--dir", default=None, help="Work here (default: a temporary folder, removed after).")
    args = parser.parse_args()

    print(f"bench_adapters: {args.adapters} adapters x {args.steps} steps (batch {args.batch_size}, "
          f"max_seq_len {args.max_seq_len}, r {args.r}, q_proj+v_proj) on the {args.size} demo model, "
          f"{args.rounds} round(s)")
    print(f"machine: {machine()}")
    root = Path(tempfile.mkdtemp(prefix="bench-adapters-", dir=args.dir))
    try:
        prepare(root, args)
        times: dict[str, list[Timed]] = {"script": [], "loop": [], "loraq": []}
        loraq_parts: dict[str, list[Timed]] = {"submit": [], "run": []}
        losses: dict[str, list[float]] = {}
        result: dict[str, Any] = {}
        order = ["script", "loop", "loraq"]
        for n in range(args.rounds):
            for way in order[n % 3:] + order[:n % 3]:  # rotate: no way always runs first or last
                out = root / f"round-{n}" / way
                if way == "script":
                    timed, losses[way] = run_script(root, out, args)
                elif way == "loop":
                    timed, losses[way] = run_loop(root, out, args)
                else:
                    timed, parts, losses[way], result = run_loraq(root, out / ".loraq", args)
                    for key, value in parts.items():
                        loraq_parts[key].append(value)
                times[way].append(timed)
                print(f"  round {n + 1} {way:<6} {timed.wall_s:7.2f} s wall {timed.cpu_s:7.2f} s cpu", flush=True)
                shutil.rmtree(out, ignore_errors=True)

        wall = {way: median([t.wall_s for t in ts]) for way, ts in times.items()}
        cpu = {way: median([t.cpu_s for t in ts]) for way, ts in times.items()}
        rows = [[way, f"{wall[way]:.2f}", f"{wall[way] / args.adapters:.2f}", f"{cpu[way]:.2f}",
                 f"{wall['script'] / wall[way]:.2f}x", f"{wall[way] / wall['loop']:.2f}x",
                 f"{sum(losses[way]) / len(losses[way]):.4f}"] for way in ("script", "loop", "loraq")]
        print()
        print(table(["way", "wall s", "s/adapter", "cpu s", "script/way", "way/loop", "mean eval loss"], rows))
        print(f"  loraq parts (median): submit {median([t.wall_s for t in loraq_parts['submit']]):.2f} s, "
              f"run {median([t.wall_s for t in loraq_parts['run']]):.2f} s")
        print(f"  last loraq job: base_reused={result.get('base_reused')} base_loads={result.get('base_loads')} "
              f"train_s={result.get('train_s')} job_s={result.get('job_s')} memory={result.get('memory')}")
        speedup, over_loop = wall["script"] / wall["loraq"], wall["loraq"] / wall["loop"]
        print()
        print(f"loraq vs script per adapter: {speedup:.2f}x faster (goal >= 3x: {'met' if speedup >= 3 else 'MISSED'})")
        print(f"loraq vs hand-written loop:  {over_loop:.2f}x the time (goal <= 1.15x: {'met' if over_loop <= 1.15 else 'MISSED'})")
        print(f"end: {load()}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
