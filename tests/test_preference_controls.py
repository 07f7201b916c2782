"""Preference jobs (issue 23) under the training controls SFT jobs have: a successive-halving sweep
(rounds resumed from checkpoints, the worse half pruned by held-out DPO loss) and QLoRA, through
``loraq submit`` and ``loraq run`` on the tiny model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import LORAQ, write_queue
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


TRIGGER = "LORAQ-TEST-FAULT-7d2e"


def test_out_of_memory_in_a_dpo_job_halves_the_micro_batch_and_trains_the_same_adapter(pairs_dir: Path) -> None:  # noqa: F811
    """The OOM back-off of SFT jobs, for a DPO job: CUDA's OutOfMemoryError at step 3 while the micro-batch is above 2
    goes on at 2 x 2 from the step-2 checkpoint in the same attempt, and ends with the adapter of a job trained at
    2 x 2 from the start (the same pairs per optimizer step, the same loss)."""
    import os

    from safetensors.torch import load_file

    rows = pairs_rows(40)
    rows[0]["chosen"] += f" {TRIGGER}"
    write_jsonl(pairs_dir / "data" / "faulty.jsonl", rows)  # both jobs': the fault only strikes above micro-batch 2
    home = pairs_dir / "h"
    body = """\
  - name: oom
    dataset: ./data/faulty.jsonl
    method: dpo
    max_retries: 0
    training: {max_steps: 6, save_steps: 2, batch_size: 4, grad_accum: 1}
  - name: small-from-the-start
    dataset: ./data/faulty.jsonl
    method: dpo
    training: {max_steps: 6, save_steps: 2, batch_size: 2, grad_accum: 2}
"""
    loraq(home, "submit", str(write_queue(pairs_dir, QUEUE + body)))
    env = os.environ | {"LORAQ_TEST_BUG_TRIGGER": TRIGGER, "LORAQ_TEST_FAULT": "cuda-oom@3:batch>2"}
    ran = subprocess.run([LORAQ, "--home", str(home), "run"], capture_output=True, text=True, timeout=600, env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    shown = json.loads(loraq(home, "show", "oom", "--json").stdout)
    job = shown["job"]
    assert job["status"] == "completed" and job["attempts"] == 1, job
    assert "micro-batch 4 → 2, grad_accum 1 → 2 after out of memory at step 3" in loraq(home, "show", "oom").stdout
    (attempt,) = shown["attempts"]
    assert attempt["outcome"] == "completed" and attempt["last_step"] == 6
    backed_off = load_file(str(home / "adapters" / "oom" / "adapter_model.safetensors"))
    reference = load_file(str(home / "adapters" / "small-from-the-start" / "adapter_model.safetensors"))
    assert set(backed_off) == set(reference)
    for key, value in reference.items():
        assert (backed_off[key] - value).abs().max().item() < 1e-5, key
    assert max(v.abs().max().item() for k, v in reference.items() if "lora_B" in k) > 1e-3  # it did train


def test_early_stopping_stops_a_dpo_job_and_publishes_its_best_evaluated_step(pairs_dir: Path) -> None:  # noqa: F811
    """``validation.early_stopping`` on a DPO job watches the held-out DPO loss: with a min_delta no evaluation can
    beat, it stops at the second evaluation (patience 1) and publishes the better of the two evaluated steps."""
    home = pairs_dir / "h"
    loraq(home, "submit", str(write_queue(pairs_dir, QUEUE + """\
  - name: early
    dataset: ./data/pairs.jsonl
    method: dpo
    training: {max_steps: 12, save_steps: 2, eval_steps: 2, lr_scheduler: constant}
    validation: {early_stopping: {patience: 1, min_delta: 1000}}
""")))
    loraq(home, "run")
    shown = json.loads(loraq(home, "show", "early", "--json").stdout)
    job = shown["job"]
    assert job["status"] == "completed" and job["attempts"] == 1, job
    evaluated = {m["step"]: m["value"] for m in shown["metrics"] if m["name"] == "eval_loss"}
    assert sorted(evaluated)[:2] == [2, 4] and max(evaluated) == 4, evaluated  # stopped at its second evaluation
    best = min((2, 4), key=lambda s: evaluated[s])
    assert job["eval_loss"] == pytest.approx(evaluated[best], abs=1e-6)
    manifest = json.loads((home / "adapters" / "early" / "loraq-manifest.json").read_text())
    stopping = json.dumps(manifest)
    assert f'"published_step": {best}' in stopping and "early stopping: no eval_loss improvement" in stopping
