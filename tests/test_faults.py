"""Fault injection along a publish and a checkpoint: the target is the old content or the new, never a mix.

Every durable write goes through ``fsutil.ops``. :class:`Faults` makes the k-th of
those calls (create, write, fsync, replace, rename) fail, for every k along the
operation, in three ways:

- ``once``: that call fails with EIO or ENOSPC (a full disk), later calls work;
- ``always``: that call and every later one fail (the disk stays full);
- ``crash``: the process is "killed" just before that call. The home (files and
  ``loraq.db``) is copied at that instant, which is exactly what a restarted
  worker would find, and a restart is run on the copy.

After each fault the folder a reader or a restart can see is checked (absent, or
complete with a manifest that matches its files), then the disk is "freed" and a
restart must finish the job exactly once. Real files and a real SQLite store; no
torch. The totals are printed for docs/reliability.md (``pytest -s``).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import adapters
from loraq import checkpoints, fsutil
from loraq.queue.store import COMPLETED, PENDING, RUNNING, Claim, NewJob, Store, WorkerId
from loraq.supervisor import publish
from loraq.supervisor.worker import Worker
from loraq.workspace import Home

ADAPTER_FILES = {publish.CONFIG, publish.WEIGHTS, publish.MANIFEST, publish.INSPECTION, publish.MODEL_CARD}
ERRORS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}
SUMMARY: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def fault_summary() -> Any:
    """Once the module's tests are done: the figures for docs/reliability.md (printed under -s,
    and written to $LORAQ_RELIABILITY_OUT/faults.json when that is set)."""
    yield
    if SUMMARY:
        print("\nfault summary: " + json.dumps(dict(sorted(SUMMARY.items()))))
        out = os.environ.get("LORAQ_RELIABILITY_OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "faults.json").write_text(json.dumps(dict(sorted(SUMMARY.items())), indent=2) + "\n")


class Killed(BaseException):
    """Stands for a kill -9: nothing after it runs in the process (the test only looks at the copy)."""


class Faults(fsutil.FileOps):
    """Fails (or "kills" the process at) the k-th durable-write call."""

    def __init__(self, k: int, mode: str = "once", err: int = errno.EIO, on_crash: Any = None) -> None:
        self.k, self.mode, self.err, self.on_crash = k, mode, err, on_crash
        self.calls = 0
        self.injected: str | None = None  # the call that failed, e.g. "rename"

    def _tick(self, what: str) -> None:
        self.calls += 1
        if self.calls == self.k or (self.mode == "always" and self.calls > self.k):
            self.injected = self.injected or what
            if self.mode == "crash":
                self.on_crash()
                raise Killed(what)
            raise OSError(self.err, f"injected: {os.strerror(self.err)}")

    def open_write(self, path: Path) -> int:
        self._tick("create")
        return super().open_write(path)

    def write(self, fd: int, data: bytes) -> int:
        self._tick("write")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._tick("fsync")
        super().fsync(fd)

    def replace(self, src: Path, dst: Path) -> None:
        self._tick("replace")
        super().replace(src, dst)

    def rename(self, src: Path, dst: Path) -> None:
        self._tick("rename")
        super().rename(src, dst)


@functools.cache
def dead_pid() -> int:
    """The pid of a process that has exited (a killed worker's)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def resolved_spec(name: str) -> dict[str, Any]:
    """What the store keeps for a job (spec.ResolvedJob as JSON), enough for a manifest."""
    return {"spec": {"name": name, "dataset": {"path": "./data/sql.jsonl", "format": "prompt_completion"},
                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                     "training": {"max_steps": 6, "learning_rate": 0.005, "batch_size": 8, "grad_accum": 1, "seed": 3},
                     "validation": {"split": 0.1, "min_eval_loss_drop": 0.0}},
            "base_model": "/models/tiny", "dataset_path": "/data/sql.jsonl", "queue_file": "/q.yaml"}


RESULT = {"train_loss": 1.5, "eval_loss": 1.2, "base_eval_loss": 2.0, "steps": 6, "versions": {"loraq": "test"}}
INSPECTION = {"passed": True, "findings": []}


@dataclass
class Setup:
    home: Home
    store: Store
    claim: Claim
    staging: Path
    files: dict[str, bytes] = field(default_factory=dict)


def setup_publish(root: Path) -> Setup:
    """A home with one running job whose trainer has left a finished adapter in staging."""
    home = Home(root / "home")
    home.ensure()
    store = Store.open(home.db_path)
    store.enqueue([NewJob(name="sql-writer", spec=resolved_spec("sql-writer"), base_key="tiny", dataset_sha256="0" * 64)])
    claim = store.claim(WorkerId(socket.gethostname(), dead_pid(), "old"), lease_s=3600)
    assert claim is not None
    staging = home.attempt_dir(claim.job.id, claim.attempt) / "staging"
    adapters.synthetic(staging)
    files = {p.name: p.read_bytes() for p in staging.iterdir()}
    return Setup(home, store, claim, staging, files)


def finish(s: Setup) -> Path:
    """What the worker does once a trainer is done and the inspector passed (Worker._finish)."""
    manifest = publish.build_manifest(s.claim, RESULT, s.staging, home_id=s.store.home_id())
    publish.stage_metadata(s.staging, manifest, INSPECTION)
    return publish.publish(s.store, s.home, s.claim, s.staging, RESULT)


def assert_old_or_new(home: Home, name: str, weights: bytes) -> bool:
    """``adapters/<name>`` is absent (old) or complete (new); nothing temporary is visible. Returns: published?"""
    adapters_dir = home.adapters_dir
    visible = [p.name for p in adapters_dir.iterdir() if not p.name.startswith(fsutil.TMP_PREFIX)]
    assert visible in ([], [name]), visible
    target = adapters_dir / name
    if not target.exists():
        return False
    assert {p.name for p in target.iterdir()} == ADAPTER_FILES, sorted(p.name for p in target.iterdir())
    manifest = publish.read_manifest(target)
    assert manifest is not None and manifest["job_id"] == 1
    for file, facts in manifest["files"].items():
        assert fsutil.sha256_file(target / file) == facts["sha256"]
    assert (target / publish.WEIGHTS).read_bytes() == weights
    assert json.loads((target / publish.INSPECTION).read_text())["passed"] is True
    return True


class _NoExecutor:
    slots: list[Any] = []


def restart(home: Home) -> Store:
    """A new worker on this host starts: it reconciles, then works the job to the end."""
    store = Store.open(home.db_path, check=True)
    assert store.integrity_check() == "ok"
    worker = Worker(home, store, _NoExecutor())  # type: ignore[arg-type]
    worker.reconcile()
    job = store.job("sql-writer")
    if job.status == RUNNING:  # only if the owner is alive: never here, every owner was "killed"
        raise AssertionError("a job of a dead worker is still running after reconcile")
    if job.status == PENDING:
        store.conn.execute("UPDATE jobs SET not_before = 0")  # skip the retry backoff
        claim = store.claim(worker.id, lease_s=60)
        assert claim is not None
        if publish.adopt_published(store, home, claim) is None:
            # A new attempt trains again (here: writes the same adapter) and publishes.
            staging = home.attempt_dir(claim.job.id, claim.attempt) / "staging"
            assert not staging.exists()
            adapters.synthetic(staging)
            finish(Setup(home, store, claim, staging))
    return store


def assert_done_once(home: Home, store: Store, weights: bytes) -> None:
    job = store.job("sql-writer")
    assert job.status == COMPLETED, (job.status, job.error)
    assert [e.to_state for e in store.events(job.id)].count(COMPLETED) == 1
    assert assert_old_or_new(home, "sql-writer", weights)
    assert not [p for p in home.adapters_dir.iterdir() if p.name.startswith(fsutil.TMP_PREFIX)]
    assert not list(home.jobs_dir.glob("*/attempt-*/staging"))
    assert store.integrity_check() == "ok"


def count_calls(run: Any) -> int:
    counter = Faults(k=10**9)
    with fsutil.use_ops(counter):
        run()
    return counter.calls


# ---------------------------------------------------------------- publish


def test_publish_faults_at_every_call(tmp_path: Path) -> None:
    probe = setup_publish(tmp_path / "probe")
    n = count_calls(lambda: finish(probe))
    probe.store.close()
    assert n >= 15  # three metadata files, the tree's fsyncs, the rename

    outcomes: Counter[str] = Counter()
    for mode in ("once", "always", "crash"):
        for err_name, err in ERRORS.items():
            if mode == "crash" and err_name != "EIO":
                continue  # a kill has no errno
            for k in range(1, n + 2):  # n + 1: the fault would come after the last call
                root = tmp_path / f"{mode}-{err_name}-{k}"
                s = setup_publish(root)
                weights = s.files[publish.WEIGHTS]
                snapshot = root / "after-kill"

                def copy_home(s: Setup = s, snapshot: Path = snapshot) -> None:
                    shutil.copytree(s.home.root, snapshot / "home")

                faults = Faults(k, mode, err, on_crash=copy_home)
                raised: BaseException | None = None
                with fsutil.use_ops(faults):
                    try:
                        finish(s)
                    except (OSError, Killed) as exc:
                        raised = exc
                if mode == "crash":
                    s.store.close()
                    if raised is None:
                        shutil.copytree(s.home.root, snapshot / "home")
                    home = Home(snapshot / "home")
                else:
                    home = s.home
                    published = assert_old_or_new(home, "sql-writer", weights)
                    job = s.store.job("sql-writer")
                    # Completed exactly when the publish returned; never completed without an adapter.
                    assert (job.status == COMPLETED) == (raised is None), (mode, k, job.status, raised)
                    assert published or job.status != COMPLETED
                    if raised is not None:
                        # The worker ends the attempt as a retryable I/O failure.
                        s.store.fail(s.claim.job.id, s.claim.epoch, kind="io", reason=f"cannot publish: {raised}",
                                     retryable=True)
                    s.store.close()
                    assert_old_or_new(home, "sql-writer", weights)
                store = restart(home)
                assert_done_once(home, store, weights)
                recovered_by = "adopted" if (store.job("sql-writer").result or {}).get("recovered") else "published"
                store.close()
                if raised is not None:
                    outcomes[f"{mode}:{faults.injected}"] += 1
                    SUMMARY["publish faults injected"] += 1
                    SUMMARY[f"publish recovered ({recovered_by})"] += 1
    assert outcomes["crash:rename"] >= 1 and outcomes["once:fsync"] >= 1
    SUMMARY["publish fault points"] = n
    print(f"\npublish: {n} write calls; faults {dict(outcomes)}")


def test_a_kill_between_rename_and_commit_completes_once_on_restart(tmp_path: Path) -> None:
    """The one window that matters most, spelled out: the adapter is in adapters/, the store says running."""
    s = setup_publish(tmp_path)
    weights = s.files[publish.WEIGHTS]
    snapshot = tmp_path / "after-kill"

    class KillAfterRename(fsutil.FileOps):
        def rename(self, src: Path, dst: Path) -> None:
            super().rename(src, dst)
            if dst.parent == s.home.adapters_dir:
                shutil.copytree(s.home.root, snapshot)
                raise Killed("after the rename")

    with fsutil.use_ops(KillAfterRename()), pytest.raises(Killed):
        finish(s)
    s.store.close()
    home = Home(snapshot)
    before = Store.open(home.db_path)
    assert before.job("sql-writer").status == RUNNING
    before.close()
    store = restart(home)
    assert_done_once(home, store, weights)
    assert store.job("sql-writer").result["recovered"] is True
    # A second restart changes nothing.
    store.close()
    store = restart(home)
    assert_done_once(home, store, weights)
    store.close()


def test_reconcile_tolerates_an_owner_that_commits_the_publish_first(tmp_path: Path) -> None:
    """A worker starting while another, live one publishes: the live one wins, nobody crashes."""
    s = setup_publish(tmp_path)
    manifest = publish.build_manifest(s.claim, RESULT, s.staging, home_id=s.store.home_id())
    publish.stage_metadata(s.staging, manifest, INSPECTION)
    fsutil.publish_dir(s.staging, s.home.adapter_dir("sql-writer"))  # renamed, not yet committed
    starting = Worker(s.home, Store.open(s.home.db_path), _NoExecutor())  # type: ignore[arg-type]
    real_jobs = starting.store.jobs

    def jobs_then_owner_commits(status: str | None = None) -> Any:
        listed = real_jobs(status)
        if status == RUNNING:  # the owner's commit lands between the listing and the completion
            s.store.complete(s.claim.job.id, s.claim.epoch, result=RESULT)
        return listed

    starting.store.jobs = jobs_then_owner_commits  # type: ignore[method-assign]
    starting.reconcile()
    assert [e.to_state for e in s.store.events(1)].count(COMPLETED) == 1
    starting.store.close()
    s.store.close()


# ---------------------------------------------------------------- checkpoints


def hf_checkpoint(folder: Path, step: int, seed: int) -> Path:
    """A checkpoint folder shaped like the one transformers' Trainer writes for a PEFT model."""
    adapters.synthetic(folder, seed=seed)
    rng = __import__("random").Random(seed)
    for name, size in (("optimizer.pt", 9000), ("scheduler.pt", 1100), ("rng_state.pth", 14000),
                       ("training_args.bin", 5200)):
        (folder / name).write_bytes(rng.randbytes(size))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (folder / "README.md").write_text("model card\n")
    return folder


def checkpoint_setup(root: Path) -> tuple[Path, Path, Path]:
    job_dir = root / "jobs" / "1"
    old = hf_checkpoint(job_dir / "attempt-1" / "checkpoints" / "checkpoint-4", 4, seed=4)
    checkpoints.mark_complete(old, step=4)
    new = hf_checkpoint(job_dir / "attempt-2" / "checkpoints" / "checkpoint-8", 8, seed=8)
    return job_dir, old, new


def assert_checkpoints_sane(job_dir: Path, old: Path, new: Path) -> Path:
    """The newest usable checkpoint is the old one or the complete new one; the old one is untouched."""
    assert checkpoints.is_complete(old)
    newest = checkpoints.newest_complete(job_dir)
    assert newest is not None and newest.path in (old, new)
    if newest.path == new:
        marker = json.loads((new / checkpoints.MARKER).read_text())
        on_disk = {p.name: p.stat().st_size for p in new.iterdir()
                   if p.name != checkpoints.MARKER and not p.name.startswith(fsutil.TMP_PREFIX)}
        assert marker["files"] == on_disk and marker["step"] == 8
    else:
        assert not checkpoints.is_complete(new)
    return newest.path


def test_checkpoint_marker_faults_at_every_call(tmp_path: Path) -> None:
    job_dir, _old, new = checkpoint_setup(tmp_path / "probe")
    n = count_calls(lambda: checkpoints.mark_complete(new, step=8))
    assert n >= 10

    outcomes: Counter[str] = Counter()
    for mode in ("once", "always", "crash"):
        for err_name, err in ERRORS.items():
            if mode == "crash" and err_name != "EIO":
                continue
            for k in range(1, n + 2):
                root = tmp_path / f"{mode}-{err_name}-{k}"
                job_dir, old, new = checkpoint_setup(root)
                snapshot = root / "after-kill"
                faults = Faults(k, mode, err, on_crash=lambda job_dir=job_dir, snapshot=snapshot:
                                shutil.copytree(job_dir, snapshot))
                with fsutil.use_ops(faults):
                    try:
                        checkpoints.mark_complete(new, step=8)
                        raised = False
                    except (OSError, Killed):
                        raised = True
                if mode == "crash" and raised:
                    job_dir = snapshot
                    old = snapshot / old.relative_to(root / "jobs" / "1")
                    new = snapshot / new.relative_to(root / "jobs" / "1")
                newest = assert_checkpoints_sane(job_dir, old, new)
                if not raised:
                    assert newest == new
                # What the next attempt does: drop what is incomplete, resume from its own copy.
                checkpoints.remove_incomplete(job_dir, except_attempt=3)
                resumed = checkpoints.snapshot_for_resume(job_dir, job_dir / "attempt-3" / "resume")
                assert resumed is not None and resumed.step == (8 if newest == new else 4)
                assert checkpoints.is_complete(resumed.path)
                if raised:
                    outcomes[f"{mode}:{faults.injected}"] += 1
                    SUMMARY["checkpoint faults injected"] += 1
    SUMMARY["checkpoint fault points"] = n
    print(f"\ncheckpoint marker: {n} write calls; faults {dict(outcomes)}")


def test_resume_snapshot_under_faults_is_complete_or_refused(tmp_path: Path) -> None:
    job_dir, _old, new = checkpoint_setup(tmp_path / "probe")
    checkpoints.mark_complete(new, step=8)
    n = count_calls(lambda: checkpoints.snapshot_for_resume(job_dir, tmp_path / "probe-resume"))
    for k in range(1, n + 2):
        for mode in ("once", "always"):
            job_dir, old, new = checkpoint_setup(tmp_path / f"{mode}-{k}")
            checkpoints.mark_complete(new, step=8)
            into = tmp_path / f"{mode}-{k}" / "resume"
            with fsutil.use_ops(Faults(k, mode, errno.ENOSPC)):
                try:
                    got = checkpoints.snapshot_for_resume(job_dir, into)
                except OSError:
                    got = None
            if got is not None:
                assert checkpoints.is_complete(got.path) and got.step in (4, 8)
                SUMMARY["resume snapshot fell back" if got.step == 4 else "resume snapshot ok"] += 1
            # Never a half-made copy under a name a trainer would load.
            for folder in into.glob("checkpoint-*") if into.exists() else []:
                assert checkpoints.is_complete(folder)


def test_a_cut_or_damaged_checkpoint_is_skipped(tmp_path: Path) -> None:
    job_dir = tmp_path / "jobs" / "1"
    good = hf_checkpoint(job_dir / "attempt-1" / "checkpoints" / "checkpoint-3", 3, seed=3)
    checkpoints.mark_complete(good, step=3)
    cut = hf_checkpoint(job_dir / "attempt-1" / "checkpoints" / "checkpoint-6", 6, seed=6)  # no marker: killed
    truncated = hf_checkpoint(job_dir / "attempt-2" / "checkpoints" / "checkpoint-9", 9, seed=9)
    checkpoints.mark_complete(truncated, step=9)
    with open(truncated / "optimizer.pt", "r+b") as fh:
        fh.truncate(100)
    garbage = hf_checkpoint(job_dir / "attempt-2" / "checkpoints" / "checkpoint-12", 12, seed=12)
    (garbage / checkpoints.MARKER).write_text("{not json")
    missing = hf_checkpoint(job_dir / "attempt-3" / "checkpoints" / "checkpoint-15", 15, seed=15)
    checkpoints.mark_complete(missing, step=15)
    (missing / "rng_state.pth").unlink()
    assert [c.step for c in checkpoints.complete_checkpoints(job_dir)] == [3]
    assert checkpoints.newest_complete(job_dir).path == good
    removed = checkpoints.remove_incomplete(job_dir, except_attempt=3)
    assert set(removed) == {cut, truncated, garbage}  # attempt 3 is the running one: its folders are its own
    assert good.exists() and missing.exists()


def test_prune_keeps_the_two_newest_and_a_snapshot_outlives_its_original(tmp_path: Path) -> None:
    job_dir = tmp_path / "jobs" / "1"
    for attempt, step in ((1, 2), (1, 4), (2, 6), (2, 8)):
        folder = hf_checkpoint(job_dir / f"attempt-{attempt}" / "checkpoints" / f"checkpoint-{step}", step, seed=step)
        checkpoints.mark_complete(folder, step=step)
    snap = checkpoints.snapshot_for_resume(job_dir, job_dir / "attempt-3" / "resume")
    assert snap is not None and snap.step == 8
    pruned = checkpoints.prune(job_dir, keep=2)
    assert sorted(p.name for p in pruned) == ["checkpoint-2", "checkpoint-4"]
    assert [c.step for c in checkpoints.complete_checkpoints(job_dir)] == [6, 8]
    # A stale trainer of attempt 2 deletes its checkpoint while attempt 3 is about to load it.
    shutil.rmtree(job_dir / "attempt-2" / "checkpoints" / "checkpoint-8")
    assert checkpoints.is_complete(snap.path)
    assert (snap.path / "optimizer.pt").stat().st_size == 9000


@pytest.mark.timeout(120)  # the busy timeout is 0.5 s: a hang here is the bug, not a slow machine
def test_a_writer_frozen_inside_a_transaction_is_named_not_a_raw_locked_error(tmp_path: Path, monkeypatch) -> None:
    """SQLite cannot take a lock from a frozen holder; loraq says who it is and what to do."""
    import signal

    from loraq.errors import StoreError
    from loraq.queue import store as store_module

    db = tmp_path / "loraq.db"
    Store.open(db).close()
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
                               "c.execute('BEGIN IMMEDIATE'); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)
        monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.5)
        store = Store.open(db)  # opening needs no write lock
        assert store.jobs() == []  # nor does reading (WAL)
        with pytest.raises(StoreError) as caught:
            store.pause("maintenance")
        message = str(caught.value)
        assert f"process {holder.pid}" in message and f"kill -CONT {holder.pid}" in message
        assert "database is locked" not in message
        store.close()
    finally:
        holder.kill()
        holder.wait()
