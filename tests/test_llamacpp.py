"""The GGUF round trip through a real client: loraq trains on the real base, exports, llama.cpp serves it.

The base is SmolLM2-135M-Instruct, built once per machine by tools/real_model.py from the
very Q4_1 ``.gguf`` that llama.cpp loads here: the adapter is trained on the dequantised
weights llama.cpp serves. The task has one right answer per prompt (number words to
digits, 10 to 99, none of the held-out prompts in training), so exact match means the
adapter's skill survived the export, and the base, which was never taught the format,
gets most of them wrong (it runs on: "fifty-two" -> "123456").

llama.cpp's Q4_1 base and the dequantised transformers copy can disagree on late,
low-margin tokens (llama.cpp quantises activations too), so what is asserted is what the
adapter learned (every answer exact) and that it changes the base's wrong answers, not
that base outputs agree token for token.

Left out with ``-m "not llamacpp"`` (or ``"not real"``) where the package index cannot be
reached; ``make test`` installs llama-cpp-python from the wheel that tools/llama_cpp_wheel.py
builds once per machine.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

import realdata
from conftest import LORAQ

pytestmark = [pytest.mark.real, pytest.mark.llamacpp, pytest.mark.slow]

# Measured on the shared 2-core machine (load ~10): 40 steps took 750 s, eval loss 1.58 -> 0.0002,
# 12/12 exact in llama.cpp and in PEFT, the base wrong on 8 of 12. About a minute on idle cores.
N_TRAIN, N_EVAL = 78, 12
TRAINING = "{max_steps: 40, learning_rate: 2.0e-3, lr_scheduler: constant, batch_size: 8, max_seq_len: 32, " \
           "save_steps: 1000, logging_steps: 10, seed: 1}"


def llama_cpp():  # type: ignore[no-untyped-def]
    try:
        import llama_cpp
    except ImportError:
        hint = "make test installs it (python tools/llama_cpp_wheel.py --install); or leave out -m 'not llamacpp'"
        if os.environ.get("CI"):
            pytest.fail(f"llama-cpp-python is not installed: {hint}")
        pytest.skip(f"llama-cpp-python is not installed: {hint}")
    return llama_cpp


def digits_task(folder: Path) -> list[dict[str, str]]:
    """Two-digit numbers in words -> digits; writes train.jsonl and eval.jsonl, returns the eval rows."""
    numbers = random.Random(f"{realdata.SEED}:llamacpp").sample(range(10, 100), N_TRAIN + N_EVAL)
    rows = [{"prompt": f"Write as digits: {realdata.number_words(n)}\nAnswer:", "completion": f" {n}"}
            for n in numbers]
    for name, part in (("train.jsonl", rows[:N_TRAIN]), ("eval.jsonl", rows[N_TRAIN:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return rows[N_TRAIN:]


def loraq(*args: str, cwd: Path, allow: Path) -> None:
    result = subprocess.run([LORAQ, "--home", str(cwd / ".loraq"), "--allow-root", str(allow), *args],
                            capture_output=True, text=True, cwd=cwd, timeout=1800)
    assert result.returncode == 0, f"loraq {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def greedy(llm, prompts: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    for prompt in prompts:
        done = llm.create_completion(prompt, max_tokens=8, temperature=0.0, top_k=1, stop=["\n"])
        out.append(done["choices"][0]["text"].strip())
    return out


@pytest.mark.timeout(1800)  # a few minutes on 2 idle cores; 15 when five other jobs share them
def test_an_exported_adapter_answers_in_llamacpp_as_it_was_trained(real_model: Any, tmp_path: Path) -> None:
    model = real_model
    client = llama_cpp()
    held_out = digits_task(tmp_path)
    (tmp_path / "queue.yaml").write_text(f"""
serving: [llamacpp]
defaults:
  base_model: {model.folder}
  lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}}
  training: {TRAINING}
  validation: {{dataset: ./eval.jsonl}}
jobs:
  - name: digits
    dataset: {{path: ./train.jsonl, format: prompt_completion}}
""", encoding="utf-8")
    allow = model.folder.parent
    loraq("submit", "queue.yaml", cwd=tmp_path, allow=allow)
    loraq("run", "-q", cwd=tmp_path, allow=allow)
    loraq("export", "digits", "--to", "gguf", "digits.gguf", cwd=tmp_path, allow=allow)

    prompts = [row["prompt"] for row in held_out]
    references = [row["completion"].strip() for row in held_out]
    options = dict(model_path=str(model.gguf), n_ctx=256, n_threads=2, seed=0, verbose=False)
    base = greedy(client.Llama(**options), prompts)
    adapted = greedy(client.Llama(**options, lora_path=str(tmp_path / "digits.gguf")), prompts)
    table = "\n".join(f"{p!r}: want {r!r}, base {b!r}, adapter {a!r}"
                      for p, r, b, a in zip(prompts, references, base, adapted))
    assert adapted == references, f"llama.cpp + the exported LoRA:\n{table}"
    wrong_before = [i for i, (b, r) in enumerate(zip(base, references)) if b != r]
    assert len(wrong_before) >= 3, f"the base already knows the task; pick a harder one:\n{table}"
    assert all(adapted[i] != base[i] for i in wrong_before)
