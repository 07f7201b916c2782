"""Helpers for the tests that run real ``loraq`` processes and kill, stop or signal them.

Everything here observes loraq from the outside, the way an operator would: the
command line, the process tree, the files in the home and a read-only look at
``loraq.db``. Timeouts are failure bounds only, never assertions about speed: the
machine may be shared and slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import psutil

from conftest import LORAQ

T = TypeVar("T")

#: One BLAS/OpenMP thread per process: these tests run several trainers (and other
#: engineers' tests) on a 2-core machine, where torch's default of one thread per
#: core makes every process spin against the others (measured: a 20-step job took
#: 5.7 s with the default, 1.2 s with one thread, on the same loaded machine).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}

#: Generous upper bounds: a trainer process needs ~5 s to import torch on an idle
#: machine, much more on a loaded one.
STARTUP_S = 180.0
JOB_S = 300.0


def make_workdir(root: Path, tiny_model: Path, demo_datasets: dict[str, Path]) -> Path:
    """A project folder: models/tiny and data/*.jsonl (copies: links out of it are refused)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_model, root / "models" / "tiny")
    (root / "data").mkdir()
    for path in demo_datasets.values():
        shutil.copy(path, root / "data" / path.name)
    return root


def queue_file(folder: Path, jobs: list[str], *, training: str, name: str = "queue.yaml", dropout: float = 0.0,
               max_retries: int = 2, extra: str = "") -> Path:
    """A queue file over the demo data. ``jobs`` are names; datasets rotate through the three demo sets."""
    sets = ["./data/support.jsonl", "{path: ./data/sql.jsonl, format: prompt_completion}", "./data/stories.jsonl"]
    body = [
        "defaults:",
        "  base_model: ./models/tiny",
        f"  lora: {{r: 4, alpha: 8, dropout: {dropout}, target_modules: [q_proj, v_proj]}}",
        f"  training: {{{training}}}",
        "  validation: {split: 0.1}",
        f"  max_retries: {max_retries}",
        "retry_backoff_s: 0",
        extra,
        "jobs:",
    ]
    for i, job in enumerate(jobs):
        body += [f"  - name: {job}", f"    dataset: {sets[i % len(sets)]}"]
    path = folder / name
    path.write_text("\n".join(line for line in body if line) + "\n", encoding="utf-8")
    return path


def loraq(home: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and result.returncode != 0:
        raise AssertionError(f"loraq {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


class Worker:
    """A ``loraq run`` process, its output in a file (a pipe could fill and block it)."""

    def __init__(self, home: Path, *args: str, log: Path, devices: str = "cpu") -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen([LORAQ, "--home", str(home), "run", "--devices", devices, *args],
                                     stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def trainers(self) -> list[psutil.Process]:
        """Its trainer processes (``python -m loraq.train``), alive now."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            try:
                if "loraq.train" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found

    def busy_trainers(self) -> list[tuple[psutil.Process, Path]]:
        """Trainers that are running a job now, with the job's log (a trainer writes its stdout there)."""
        busy = []
        for trainer in self.trainers():
            try:
                logs = [Path(f.path) for f in trainer.open_files() if f.path.endswith("train.log")]
            except psutil.Error:
                continue
            if logs:
                busy.append((trainer, logs[0]))
        return busy

    def freeze(self, home: Path, attempts: int = 100) -> None:
        """SIGSTOP the worker at a moment it holds no write transaction.

        A process frozen inside one keeps SQLite's write lock, and every other writer
        waits for it (see Store: the error then names the frozen process). That is
        SQLite's nature, not what a stale-owner test is about: retry until the
        freeze lands between transactions.
        """
        db = home / "loraq.db"
        for _ in range(attempts):
            self.proc.send_signal(signal.SIGSTOP)
            with closing(sqlite3.connect(db, timeout=0.5, isolation_level=None)) as probe:
                try:
                    probe.execute("BEGIN IMMEDIATE")
                    probe.execute("ROLLBACK")
                    return
                except sqlite3.OperationalError:
                    pass
            self.proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        raise AssertionError(f"could not freeze the worker outside a transaction in {attempts} tries")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill9(self) -> list[int]:
        """SIGKILL the worker; return its trainers' pids (they die with it: PR_SET_PDEATHSIG)."""
        trainers = [p.pid for p in self.trainers()]
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._out.close()
        return trainers

    def wait(self, timeout: float = JOB_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"loraq run did not finish within {timeout:.0f} s:\n{self.output()}") from None
        finally:
            self._out.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_for(predicate: Callable[[], T], *, timeout: float, what: str, every: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    def gone() -> bool:
        return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in pids if _exists(p))
    wait_for(gone, timeout=timeout, what=f"processes {pids} to exit")


def _exists(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------- reading the state from outside


def query(home: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Read ``loraq.db`` the way a monitoring script would (a plain, short connection)."""
    db = home / "loraq.db"
    if not db.exists():
        return []
    with closing(sqlite3.connect(db, timeout=60)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params).fetchall()]


def jobs(home: Path) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in query(home, "SELECT * FROM jobs ORDER BY id")}


def attempts(home: Path, name: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT a.*, j.name FROM attempts a JOIN jobs j ON j.id = a.job_id"
    if name is None:
        return query(home, sql + " ORDER BY a.job_id, a.n")
    return query(home, sql + " WHERE j.name = ? ORDER BY a.n", (name,))


def events(home: Path, name: str) -> list[dict[str, Any]]:
    return query(home, "SELECT e.* FROM events e JOIN jobs j ON j.id = e.job_id WHERE j.name = ? ORDER BY e.id", (name,))


def completions(home: Path) -> dict[str, int]:
    rows = query(home, """SELECT j.name, COUNT(e.id) AS n FROM jobs j
                          LEFT JOIN events e ON e.job_id = j.id AND e.to_state = 'completed' GROUP BY j.id""")
    return {r["name"]: int(r["n"]) for r in rows}


def integrity(home: Path) -> str:
    return str(query(home, "PRAGMA integrity_check")[0]["integrity_check"])


def status_json(home: Path) -> dict[str, Any]:
    return json.loads(loraq(home, "status", "--json").stdout)


def running_at_step(home: Path, min_step: int = 1) -> dict[str, Any] | None:
    """A running job that has recorded progress at or past ``min_step``."""
    rows = query(home, "SELECT * FROM jobs WHERE status = 'running' AND progress_step >= ? ORDER BY id", (min_step,))
    return rows[0] if rows else None


def checkpoint_steps(home: Path, job_id: int) -> list[int]:
    """Steps of the complete checkpoints on disk for a job, any attempt (via loraq.checkpoints)."""
    from loraq import checkpoints

    return [c.step for c in checkpoints.complete_checkpoints(home / "jobs" / str(job_id))]


# ---------------------------------------------------------------- checking what was published


def check_published(home: Path, names: set[str]) -> None:
    """``adapters/`` holds exactly ``names``, each complete: files match the manifest, the inspector passes."""
    from loraq import fsutil
    from loraq import inspect as inspector
    from loraq.supervisor import publish

    adapters = home / "adapters"
    found = {p.name for p in adapters.iterdir()}
    assert found == names, f"adapters/ holds {sorted(found)}, expected {sorted(names)}"
    for folder in adapters.iterdir():
        assert folder.is_dir() and not folder.is_symlink(), folder
        manifest = publish.read_manifest(folder)
        assert manifest is not None and manifest["name"] == folder.name, folder
        for file, facts in manifest["files"].items():
            assert (folder / file).stat().st_size == facts["bytes"], (folder, file)
            assert fsutil.sha256_file(folder / file) == facts["sha256"], (folder, file)
        report = inspector.inspect_adapter(folder)
        assert report.passed, (folder, [str(f) for f in report.findings])
