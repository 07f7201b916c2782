"""Submit-time dataset validation: how fast, and how much a queue shares.

    .venv/bin/python benchmarks/bench_datacheck.py [--rows 100000] [--jobs 50] [--formats chat,prompt_completion]

For each format it writes a dataset of ``--rows`` distinct rows and the demo
tokenizer (byte-level BPE with a chat template; nothing is downloaded), then measures:

- rows only: reading and checking every row (``data.check_dataset``);
- 1 job, cold: ``analyze_job`` with an empty token cache (rows + tokens: render,
  tokenise, truncation, duplicates, split, steps);
- 1 job, warm disk cache: the same in a fresh process-like cache that finds the
  profile on disk (``<home>/cache/datasets``);
- a queue of N jobs sharing the dataset (different max_seq_len, seeds, learning
  rates): ``analyze_queue`` with an empty cache, the number of tokenisations it
  did, and its time over the 1-job cold time.

Times are wall-clock on this machine, reported as measured; no test asserts them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from loraq import data, demo
from loraq.data import check as datacheck
from loraq.data.check import TokenCache
from loraq.queue.spec import JobSpec, Queue, QueueSettings, ResolvedJob


def _cycled(make: Any, n: int, rng: random.Random, pool: int = 500) -> list[dict[str, Any]]:
    """``n`` rows drawn from a pool of the demo generator's distinct rows (it has only so many)."""
    base = make(pool, rng)
    return [copy.deepcopy(base[rng.randrange(pool)]) for _ in range(n)]


def rows_for(fmt: str, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` distinct rows of the demo's kind, each made unique by a ticket number."""
    if fmt == "chat":
        rows = _cycled(demo.chat_rows, n, rng)
        for i, row in enumerate(rows):
            row["messages"][1]["content"] += f" (ticket {i})"
        return rows
    if fmt == "prompt_completion":
        return [{"prompt": f"{r['prompt']} -- {i}", "completion": r["completion"]}
                for i, r in enumerate(_cycled(demo.sql_rows, n, rng))]
    if fmt == "alpaca":
        return [{**r, "instruction": f"{r['instruction']} ({i})"} for i, r in enumerate(_cycled(demo.alpaca_rows, n, rng, pool=300))]
    return [{"text": f"{r['text']} ({i})"} for i, r in enumerate(demo.text_rows(n, rng))]


def job(name: str, base: Path, dataset: Path, **training: Any) -> ResolvedJob:
    spec = JobSpec.model_validate({"name": name, "base_model": str(base), "dataset": str(dataset),
                                   "training": {"max_seq_len": 128, **training}})
    return ResolvedJob(spec=spec, queue_file=str(dataset.parent / "queue.yaml"), base_model=str(base),
                       dataset_path=str(dataset))


CPU: dict[str, float] = {}


def timed(fn: Any) -> tuple[float, Any]:
    """Wall seconds (and, in CPU["last"], process CPU seconds: all threads, less sensitive to a busy machine)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    CPU["last"] = time.process_time() - cpu
    return time.perf_counter() - start, result


def bench(fmt: str, rows: int, jobs: int, root: Path, base: Path) -> None:
    dataset = demo.write_jsonl(root / f"{fmt}.jsonl", rows_for(fmt, rows, random.Random(1)))
    size_mb = dataset.stat().st_size / 1e6
    print(f"\n== {fmt}: {rows:,} rows, {size_mb:.1f} MB JSON Lines")

    t_rows, (checked, _) = timed(lambda: data.check_dataset(dataset))
    assert checked is not None and len(checked) == rows
    print(f"rows only (read + check every row): {t_rows:6.2f} s  {rows / t_rows:>9,.0f} rows/s  "
          f"(cpu {CPU['last']:.2f} s)")

    one = job("one", base, dataset)
    cold_cache = TokenCache()
    t_cold, report = timed(lambda: datacheck.analyze_job(one, cache=cold_cache))
    print(f"1 job, cold (rows + tokens):        {t_cold:6.2f} s  {rows / t_cold:>9,.0f} rows/s  "
          f"(cpu {CPU['last']:.2f} s; {report.tokens.total:,} tokens, mean {report.tokens.mean:g}, "
          f"p95 {report.tokens.p95}, max {report.tokens.max}; tokenisations {cold_cache.tokenisations})")

    cache_dir = root / "home" / "cache" / "datasets"
    datacheck.analyze_job(one, cache=TokenCache(), cache_dir=cache_dir)  # fills the disk cache
    warm_cache = TokenCache()
    t_warm, _ = timed(lambda: datacheck.analyze_job(one, cache=warm_cache, cache_dir=cache_dir))
    print(f"1 job, warm disk cache:             {t_warm:6.2f} s  {rows / t_warm:>9,.0f} rows/s  "
          f"(cpu {CPU['last']:.2f} s; disk hits {warm_cache.disk_hits}, tokenisations {warm_cache.tokenisations})")

    queue = Queue(path=str(root / "queue.yaml"), settings=QueueSettings(), jobs=[
        job(f"job-{i}", base, dataset, max_seq_len=64 + 32 * (i % 4), seed=i % 3, learning_rate=1e-4 * (1 + i % 5))
        for i in range(jobs)])
    queue_cache = TokenCache()
    t_queue, (reports, problems) = timed(lambda: datacheck.analyze_queue(queue, cache=queue_cache))
    assert not problems and len(reports) == jobs, problems[:3]
    print(f"{jobs} jobs sharing it, cold:            {t_queue:6.2f} s  tokenisations {queue_cache.tokenisations}  "
          f"ratio {jobs}-jobs / 1-job = {t_queue / t_cold:.2f} (cpu {CPU['last']:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--formats", default="chat,prompt_completion")
    args = parser.parse_args()
    print(f"loraq datacheck benchmark: python {platform.python_version()}, {os.cpu_count()} CPU(s), "
          f"{platform.machine()}, load average {os.getloadavg()[0]:.1f}, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}")
    with tempfile.TemporaryDirectory(prefix="loraq-bench-datacheck-") as tmp:
        root = Path(tmp)
        base = root / "base"
        demo.build_tokenizer(base)
        # paid once per process by submit, whatever the data: measured apart from the per-dataset times
        t_load, _ = timed(lambda: datacheck.load_tokenizer(job("warmup", base, base / "x.jsonl")))
        print(f"load the tokenizer (once per base model per submit): {t_load:.2f} s")
        vocab = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
        print(f"tokenizer: demo byte-level BPE, vocab {len(vocab)}")
        for fmt in args.formats.split(","):
            bench(fmt.strip(), args.rows, args.jobs, root, base)


if __name__ == "__main__":
    main()
