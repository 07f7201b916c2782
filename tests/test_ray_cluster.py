"""A real multi-node Ray cluster on this machine: jobs spread over the nodes, and a lost node loses nothing.

``ray.cluster_utils.Cluster`` starts a head that runs no trainer (0 CPUs) and three
worker nodes with one CPU each, so each of the two trainer actors lands on its own
node and a third has room for a replacement. One node is killed
(``remove_node(allow_graceful=False)``) while it trains a long job, after that
job's first checkpoint has reached the supervisor's home. Every job must end completed exactly once, the interrupted one resumed
from its checkpoint, and ``adapters/`` must hold only whole, valid adapters.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_DEFAULTS, write_queue
from loraq import api, checkpoints
from loraq.supervisor.worker import Worker, WorkerConfig
from loraq.workspace import Home

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Dead-node detection in about 4 s instead of the default 15 s (a health check each
# second, four missed in a row), lenient enough for a busy two-core machine.
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                   "health_check_timeout_ms": 2000, "health_check_failure_threshold": 4}

QUEUE = TINY_DEFAULTS + """
jobs:
  - name: long
    dataset: ./data/stories.jsonl
    priority: 10
    training: {max_steps: 90, save_steps: 4}
  - name: short-1
    dataset: ./data/support.jsonl
  - name: short-2
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
  - name: short-3
    dataset: ./data/stories.jsonl
"""


@pytest.fixture
def cluster() -> Any:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_NODE_DEATH})
    try:
        for _ in range(3):  # two trainers, and room for a replacement
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_node_lost_mid_job_loses_nothing(cluster: Any, workdir: Path) -> None:
    from loraq.inspect import inspect_adapter

    home = Home(workdir / ".loraq")
    api.submit(write_queue(workdir, QUEUE), home=home)
    started: list[tuple[str, str]] = []  # (job, node) in the order jobs started
    outcome: dict[str, Any] = {}

    def observer(event: api.RunEvent) -> None:
        if isinstance(event, api.JobStarted):
            started.append((event.name, event.event.node))

    def pull_the_plug() -> None:
        """Once the long job's first checkpoint is in the home, kill its node."""
        try:
            long_id = api.show(home, "long").job.id
            deadline = time.monotonic() + 120
            while (found := checkpoints.newest_complete(home.job_dir(long_id))) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("the long job never shipped a checkpoint")
                time.sleep(0.05)
            outcome["first_step"] = found.step
            outcome["doomed"] = doomed_id = next(node for name, node in started if name == "long")
            doomed = next(n for n in cluster.list_all_nodes() if n.node_id == doomed_id)
            assert doomed is not cluster.head_node
            cluster.remove_node(doomed, allow_graceful=False)
        except BaseException as exc:  # surfaced by the test below
            outcome["error"] = exc

    # The worker runs in this (main) thread, as under `loraq run`; the fault comes from beside it.
    killer = threading.Thread(target=pull_the_plug, name="node-killer", daemon=True)
    killer.start()
    executor = api.make_executor(home, api.RunOptions(executor="ray", devices="cpu,cpu"))
    with api.open_store(home, check=True) as store:
        summary = Worker(home, store, executor, observer=observer,
                         config=WorkerConfig(heartbeat_s=0.5, poll_s=0.05)).run()
    killer.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert "doomed" in outcome, "the node was never removed"
    doomed_id, first_step = outcome["doomed"], outcome["first_step"]
    assert sorted(summary.completed) == ["long", "short-1", "short-2", "short-3"], summary

    # Jobs spread over both worker nodes; the head ran none.
    nodes_before = {node for _, node in started[:2]}
    assert len(nodes_before) == 2 and cluster.head_node.node_id not in nodes_before

    # Every job completed exactly once.
    with api.open_store(home, create=False) as store:
        for job in store.jobs():
            assert job.status == "completed", job
            assert sum(1 for e in store.events(job.id) if e.to_state == "completed") == 1, job.name
            if job.name != "long":
                assert job.attempts == 1, job.name
        attempts = store.attempts("long")

    # The interrupted job died with its node and resumed elsewhere from a shipped checkpoint.
    assert [a.error_kind for a in attempts[:-1]] == ["died"], attempts
    assert attempts[-1].outcome == "completed"
    assert attempts[-1].resumed_from_step is not None and attempts[-1].resumed_from_step >= first_step > 0
    rerun_node = [node for name, node in started if name == "long"][-1]
    assert rerun_node != doomed_id
    assert api.show(home, "long").job.progress_step == 90

    # Nothing torn in adapters/: only whole folders, each passing inspection.
    assert sorted(p.name for p in home.adapters_dir.iterdir()) == ["long", "short-1", "short-2", "short-3"]
    for folder in home.adapters_dir.iterdir():
        assert (folder / "loraq-manifest.json").is_file()
        assert inspect_adapter(folder).passed, folder.name
    log = api.log_path(home, "long", attempt=len(attempts)).read_text()
    assert "step 90/90" in log

