"""The real tier's queue on a real base, measured: SmolLM2-135M-Instruct, three jobs through the command line.

    .venv/bin/python benchmarks/bench_real_queue.py [--keep DIR] [--devices cpu|0] [--precision auto|bf16|fp32]
                                                    [--executor local|ray] [--jobs support,digits,orders] [--check]

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

``--devices``, ``--precision`` and ``--executor`` go to the run and the queue's defaults
(``benchmarks/gpu_check.sh`` runs it with ``--devices 0 --precision bf16``, and through Ray);
``--jobs`` keeps only the named jobs. ``--check`` makes it exit 1, saying why, unless every job
completed on its first attempt on the device asked for: with a GPU, pinned to it
(``CUDA_VISIBLE_DEVICES`` in the result is the device asked for) and with the CUDA memory
fields in its result (``cuda_allocated_mb``, ``cuda_reserved_mb``, ``cuda_peak_mb``).

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
    ap.add_argument("--devices", default="cpu", help="loraq run --devices (default cpu; a GPU: 0)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    ap.add_argument("--executor", choices=["local", "ray"], default="local")
    ap.add_argument("--jobs", default=",".join(realdata.REAL_JOBS), help="the jobs to keep (default: all three)")
    ap.add_argument("--check", action="store_true", help="exit 1 unless every job completed as asked (see above)")
    args = ap.parse_args()
    names = [n for n in args.jobs.split(",") if n]
    unknown = sorted(set(names) - set(realdata.REAL_JOBS))
    if unknown:
        raise SystemExit(f"--jobs: unknown job(s) {', '.join(unknown)}; the queue has {', '.join(realdata.REAL_JOBS)}")
    base = real_model.ensure().folder
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-real-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    try:
        queue, _ = realdata.real_queue(work, base)
        queue.write_text(_only(queue.read_text(encoding="utf-8"), names, args.precision), encoding="utf-8")
        home = work / ".loraq"
        common = [LORAQ, "--home", str(home), "--allow-root", str(base)]
        env = quiet_env()
        submitted = run([*common, "submit", str(queue)], env=env)
        ran = run([*common, "run", "--devices", args.devices, "--executor", args.executor], env=env, check=not args.check)
        rows, problems = [], []
        for name in names:
            shown = json.loads(run([*common, "show", name, "--json"], env=env).stdout)
            job, result = shown["job"], shown["job"]["result"]
            problems += _problems(name, job, args.devices)
            if result is None:
                continue
            print(f"{name}: device {result.get('device')}, CUDA_VISIBLE_DEVICES {result.get('cuda_visible_devices')!r}, "
                  f"torch threads {result.get('torch_threads')}, memory {result.get('memory')}")
            training = job["spec"]["spec"]["training"]
            seen = result["steps"] * training["batch_size"] * training["grad_accum"] * result["train_tokens"] / result["n_train"]
            metrics = result["metrics"]
            rows.append([name, job["spec"]["spec"]["dataset"]["format"], f"{job['attempts']}",
                         f"{result['train_s']:.1f}", f"{result['job_s']:.1f}", f"{seen / result['train_s']:.0f}",
                         f"{result['memory']['peak_rss_mb']:.0f}",
                         f"{result['base_eval_loss']:.3f} -> {result['eval_loss']:.3f}",
                         f"{metrics['base_exact_match']:.3f} -> {metrics['exact_match']:.3f}"])
        print(f"submit {submitted.wall_s:.1f} s; run {ran.wall_s:.1f} s wall, {ran.cpu_s:.1f} s CPU ({len(names)} "
              f"job(s), one trainer, --devices {args.devices}, --executor {args.executor}, precision {args.precision})")
        print(table(["job", "format", "attempts", "train s", "job s", "trainable tok/s", "peak RSS MB",
                     "eval loss base -> adapter", "exact match base -> adapter"], rows))
        print(load())
        if args.check:
            if problems:
                raise SystemExit("check FAILED:\n  " + "\n  ".join(problems))
            print(f"check passed: {len(names)} job(s) completed on their first attempt on --devices {args.devices}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _only(queue: str, names: list[str], precision: str) -> str:
    """The real queue with only the jobs ``names`` (each job's lines start at its ``- name:``), at ``precision``."""
    head, _, body = queue.partition("jobs:\n")
    blocks = ["  - name:" + b for b in body.split("  - name:")[1:]]
    kept = [b for b in blocks if b.split(":", 1)[1].split()[0] in names]
    if precision != "auto":
        head = head.replace("seed: 42}", f"seed: 42, precision: {precision}}}")
    return head + "jobs:\n" + "".join(kept)


def _problems(name: str, job: dict, devices: str) -> list[str]:
    """What ``--check`` finds wrong with a job: not completed at once, not on the device asked for, no CUDA fields."""
    result = job.get("result") or {}
    if job["status"] != "completed" or job["attempts"] != 1:
        return [f"{name}: {job['status']} after {job['attempts']} attempt(s): {job.get('error')}"]
    found = []
    if devices == "cpu":
        if result.get("device") != "cpu":
            found.append(f"{name}: trained on {result.get('device')}, not the CPU")
    else:
        if not str(result.get("device", "")).startswith("cuda"):
            found.append(f"{name}: trained on {result.get('device')}, not a GPU")
        visible = result.get("cuda_visible_devices")
        if visible not in (devices, None) and devices.isdigit():
            found.append(f"{name}: CUDA_VISIBLE_DEVICES {visible!r} in the trainer, not {devices!r}")
        missing = [k for k in ("cuda_allocated_mb", "cuda_reserved_mb", "cuda_peak_mb")
                   if not isinstance((result.get("memory") or {}).get(k), (int, float))]
        if missing:
            found.append(f"{name}: no {', '.join(missing)} in the result's memory: {result.get('memory')}")
    return found


if __name__ == "__main__":
    main()
