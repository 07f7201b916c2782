"""The real tier for graders: a rewriting task on a real pretrained base, measured and gated by ROUGE-L.

The task rewrites a sentence into a fixed changelog style ("Mia fixed the login bug on
Monday." -> "Monday - Mia: fixed the login bug"): no single right answer a person would
insist on, the kind of output exact match scores 0 for a near miss and ROUGE-L credits
for the words it keeps in order. The adapter must report ROUGE-L base -> adapter with
the adapter higher, and the job gates on it (``validation.min: {rouge_l: ...}``). One job,
8 steps on SmolLM2-135M-Instruct; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import random
import subprocess
from typing import Any

import pytest

from conftest import LORAQ

pytestmark = [pytest.mark.real, pytest.mark.slow]

_NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Ines", "Tom", "Yuki", "Ana"]
_DONE = [("fixed", "the login bug"), ("added", "a dark mode"), ("removed", "the old importer"),
         ("renamed", "the billing page"), ("updated", "the search index"), ("moved", "the docs site"),
         ("sped up", "the export job"), ("cleaned up", "the settings menu"), ("tested", "the mobile app"),
         ("rewrote", "the welcome email")]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
GATE = 0.8  # measured: the base 0.495, the adapter 1.000


def rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        name, (verb, thing), day = rng.choice(_NAMES), rng.choice(_DONE), rng.choice(_DAYS)
        out.append({"prompt": f"Rewrite in changelog style.\nSentence: {name} {verb} {thing} on {day}.\nChangelog:",
                    "completion": f" {day} - {name}: {verb} {thing}"})
    return out


@pytest.fixture(scope="module")
def ran(real_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("real-graders")
    rng = random.Random("20261205:changelog")
    (work / "data").mkdir()
    for name, data in (("train", rows(rng, 64)), ("eval", rows(rng, 16))):
        (work / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    queue = work / "queue.yaml"
    queue.write_text(f"""\
defaults:
  base_model: {real_model.folder}
  lora: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
  training: {{max_steps: 8, max_seq_len: 64, logging_steps: 1, save_steps: 8, seed: 42, learning_rate: 2.0e-3,
             batch_size: 8}}
  max_retries: 0
jobs:
  - name: changelog
    dataset: {{path: ./data/train.jsonl, format: prompt_completion}}
    validation: {{dataset: ./data/eval.jsonl, metrics: [rouge_l, exact_match], min: {{rouge_l: {GATE}}}, samples: 3}}
""", encoding="utf-8")
    home = work / ".loraq"

    def loraq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([LORAQ, "--home", str(home), "--allow-root", str(real_model.folder), *args],
                              capture_output=True, text=True, timeout=900)

    submitted = loraq("submit", str(queue))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run = loraq("run", "--devices", "cpu")
    return {"run": run, "show": json.loads(loraq("show", "changelog", "--json").stdout),
            "text": loraq("show", "changelog").stdout}


def test_rouge_l_base_to_adapter_rises_and_gates_the_job(ran: dict[str, Any]) -> None:
    assert ran["run"].returncode == 0, ran["run"].stdout + ran["run"].stderr
    job = ran["show"]["job"]
    assert job["status"] == "completed" and job["verdict"] == "pass", job["error"]
    metrics = job["result"]["metrics"]
    print(f"\nchangelog: rouge_l {metrics['base_rouge_l']:.3f} -> {metrics['rouge_l']:.3f}, "
          f"exact match {metrics['base_exact_match']:.3f} -> {metrics['exact_match']:.3f}")
    assert metrics["rouge_l"] >= GATE > metrics["base_rouge_l"], metrics
    assert metrics["rouge_l"] > metrics["base_rouge_l"] + 0.2, metrics
    assert f"rouge_l: base {metrics['base_rouge_l']:.3f} -> adapter {metrics['rouge_l']:.3f}" in ran["text"]
    inspection = ran["show"]["inspection"]
    assert inspection["quality"]["min"] == {"rouge_l": GATE}
    assert inspection["quality"]["metrics"]["rouge_l"]["adapter"] == pytest.approx(metrics["rouge_l"])
