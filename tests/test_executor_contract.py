"""One contract, every executor: what the worker relies on holds for local processes and Ray actors alike.

Each test runs against every executor ("scripted": stand-in trainers that do not
train, tests/scripted_trainers.py, on the fast tier; "local": a trainer process per
device, and "ray": a Ray actor per device on one Ray instance shared by this module,
both on the slow tier). The worker, the store and the files on disk must not be able
to tell them apart: a queue completes, a cancelled job stops, a trainer killed
mid-job is retried and resumes from its checkpoint, and the results have the same shape.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import scripted_trainers
from conftest import THREE_JOBS, TINY_DEFAULTS, write_queue
from loraq import api, checkpoints
from loraq.queue.store import WorkerId
from loraq.supervisor.worker import RunSummary, Worker, WorkerConfig
from loraq.workspace import Home

KINDS = ["scripted", pytest.param("local", marks=pytest.mark.slow),
         pytest.param("ray", marks=[pytest.mark.slow, pytest.mark.ray])]


@pytest.fixture(scope="module")
def ray_instance() -> Any:
    """One local Ray instance for the module's Ray tests, stopped when they are done."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_instance")
    return request.param


def run_queue(kind: str, home: Home, *, devices: str = "cpu", observer: api.Observer | None = None,
              on_executor: Callable[[Any], None] | None = None) -> RunSummary:
    """Work the queue with a worker on ``kind``'s executor (what `loraq run --executor KIND` does)."""
    if kind == "scripted":
        executor: Any = scripted_trainers.make(devices, home)
    else:
        executor = api.make_executor(home, api.RunOptions(executor=kind, devices=devices))
    if on_executor:
        on_executor(executor)
    config = WorkerConfig(heartbeat_s=0.5, poll_s=0.05)
    with api.open_store(home, check=True) as store:
        return Worker(home, store, executor, config=config, observer=observer,
                      worker_id=WorkerId.current()).run()


def submit(work: Path, body: str) -> Home:
    home = Home(work / ".loraq")
    api.submit(write_queue(work, body), home=home)
    return home


def jobs_by_name(home: Home) -> dict[str, dict[str, Any]]:
    return {j["name"]: j for j in api.status(home).to_json()["jobs"]}


def completions(home: Home, name: str) -> int:
    with api.open_store(home, create=False) as store:
        return sum(1 for e in store.events(name) if e.to_state == "completed")


# ---------------------------------------------------------------- a queue completes


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_datasets: dict[str, Path]) -> Callable[[str], Home]:
    """The three-job queue run once per executor (lazily), shared by the tests that read its results."""
    import shutil

    homes: dict[str, Home] = {}

    def get(kind: str) -> Home:
        if kind not in homes:
            work = tmp_path_factory.mktemp(f"contract-{kind}")
            shutil.copytree(tiny_model, work / "models" / "tiny")
            (work / "data").mkdir()
            for path in demo_datasets.values():
                shutil.copy(path, work / "data" / path.name)
            home = submit(work, THREE_JOBS)
            summary = run_queue(kind, home, devices="cpu,cpu")
            assert sorted(summary.completed) == ["chat-bot", "sql-writer", "stories"], summary
            homes[kind] = home
        return homes[kind]

    return get


def test_a_queue_completes(kind: str, finished: Callable[[str], Home]) -> None:
    from loraq.inspect import inspect_adapter

    home = finished(kind)
    jobs = jobs_by_name(home)
    assert {n: (j["status"], j["attempts"], j["verdict"]) for n, j in jobs.items()} == {
        n: ("completed", 1, "pass") for n in ("chat-bot", "sql-writer", "stories")}
    for name, job in jobs.items():
        assert job["progress"] == {"step": 6, "total": 6}
        assert completions(home, name) == 1
        assert inspect_adapter(home.adapter_dir(name)).passed
        log = api.log_path(home, name).read_text()
        assert "step 6/6" in log and "checkpoint saved at step 3" in log and "done: eval loss" in log
    # Nothing half-written or left behind: only whole adapters, no checkpoints or staging.
    assert sorted(p.name for p in home.adapters_dir.iterdir()) == ["chat-bot", "sql-writer", "stories"]
    assert not list(home.jobs_dir.glob("*/attempt-*/checkpoints"))
    assert not list(home.jobs_dir.glob("*/attempt-*/staging"))


@pytest.mark.slow
@pytest.mark.ray
def test_results_are_identical_in_shape(finished: Callable[[str], Home], request: pytest.FixtureRequest) -> None:
    pytest.importorskip("ray")
    request.getfixturevalue("ray_instance")
    local, ray = finished("local"), finished("ray")

    def shape(home: Home) -> dict[str, Any]:
        out = {}
        for name in ("chat-bot", "sql-writer", "stories"):
            shown = api.show(home, name).to_json()
            folder = home.adapter_dir(name)
            out[name] = {
                "status_keys": sorted(jobs_by_name(home)[name]),
                "show_keys": sorted(shown),
                "result_keys": sorted(shown["job"]["result"]),
                "attempt_keys": sorted(shown["attempts"][0]),
                "files": sorted(p.name for p in folder.iterdir()),
                "manifest_keys": sorted(json.loads((folder / "loraq-manifest.json").read_text())),
                "inspection_keys": sorted(json.loads((folder / "inspection.json").read_text())),
                "metrics": sorted({m["name"] for m in shown["metrics"]}),
                "transitions": [(e["from_state"], e["to_state"]) for e in shown["events"]],
                "home_files": sorted(str(p.relative_to(home.root / "jobs")).split("/", 1)[1]
                                     for p in (home.root / "jobs").rglob("*") if p.is_file()),
            }
        return out

    assert shape(ray) == shape(local)


# ---------------------------------------------------------------- a cancelled job stops


def test_a_cancelled_job_stops(kind: str, workdir: Path) -> None:
    home = submit(workdir, TINY_DEFAULTS + """
jobs:
  - name: long
    dataset: ./data/stories.jsonl
    training: {max_steps: 400, save_steps: 100}
""")
    steps: list[int] = []

    def observer(event: api.RunEvent) -> None:
        if isinstance(event, api.JobProgress) and event.name == "long":
            steps.append(event.event.step)
            if len(steps) == 2:
                api.cancel(home, ["long"])

    t0 = time.monotonic()
    summary = run_queue(kind, home, observer=observer)
    job = jobs_by_name(home)["long"]
    assert job["status"] == "cancelled", job
    assert summary.completed == [] and summary.failed == []
    assert max(steps) < 400  # stopped mid-job, not run to its end
    assert not home.adapter_dir("long").exists()
    assert time.monotonic() - t0 < 120


# ---------------------------------------------------------------- a killed trainer is retried


def test_a_trainer_killed_mid_job_is_retried_and_resumes(kind: str, workdir: Path) -> None:
    home = submit(workdir, TINY_DEFAULTS + """
jobs:
  - name: victim
    dataset: ./data/support.jsonl
    training: {max_steps: 40, save_steps: 3}
""")
    holder: dict[str, Any] = {}
    killed: list[int] = []

    def observer(event: api.RunEvent) -> None:
        # Step 4's progress comes after checkpoint 3 has been stored in the home (events keep their order).
        if isinstance(event, api.JobProgress) and event.event.step >= 4 and not killed:
            executor = holder["executor"]
            slot = next(s for s in getattr(executor, "all_slots", executor.slots) if s.job_id is not None)
            assert checkpoints.newest_complete(home.job_dir(slot.job_id)) is not None
            pid = executor.pid(slot)
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    summary = run_queue(kind, home, observer=observer, on_executor=lambda e: holder.update(executor=e))
    assert killed, "the trainer was never killed"
    assert summary.completed == ["victim"]
    job = jobs_by_name(home)["victim"]
    assert (job["status"], job["attempts"], job["progress"]["step"]) == ("completed", 2, 40)
    assert completions(home, "victim") == 1
    attempts = api.show(home, "victim").attempts
    assert attempts[0].outcome != "completed" and attempts[0].error_kind == "died"
    assert attempts[1].outcome == "completed" and (attempts[1].resumed_from_step or 0) >= 3
    manifest = json.loads((home.adapter_dir("victim") / "loraq-manifest.json").read_text())
    assert Path(manifest["resumed_from"]).is_relative_to(home.jobs_dir)  # a home path, never a node's scratch


# ---------------------------------------------------------------- a lost lease fences the old run out


def test_a_run_whose_lease_was_lost_completes_nothing_and_the_job_completes_once(kind: str, workdir: Path) -> None:
    from loraq.queue.store import Store

    home = submit(workdir, TINY_DEFAULTS + """
jobs:
  - name: fenced
    dataset: ./data/sql.jsonl
    training: {max_steps: 60, save_steps: 3}
""")
    expired: list[int] = []

    def observer(event: api.RunEvent) -> None:
        # As if this worker had been frozen past its lease: its lease runs out and a sweep
        # puts the job back in the queue while the trainer is still training.
        if isinstance(event, api.JobProgress) and event.event.step >= 4 and not expired:
            with Store.open(home.db_path, create=False) as other:
                job = other.job("fenced")
                other.heartbeat(job.id, job.epoch, lease_s=-1.0)
                expired.extend(other.expire_leases())

    summary = run_queue(kind, home, observer=observer)
    assert expired, "the lease never expired"
    assert summary.completed == ["fenced"]
    assert completions(home, "fenced") == 1
    attempts = api.show(home, "fenced").attempts
    assert [a.error_kind for a in attempts] == ["lost", None] and attempts[1].outcome == "completed"
    manifest = json.loads((home.adapter_dir("fenced") / "loraq-manifest.json").read_text())
    assert (manifest["attempt"], manifest["epoch"]) == (2, attempts[1].epoch)  # published by the new owner only


# ---------------------------------------------------------------- the stand-in keeps the protocol


def test_the_scripted_trainers_keep_the_executor_protocol() -> None:
    """The fast tier's stand-in answers every call the worker makes, with the parameters the real executors take."""
    import inspect

    from loraq.executors.base import Executor
    from loraq.executors.local import LocalExecutor

    for name in ("start", "submit", "poll", "stop_job", "kill", "recycle", "shutdown"):
        want = [(p.name, p.kind) for p in inspect.signature(getattr(Executor, name)).parameters.values()]
        for executor in (scripted_trainers.ScriptedTrainers, LocalExecutor):
            got = [(p.name, p.kind) for p in inspect.signature(getattr(executor, name)).parameters.values()]
            assert got[: len(want)] == want, (executor.__name__, name)
    assert isinstance(scripted_trainers.ScriptedTrainers([], log_dir=Path(".")).slots, list)
