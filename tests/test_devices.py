"""Several devices: a trainer process per device, each pinned, all pulling from one queue."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import LORAQ, TINY_DEFAULTS, write_queue
from loraq.errors import UsageError
from loraq.executors.base import Slot, parse_devices, trainer_env, usable_cores
from loraq.queue.store import Store


@pytest.mark.parametrize(("given", "devices"), [
    ("0,1", ["0", "1"]), ("cpu,cpu", ["cpu", "cpu"]), ("cpu", ["cpu"]), ("cuda:1, 3", ["1", "3"]),
])
def test_devices_parse(given: str, devices: list[str]) -> None:
    assert parse_devices(given) == devices


@pytest.mark.parametrize("given", ["gpu0", "0,,x", "-1", ","])
def test_bad_devices_are_usage_errors_that_name_the_option(given: str) -> None:
    with pytest.raises(UsageError, match="--devices"):
        parse_devices(given)


def test_no_devices_means_every_visible_gpu_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert parse_devices(None) == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert parse_devices(None) == ["cpu"]


def test_each_trainer_is_pinned_to_its_device_and_cpu_trainers_share_the_cores() -> None:
    gpus = [Slot(0, "0"), Slot(1, "1")]
    assert trainer_env("1", gpus, {"CUDA_VISIBLE_DEVICES": "0,1"})["CUDA_VISIBLE_DEVICES"] == "1"
    assert "OMP_NUM_THREADS" not in trainer_env("1", gpus, {})
    cpus = [Slot(0, "cpu"), Slot(1, "cpu")]
    env = trainer_env("cpu", cpus, {"CUDA_VISIBLE_DEVICES": "0"})
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU trainer sees no GPU at all
    assert env["OMP_NUM_THREADS"] == str(max(1, usable_cores() // 2))
    assert trainer_env("cpu", cpus, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"  # the operator's choice stands
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # no spinning threads on cores other work needs
    assert trainer_env("cpu", cpus, {"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
    assert "OMP_WAIT_POLICY" not in trainer_env("1", gpus, {})


SIX_JOBS = TINY_DEFAULTS + "jobs:\n" + "".join(
    f"  - name: job-{i}\n    dataset: {{path: ./data/sql.jsonl, format: prompt_completion}}\n    training: {{seed: {i}}}\n"
    for i in range(6)
)


@pytest.mark.slow
def test_two_cpu_trainers_share_one_queue_and_every_job_completes_once(workdir: Path) -> None:
    home = workdir / ".loraq"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}

    def loraq(*args: str) -> str:
        done = subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, f"loraq {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    loraq("submit", str(write_queue(workdir, SIX_JOBS)))
    loraq("run", "--devices", "cpu,cpu", "--quiet")

    with Store.open(home / "loraq.db", create=False) as store:
        jobs = store.jobs()
        assert sorted(j.name for j in jobs) == [f"job-{i}" for i in range(6)]
        placements = []
        for job in jobs:
            assert (job.status, job.attempts) == ("completed", 1)
            transitions = [(e.from_state, e.to_state) for e in store.events(job.id)]
            assert transitions == [(None, "pending"), ("pending", "running"), ("running", "completed")]
            placements.append((job.result["pid"], job.result["cuda_visible_devices"], job.result["torch_threads"]))
    pids = {pid for pid, _, _ in placements}
    assert len(pids) == 2  # the jobs were spread over both trainer processes
    assert {(visible, threads) for _, visible, threads in placements} == {("", max(1, usable_cores() // 2))}
    assert sorted(p.name for p in (home / "adapters").iterdir()) == [f"job-{i}" for i in range(6)]
    assert not list(home.glob("adapters/.*"))  # nothing half-published
