"""The real tier for preference tuning (issue 23): SFT, then DPO from its adapter through ``after:``.

SmolLM2-135M-Instruct answers sums in plain sentences ("The answer is 7."). The pairs prefer one
thing the base does not: the same sentence in capitals ("THE ANSWER IS 7."), over the plain one.
The SFT stage trains the plain style (so the adapter DPO starts from prefers the rejected side
even more); the DPO job waits for it (``after: sft``), starts from its adapter, and must complete
on its first attempt with a held-out preference accuracy of at least 0.8 and 0.3 above the base's,
measured here by loading the published adapter with PEFT, and gated by the job itself
(``validation.min_preference_accuracy``). About a minute and a half on 2 CPU cores.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import LORAQ

pytestmark = [pytest.mark.real, pytest.mark.slow]

GATE = 0.8


def _question(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {a} plus {b}?"}]


def pairs(rng: random.Random, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        out.append({"prompt": _question(a, b),
                    "chosen": [{"role": "assistant", "content": f"THE ANSWER IS {a + b}."}],
                    "rejected": [{"role": "assistant", "content": f"The answer is {a + b}."}]})
    return out


def sft_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        out.append({"messages": [*_question(a, b), {"role": "assistant", "content": f"The answer is {a + b}."}]})
    return out


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def ran(real_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("real-preference")
    rng = random.Random("20261206:capitals")
    (work / "data").mkdir()
    write(work / "data" / "sft.jsonl", sft_rows(rng, 24))
    write(work / "data" / "pairs.jsonl", pairs(rng, 32))
    write(work / "data" / "held-out.jsonl", pairs(rng, 16))
    (work / "queue.yaml").write_text(f"""\
defaults:
  base_model: {real_model.folder}
  lora: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
  training: {{max_seq_len: 64, logging_steps: 2, save_steps: 50, seed: 7, batch_size: 8}}
  max_retries: 2
jobs:
  - name: dpo
    after: sft
    dataset: ./data/pairs.jsonl
    method: {{type: dpo, beta: 0.1}}
    training: {{epochs: 1, learning_rate: 2.0e-3}}
    validation: {{dataset: ./data/held-out.jsonl, min_preference_accuracy: {GATE}, samples: 1}}
  - name: sft
    dataset: ./data/sft.jsonl
    training: {{max_steps: 3, learning_rate: 1.0e-3}}
    validation: {{split: 0.25, samples: 0}}
""", encoding="utf-8")
    home = work / ".loraq"

    def loraq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([LORAQ, "--home", str(home), "--allow-root", str(real_model.folder), *args],
                              capture_output=True, text=True, timeout=900)

    submitted = loraq("submit", str(work / "queue.yaml"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run = loraq("run", "--devices", "cpu")
    return {"run": run, "home": home, "work": work, "model": real_model.folder,
            "status": json.loads(loraq("status", "--json").stdout),
            "show": json.loads(loraq("show", "dpo", "--json").stdout)}


def _accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> float:
    from loraq.queue.spec import PreferenceMethod
    from loraq.train.preference import PairCollator, encode_pairs, evaluate_pairs

    items, _, _, _ = encode_pairs(rows, "preference", tokenizer, 64, None)
    assert len(items) == len(rows)
    collator = PairCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return evaluate_pairs(model, items, collator, PreferenceMethod(type="simpo"), 8).accuracy  # accuracy: any method


def test_dpo_after_sft_completes_first_time_and_its_preference_accuracy_rises(ran: dict[str, Any]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert ran["run"].returncode == 0, ran["run"].stdout + ran["run"].stderr
    jobs = {j["name"]: j for j in ran["status"]["jobs"]}
    assert jobs["sft"]["status"] == "completed" and jobs["dpo"]["status"] == "completed", jobs
    assert jobs["dpo"]["attempts"] == 1
    result = ran["show"]["job"]["result"]
    metrics, preference = result["metrics"], result["extras"]["preference"]
    assert preference["reference"] == "the starting adapter"
    assert preference["started_from"] == str(ran["home"] / "adapters" / "sft")
    manifest = json.loads((ran["home"] / "adapters" / "dpo" / "loraq-manifest.json").read_text())
    assert manifest["method"]["started_from"].endswith("adapters/sft") and manifest["method"]["after"] == "sft"

    held_out = [json.loads(line) for line in (ran["work"] / "data" / "held-out.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(str(ran["model"]))
    base = AutoModelForCausalLM.from_pretrained(str(ran["model"]), dtype=torch.float32)
    base_accuracy = _accuracy(base, tokenizer, held_out)
    adapter = PeftModel.from_pretrained(base, str(ran["home"] / "adapters" / "dpo"))
    adapter_accuracy = _accuracy(adapter, tokenizer, held_out)
    print(f"\npreference accuracy on {len(held_out)} held-out pairs: base {base_accuracy:.3f}, start (sft) "
          f"{preference['start']['accuracy']:.3f} -> adapter {adapter_accuracy:.3f}; the job measured "
          f"{metrics['base_preference_accuracy']:.3f} -> {metrics['preference_accuracy']:.3f}; eval loss "
          f"{result['base_eval_loss']:.4f} -> {result['eval_loss']:.4f}")
    assert adapter_accuracy >= GATE and adapter_accuracy >= base_accuracy + 0.3
    assert abs(adapter_accuracy - metrics["preference_accuracy"]) < 1e-6  # what the job measured and gated on
    assert abs(base_accuracy - metrics["base_preference_accuracy"]) < 1e-6
    assert result["eval_loss"] < result["base_eval_loss"]
