"""Helpers shared by bench_adapters, bench_queue, bench_status and bench_memory (not by the others).

Times are wall-clock (``perf_counter``) and CPU seconds of the child processes
(``RUSAGE_CHILDREN``, which counts grandchildren that were waited for, such as a
``loraq run``'s trainer processes). On a machine shared with other work the wall
times move with the load; the CPU seconds move less. Each benchmark prints the
load average at its start and end so a reader can tell a quiet run from a busy one.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
LORAQ = str(Path(sys.executable).with_name("loraq"))


@dataclass(frozen=True)
class Timed:
    wall_s: float
    cpu_s: float
    stdout: str
    stderr: str
    returncode: int


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: Sequence[str], *, check: bool = True, env: dict[str, str] | None = None, cwd: str | Path | None = None,
        timeout: float = 1800) -> Timed:
    """Run ``cmd`` to the end; its wall time and the CPU seconds it and its children used."""
    cpu0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False)
    timed = Timed(time.perf_counter() - t0, children_cpu() - cpu0, proc.stdout, proc.stderr, proc.returncode)
    if check and proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return timed


def quiet_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "PYTHONWARNINGS": "ignore"})
    return env


def quiet_hf() -> None:
    """No progress bars from transformers in a benchmark's own process (building the demo model)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min)"


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}; {load()}")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
