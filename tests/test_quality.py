"""Quality you can see: ``validation.metrics: [exact_match]``, its gate, and sample generations.

The prompts are the eval rows' prompts rendered exactly as training renders them (so
prompt + answer is the trained text); the answers are greedy, batched with left
padding and the KV cache, and must equal a one-prompt-at-a-time argmax loop without
any cache. End to end on the tiny demo base: the metrics and samples are stored
through the protocol, shown by ``status``, ``show`` and the report, and a
``min_exact_match`` the adapter misses fails the job at inspection.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import LORAQ, TINY_DEFAULTS, write_queue
from loraq import data, demo
from loraq.inspect import exact_match_gate
from loraq.queue.spec import JobSpec


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return tok


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


ROWS = {"chat": demo.chat_rows(6, random.Random(3)), "prompt_completion": demo.sql_rows(6, random.Random(3)),
        "alpaca": demo.alpaca_rows(6, random.Random(3))}


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_a_prompt_and_its_reference_are_the_trained_text_split_where_the_loss_starts(fmt: str, tokenizer: Any) -> None:
    rows = ROWS[fmt]
    for prompt, rendered in zip(data.prompts_of(rows, fmt, tokenizer), data.render_many(rows, fmt, tokenizer)):
        assert isinstance(prompt, data.Prompt) and isinstance(rendered, data.Rendered)
        start, end = rendered.spans[-1]
        assert rendered.text[:start] == prompt.text  # what the model sees before the answer, exactly
        assert rendered.text[start:end].strip().startswith(prompt.reference)
        assert prompt.add_special_tokens == rendered.add_special_tokens
    if fmt == "chat":
        assert prompt.stop == "<|end|>"  # the demo template's end of turn
        assert prompt.reference == rows[-1]["messages"][-1]["content"]
    else:
        assert prompt.stop is None
        assert prompt.reference == (rows[-1].get("completion") or rows[-1].get("output")).strip()


def test_a_text_dataset_has_no_prompts(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="no prompts"):
        data.prompts_of([{"text": "a b c"}], "text", tokenizer)


def reference_greedy(model: Any, tokenizer: Any, prompt: data.Prompt, limit: int) -> str:
    """Greedy decoding the slow, obvious way: one prompt, no padding, no cache, argmax per step."""
    import torch

    ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(limit):
            logits = model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    text = tokenizer.decode(out, skip_special_tokens=True)
    if prompt.stop and prompt.stop in text:
        text = text[:text.index(prompt.stop)]
    return text.strip()


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_batched_cached_answers_equal_a_plain_argmax_loop(fmt: str, model: Any, tokenizer: Any) -> None:
    from loraq.model.evaluation import answer_budget, generate_answers

    prompts = [p for p in data.prompts_of(ROWS[fmt], fmt, tokenizer) if isinstance(p, data.Prompt)]
    limit = answer_budget(tokenizer, prompts)
    got = generate_answers(model, tokenizer, prompts, max_seq_len=512, batch_size=4)  # 6 prompts: 2 batches
    assert got == [reference_greedy(model, tokenizer, p, limit) for p in prompts]
    assert len({len(tokenizer(p.text)["input_ids"]) for p in prompts}) > 1  # padding was exercised


def test_exact_match_counts_trimmed_equality() -> None:
    from loraq.model.evaluation import exact_match

    prompts = [data.Prompt("q1", "42"), data.Prompt("q2", "7"), data.Prompt("q3", "x y")]
    assert exact_match(["42", " 7\n", "x  y"], prompts) == pytest.approx(2 / 3)


def test_the_gate_passes_at_the_minimum_and_fails_below_it() -> None:
    assert exact_match_gate(0.5, None) is None
    assert exact_match_gate(0.5, 0.5) is None
    below = exact_match_gate(0.25, 0.5, base=0.0)
    assert below is not None and below.code == "exact_match_gate" and "0.250 (the base's: 0.000)" in below.message
    assert exact_match_gate(None, 0.5) is not None
    assert exact_match_gate(float("nan"), 0.5) is not None


def test_min_exact_match_needs_the_metric() -> None:
    base = {"name": "j", "base_model": "./m", "dataset": "./d.jsonl"}
    JobSpec.model_validate(base | {"validation": {"metrics": ["exact_match"], "min_exact_match": 0.5}})
    with pytest.raises(Exception, match="add metrics: \\[exact_match\\]"):
        JobSpec.model_validate(base | {"validation": {"min_exact_match": 0.5}})
    with pytest.raises(Exception, match="exact_match"):  # an unknown metric: the error lists the known ones
        JobSpec.model_validate(base | {"validation": {"metrics": ["perplexity"]}})


# ---------------------------------------------------------------- end to end


def loraq(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=600)


def test_exact_match_on_a_text_dataset_is_refused_at_submit(workdir: Path) -> None:
    rows = [{"text": f"The cat number {i} slept."} for i in range(30)]
    (workdir / "data" / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    queue = write_queue(workdir, TINY_DEFAULTS + """
jobs:
  - name: prose
    dataset: ./data/text.jsonl
    validation: {split: 0.1, metrics: [exact_match]}
""")
    result = loraq(workdir / ".loraq", "submit", str(queue), "--dry-run")
    assert result.returncode == 1
    assert "job 'prose': validation.metrics: exact_match compares a generated answer" in result.stderr


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_datasets: dict[str, Path]) -> dict[str, Any]:
    """A queue: one job measured, one gated past what 6 steps can reach, one with samples off."""
    import shutil

    work = tmp_path_factory.mktemp("quality")
    shutil.copytree(tiny_model, work / "models" / "tiny")
    (work / "data").mkdir()
    for path in demo_datasets.values():
        shutil.copy(path, work / "data" / path.name)
    queue = write_queue(work, TINY_DEFAULTS + """
jobs:
  - name: measured
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    validation: {split: 0.1, metrics: [exact_match]}
  - name: gated
    dataset: ./data/support.jsonl
    validation: {split: 0.1, metrics: [exact_match], min_exact_match: 1.0}
    max_retries: 0
  - name: quiet
    dataset: ./data/stories.jsonl
    validation: {split: 0.1, samples: 0}
""")
    home = work / ".loraq"
    assert loraq(home, "submit", str(queue)).returncode == 0
    run = loraq(home, "run", "--devices", "cpu")
    return {"home": home, "run": run}


def show(home: Path, name: str) -> dict[str, Any]:
    return json.loads(loraq(home, "show", name, "--json").stdout)


@pytest.mark.slow
def test_the_metrics_and_samples_travel_through_the_protocol_into_the_result(ran: dict[str, Any]) -> None:
    job = show(ran["home"], "measured")["job"]
    assert job["status"] == "completed", job
    metrics, extras = job["result"]["metrics"], job["result"]["extras"]
    assert set(metrics) == {"exact_match", "base_exact_match"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert extras["exact_match_rows"] == job["result"]["n_eval"]  # 12 eval rows, all answered
    assert len(extras["samples"]) == 3
    for sample in extras["samples"]:
        assert set(sample) == {"prompt", "reference", "base", "adapter"}
        assert sample["prompt"].startswith("Question: ") and sample["prompt"].endswith("\nSQL:")
        assert sample["reference"].startswith("SELECT") or sample["reference"].startswith("DELETE")
    manifest = json.loads((ran["home"] / "adapters" / "measured" / "loraq-manifest.json").read_text())
    assert manifest["metrics"] == metrics
    quiet = show(ran["home"], "quiet")["job"]
    assert quiet["status"] == "completed" and "samples" not in quiet["result"]["extras"]
    assert quiet["result"]["metrics"] == {}


@pytest.mark.slow
def test_an_adapter_below_min_exact_match_fails_inspection_and_is_not_published(ran: dict[str, Any]) -> None:
    job = show(ran["home"], "gated")["job"]
    assert job["status"] == "failed" and job["attempts"] == 1
    assert "exact_match_gate" in job["error"] and "below validation.min_exact_match 1.000" in job["error"]
    assert not (ran["home"] / "adapters" / "gated").exists()
    assert ran["run"].returncode == 1


@pytest.mark.slow
def test_status_show_and_the_report_show_exact_match_and_samples(ran: dict[str, Any]) -> None:
    home = ran["home"]
    listed = {j["name"]: j for j in json.loads(loraq(home, "status", "--json").stdout)["jobs"]}
    measured = show(home, "measured")["job"]["result"]["metrics"]
    assert listed["measured"]["exact_match"] == measured["exact_match"]
    assert listed["measured"]["base_exact_match"] == measured["base_exact_match"]
    assert listed["quiet"]["exact_match"] is None
    table = loraq(home, "status").stdout
    assert "exact match base -> adapter" in table
    assert f"{measured['base_exact_match']:.3f} -> {measured['exact_match']:.3f}" in table

    text = loraq(home, "show", "measured").stdout
    assert f"exact match: base {measured['base_exact_match']:.3f} -> adapter {measured['exact_match']:.3f}" in text
    assert "samples (eval prompts; base and adapter answers, greedy):" in text and "#3 prompt:" in text

    loraq(home, "report", "--format", "json")
    report = json.loads((home / "reports" / "report.json").read_text())
    by_name = {j["name"]: j for j in report["jobs"]}
    assert by_name["measured"]["metrics"] == measured and len(by_name["measured"]["samples"]) == 3
    assert loraq(home, "report", "--format", "md").returncode == 0
    md = (home / "reports" / "report.md").read_text()
    assert f"exact match {measured['base_exact_match']:.3f} → {measured['exact_match']:.3f}" in md
    assert "| prompt (its end) | reference | base | adapter |" in md
    assert loraq(home, "report", "--format", "html").returncode == 0
    page = (home / "reports" / "report.html").read_text()
    assert "<details class=samples>" in page and "exact match" in page
