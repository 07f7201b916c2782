"""`loraq run --executor ray` through the command line, on a Ray instance it starts itself.

Ctrl-C (SIGINT to the terminal's process group) asks the trainer actor to
checkpoint and stop: the job goes back to the queue without using an attempt,
the checkpoint is in the home, and the local Ray instance loraq started is gone
with every process it had. The next run resumes from that checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import LORAQ, TINY_DEFAULTS, write_queue
from test_preference import pairs_rows, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.ray]

QUEUE = TINY_DEFAULTS + """
jobs:
  - name: long
    dataset: ./data/stories.jsonl
    training: {max_steps: 120, save_steps: 5}
  - name: prefs
    dataset: ./data/pairs.jsonl
    method: dpo
"""


def test_ctrl_c_stops_the_actor_cleanly_and_the_next_run_resumes(workdir: Path) -> None:
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("ray")
    home = workdir / ".loraq"
    queue = write_queue(workdir, QUEUE)
    write_jsonl(workdir / "data" / "pairs.jsonl", pairs_rows(20))  # a DPO job trains in the Ray actor too
    subprocess.run([LORAQ, "--home", str(home), "submit", str(queue)], check=True, capture_output=True)

    out = workdir / "run.out"
    with open(out, "wb") as fh:
        # Its own session and process group: SIGINT to the group is a Ctrl-C in its terminal.
        run = subprocess.Popen([LORAQ, "--home", str(home), "run", "--executor", "ray", "--devices", "cpu"],
                               stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "step 12/120" not in out.read_text(errors="replace"):
            assert run.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        started = {p.pid for p in psutil.Process(run.pid).children(recursive=True)}  # gcs, raylet, actor ...
        assert started
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=90) == 130, out.read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    text = out.read_text()
    assert "back in the queue" in text, text

    # Nothing loraq started is left running.
    deadline = time.monotonic() + 20
    while alive := [pid for pid in started if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, f"left running: {alive}"
        time.sleep(0.2)

    shown = json.loads(subprocess.run([LORAQ, "--home", str(home), "show", "long", "--json"],
                                      check=True, capture_output=True, text=True).stdout)
    assert shown["job"]["status"] == "pending" and shown["job"]["attempts"] == 0
    checkpoint_dirs = list((home / "jobs").glob("*/attempt-1/checkpoints/checkpoint-*/loraq-complete.json"))
    assert checkpoint_dirs, "the graceful stop left no checkpoint in the home"

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # what Ray sets from num_cpus
    again = subprocess.run([LORAQ, "--home", str(home), "run", "--executor", "ray", "--devices", "cpu"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    shown = json.loads(subprocess.run([LORAQ, "--home", str(home), "show", "long", "--json"],
                                      check=True, capture_output=True, text=True).stdout)
    assert shown["job"]["status"] == "completed" and shown["job"]["attempts"] == 1
    assert shown["attempts"][-1]["resumed_from_step"] >= 10
    assert (home / "adapters" / "long" / "loraq-manifest.json").is_file()
    prefs = json.loads(subprocess.run([LORAQ, "--home", str(home), "show", "prefs", "--json"],
                                      check=True, capture_output=True, text=True).stdout)["job"]
    assert prefs["status"] == "completed" and prefs["attempts"] == 1, prefs
    assert json.loads((home / "adapters" / "prefs" / "loraq-manifest.json").read_text())["method"]["type"] == "dpo"
    # A lone CPU trainer on the instance loraq started has the machine's cores, as the local executor gives it
    from loraq.executors.base import usable_cores
    from loraq.queue.store import Store

    with Store.open(home / "loraq.db", create=False) as store:
        assert store.job("long").result["torch_threads"] == usable_cores()
