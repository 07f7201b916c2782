"""The real tier's queue on a real base, measured: SmolLM2-135M-Instruct, three jobs through the command line.

    .venv/bin/python benchmarks/bench_real_queue.py [--keep DIR]

The queue of ``tests/test_real.py`` (tests/realdata.py ``real_queue``): a chat, a
prompt/completion and an alpaca job, each 4 steps of LoRA r=16 on all linear layers at
64 tokens, 64 training rows and 16 held-out rows, ``validation.metrics: [exact_match]``.
It is submitted and run with ``loraq submit`` / ``loraq run --devices cpu`` (one trainer
process keeps the base loaded), then read back from the store. Per job:

- training time: the Trainer's ``train()`` (``train_s``), and the whole job in the trainer
  (``job_s``: data, base eval and generation, training, save, adapter eval and generation);
- trainable tokens per second: the trainable (loss-carrying) tokens training went through,
  steps x rows a step x the training rows' mean trainable tokens, over ``train_s``;
- peak RSS: the trainer process's high-water mark by the end of the job (its earlier jobs
  included: one process serves the queue);
- eval loss and exact match (greedy answers to the 16 held-out prompts), base -> adapter.

The real base is built on first use (tools/real_model.py, into $LORAQ_CACHE or
~/.cache/loraq).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _bench import BENCH_DIR, LORAQ, load, machine, quiet_env, run, table

sys.path.insert(0, str(BENCH_DIR.parent / "tests"))
sys.path.insert(0, str(BENCH_DIR.parent / "tools"))

import real_model  # noqa: E402  (tools/)

import realdata  # noqa: E402  (tests/)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    base = real_model.ensure().folder
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-real-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    try:
        queue, _ = realdata.real_queue(work, base)
        home = work / ".loraq"
        common = [LORAQ, "--home", str(home), "--allow-root", str(base)]
        env = quiet_env()
        submitted = run([*common, "submit", str(queue)], env=env)
        ran = run([*common, "run", "--devices", "cpu"], env=env)
        rows = []
        for name in realdata.REAL_JOBS:
            shown = json.loads(run([*common, "show", name, "--json"], env=env).stdout)
            job, result = shown["job"], shown["job"]["result"]
            training = job["spec"]["spec"]["training"]
            seen = result["steps"] * training["batch_size"] * training["grad_accum"] * result["train_tokens"] / result["n_train"]
            metrics = result["metrics"]
            rows.append([name, job["spec"]["spec"]["dataset"]["format"], f"{job['attempts']}",
                         f"{result['train_s']:.1f}", f"{result['job_s']:.1f}", f"{seen / result['train_s']:.0f}",
                         f"{result['memory']['peak_rss_mb']:.0f}",
                         f"{result['base_eval_loss']:.3f} -> {result['eval_loss']:.3f}",
                         f"{metrics['base_exact_match']:.3f} -> {metrics['exact_match']:.3f}"])
        print(f"submit {submitted.wall_s:.1f} s; run {ran.wall_s:.1f} s wall, {ran.cpu_s:.1f} s CPU (3 jobs, one trainer)")
        print(table(["job", "format", "attempts", "train s", "job s", "trainable tok/s", "peak RSS MB",
                     "eval loss base -> adapter", "exact match base -> adapter"], rows))
        print(load())
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
