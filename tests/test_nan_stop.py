"""A run that goes NaN is stopped at its first checkpoint, not after burning every step."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import LORAQ, write_queue
from loraq import checkpoints, demo

pytestmark = pytest.mark.slow


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=600)


def poisoned_copy(tiny_model: Path, folder: Path, tensor: str, row: int | None = None, token: str | None = None) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model, folder)
    weights = load_file(folder / "model.safetensors")
    if token is not None:
        row = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(token)
    weights[tensor][row] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_diverged_run_stops_at_the_first_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    # An embedding row left uninitialised (special tokens added carelessly) is NaN. Only the
    # training rows use that token (a tool turn): the base's eval loss is finite, the first
    # optimizer step makes the LoRA weights NaN.
    poisoned_copy(tiny_model, tmp_path / "models" / "tiny", "model.embed_tokens.weight", token="<|tool|>")
    rows = demo.chat_rows(140, random.Random(1))
    with_tool = [{"messages": r["messages"][:2] + [{"role": "tool", "content": "lookup: ok"}] + r["messages"][2:]}
                 for r in rows[:110]]
    demo.write_jsonl(tmp_path / "data" / "train.jsonl", with_tool)
    demo.write_jsonl(tmp_path / "data" / "eval.jsonl", rows[110:])
    queue = write_queue(tmp_path, """
pause_after_failures: 1
defaults:
  base_model: ./models/tiny
  lora: {r: 2, alpha: 4, dropout: 0.0, target_modules: [q_proj, v_proj]}
  # logging_steps past max_steps: the loss check never runs; only the checkpoint check can stop it
  training: {max_steps: 40, learning_rate: 1.0e-3, batch_size: 8, max_seq_len: 96, save_steps: 2, logging_steps: 100}
jobs:
  - {name: doomed, dataset: ./data/train.jsonl, validation: {dataset: ./data/eval.jsonl}}
  - {name: after, dataset: ./data/eval.jsonl}
""")
    home = tmp_path / ".loraq"
    assert cli(home, "submit", str(queue)).returncode == 0
    ran = cli(home, "run", "--devices", "cpu")
    assert ran.returncode == 1, ran.stdout + ran.stderr
    shown = json.loads(cli(home, "show", "doomed", "--json").stdout)
    job = shown["job"]
    assert (job["status"], job["attempts"], job["error_kind"]) == ("failed", 1, "diverged")
    assert "checkpoint at step 2" in job["error"] and "NaN or Inf" in job["error"]
    assert job["base_eval_loss"] is not None  # the base was fine on the eval rows
    assert shown["attempts"][0]["last_step"] <= 4  # stopped early, not at step 40
    assert not (home / "adapters" / "doomed").exists()
    # The poisoned checkpoint never counts: a retry could not resume from it.
    assert checkpoints.newest_complete(home / "jobs" / str(job["id"])) is None
    # pause_after_failures: 1 counts it; the next job waits for the operator.
    status = json.loads(cli(home, "status", "--json").stdout)
    assert status["queue"]["paused"] is True and "doomed" in status["queue"]["reason"]
    assert {j["name"]: j["status"] for j in status["jobs"]}["after"] == "pending"


def test_a_base_with_non_finite_weights_is_refused_before_training(tmp_path: Path, tiny_model: Path,
                                                                   demo_datasets: dict[str, Path]) -> None:
    poisoned_copy(tiny_model, tmp_path / "models" / "tiny", "model.layers.1.mlp.down_proj.weight", row=0)
    (tmp_path / "data").mkdir()
    shutil.copy(demo_datasets["sql"], tmp_path / "data" / "sql.jsonl")
    queue = write_queue(tmp_path, """
jobs:
  - name: broken-base
    base_model: ./models/tiny
    dataset: ./data/sql.jsonl
    training: {max_steps: 40, batch_size: 8, max_seq_len: 64, save_steps: 2}
""")
    home = tmp_path / ".loraq"
    assert cli(home, "submit", str(queue)).returncode == 0
    assert cli(home, "run", "--devices", "cpu").returncode == 1
    job = json.loads(cli(home, "show", "broken-base", "--json").stdout)["job"]
    assert (job["status"], job["attempts"], job["error_kind"]) == ("failed", 1, "base_model")
    assert "non-finite eval loss" in job["error"]
    assert job["progress"]["step"] in (None, 0)
