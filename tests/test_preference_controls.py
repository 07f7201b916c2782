"""Preference jobs (issue 23) under the training controls SFT jobs have: a successive-halving sweep
(rounds resumed from checkpoints, the worse half pruned by held-out DPO loss) and QLoRA, through
``loraq submit`` and ``loraq run`` on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_queue
from loraq.queue import sweep
from test_preference import QUEUE, loraq, pairs_dir, pairs_rows, write_jsonl  # noqa: F401 (pairs_dir: a fixture)

pytestmark = pytest.mark.slow


def test_a_halving_sweep_and_a_qlora_job_of_dpo_train_resume_and_publish(pairs_dir: Path) -> None:  # noqa: F811
    pytest.importorskip("bitsandbytes")
    home = pairs_dir / "h"
    queue = write_queue(pairs_dir, QUEUE + """\
  - name: lr
    dataset: ./data/pairs.jsonl
    method: dpo
    sweep_strategy: halving
    training: {max_steps: 4, save_steps: 1, lr_scheduler: constant}
    sweep:
      training.learning_rate: [1.0e-7, 2.0e-2]
  - name: q4
    dataset: ./data/pairs.jsonl
    method: {type: dpo, beta: 0.5}
    quantization: 4bit
    training: {epochs: 1}
""")
    loraq(home, "submit", str(queue))
    loraq(home, "run", "--devices", "cpu")
    jobs = {j["name"]: j for j in json.loads(loraq(home, "status", "--json").stdout)["jobs"]}
    slow, fast = (jobs[sweep.child_name("lr", {"training.learning_rate": lr})] for lr in (1e-7, 2e-2))
    # Round 1 trains both 2 steps; the one whose held-out DPO loss is lower goes on, from its checkpoint.
    assert (slow["status"], fast["status"]) == ("cancelled", "completed"), (slow, fast)
    assert slow["error"].startswith("halving: round 1 of 2, eval loss ") and "pruned" in slow["error"]
    assert fast["progress"]["step"] == 4 and fast["eval_loss"] < fast["base_eval_loss"]
    attempts = [(a["outcome"], a["resumed_from_step"], a["last_step"])
                for a in json.loads(loraq(home, "show", fast["name"], "--json").stdout)["attempts"]]
    assert attempts == [("round", None, 2), ("completed", 2, 4)]
    published = sorted(p.name for p in (home / "adapters").iterdir() if not p.name.startswith("."))
    assert published == sorted([fast["name"], "q4"])

    q4 = jobs["q4"]
    assert q4["status"] == "completed" and q4["attempts"] == 1 and q4["eval_loss"] < q4["base_eval_loss"]
    manifest = json.loads((home / "adapters" / "q4" / "loraq-manifest.json").read_text())
    assert manifest["method"]["type"] == "dpo"
    assert json.loads((home / "adapters" / "q4" / "inspection.json").read_text())["passed"]
