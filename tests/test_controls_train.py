"""Training controls in real training, through the CLI on the tiny model (issue 12).

LoRA variants and QLoRA (each trained, then loaded with PEFT on the plain base),
warm starts, early stopping with the best checkpoint published, and the OOM
back-off driven by the real out-of-memory exceptions (CUDA's and the CPU
allocator's), raised at a chosen step by the trainer's test fault hook.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import LORAQ, write_queue
from loraq.queue.store import Store
from loraq.workspace import Home

pytestmark = pytest.mark.slow

FAST = """\
defaults:
  base_model: ./models/tiny
  lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}
  training: {max_steps: 4, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 2, logging_steps: 1, seed: 3}
  validation: {split: 0.1}
retry_backoff_s: 0
"""
TRIGGER = "LORAQ-TEST-FAULT-31c9"


def loraq(home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=timeout,
                          env=(os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})))


def submit_and_run(workdir: Path, body: str, *, env: dict[str, str] | None = None, name: str = "queue.yaml"):
    home = workdir / ".loraq"
    submitted = loraq(home, "submit", str(write_queue(workdir, body, name=name)))
    assert submitted.returncode == 0, submitted.stderr
    ran = loraq(home, "run", "--devices", "cpu", env=env)
    return home, ran


def jobs(home: Path) -> dict:
    with Store.open(Home(home).db_path, create=False) as store:
        return {job.name: job for job in store.jobs()}


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def eval_loss_on_plain_base(base: Path, adapter: Path, job) -> float:
    """The published adapter loaded with PEFT onto the unquantised base, scored on the job's own eval rows."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraq.model.batching import Collator
    from loraq.model.evaluation import evaluate_loss
    from loraq.protocol import JobInput
    from loraq.train.prepare import prepare

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prepared = prepare(JobInput.of_stored(job.spec.doc), tokenizer)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    model.eval()
    return evaluate_loss(model, prepared.eval, Collator(pad_id=tokenizer.pad_token_id), 8)


def test_lora_variants_and_qlora_train_and_load_with_peft_on_the_plain_base(workdir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    home, ran = submit_and_run(workdir, FAST + """
jobs:
  - name: dora
    dataset: ./data/support.jsonl
    lora: {use_dora: true}
  - name: rslora
    dataset: ./data/support.jsonl
    lora: {use_rslora: true}
  - name: saved-head
    dataset: ./data/support.jsonl
    lora: {modules_to_save: [lm_head]}
  - name: pissa
    dataset: ./data/support.jsonl
    lora: {init: pissa_niter_4}
  - name: gaussian
    dataset: ./data/support.jsonl
    lora: {init: gaussian}
  - name: qlora-4bit
    dataset: ./data/support.jsonl
    quantization: 4bit
  - name: qlora-8bit
    dataset: ./data/support.jsonl
    quantization: 8bit
""")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    done = jobs(home)
    base = workdir / "models" / "tiny"
    adapters = Home(home).adapters_dir
    for name, job in done.items():
        assert job.status == "completed" and job.attempts == 1, (name, job.error)
        config = json.loads((adapters / name / "adapter_config.json").read_text())
        inspection = json.loads((adapters / name / "inspection.json").read_text())
        assert inspection["passed"], (name, inspection["findings"])
        if name.startswith("qlora"):
            # Trained on a quantised base; the published adapter is plain float weights that load on the full base.
            assert all(t.dtype.is_floating_point for t in tensors(adapters / name).values())
            loss = eval_loss_on_plain_base(base, adapters / name, job)
            assert loss < job.result["base_eval_loss"] + 0.5
            continue
        # Loaded by PEFT on the plain base, the adapter scores what the trainer measured: it is what was trained.
        assert eval_loss_on_plain_base(base, adapters / name, job) == pytest.approx(job.result["eval_loss"], abs=2e-4), name
        if name == "dora":
            assert config["use_dora"] is True
            assert any("lora_magnitude_vector" in k for k in tensors(adapters / name))
        if name == "rslora":
            assert config["use_rslora"] is True and inspection["stats"]["scaling"] == pytest.approx(8 / 2)
        if name == "saved-head":
            assert "base_model.model.lm_head.weight" in tensors(adapters / name)
        if name == "pissa":  # converted to a plain LoRA of twice the rank, for the unchanged base
            assert config["r"] == 8 and config["init_lora_weights"] is True
    logs = "".join(p.read_text() for p in Path(home, "jobs").glob("*/attempt-1/train.log"))
    # Only PiSSA rewrites the base weights (and the trainer reloads the base after it); the rest leave it as loaded.
    assert logs.count("base model weights changed during the job") == 1


def test_a_warm_start_begins_from_the_published_adapter(workdir: Path) -> None:
    home, ran = submit_and_run(workdir, FAST + """
jobs:
  - name: first
    dataset: ./data/support.jsonl
""")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    # A learning rate of ~0: what is published is what the LoRA started from.
    home, ran = submit_and_run(workdir, FAST + """
jobs:
  - name: warm
    dataset: ./data/support.jsonl
    init_from: first
    training: {learning_rate: 1.0e-12, max_steps: 1}
""", name="warm.yaml")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    adapters = Home(home).adapters_dir
    first, warm = tensors(adapters / "first"), tensors(adapters / "warm")
    assert set(first) == set(warm)
    for key, value in first.items():
        assert (warm[key] - value).abs().max().item() < 1e-6, key
    shown = loraq(home, "show", "warm").stdout
    assert f"warm start: first ({adapters / 'first'})" in shown


def test_early_stopping_publishes_the_best_checkpoint_and_says_why_it_stopped(workdir: Path) -> None:
    # A learning rate this high makes the eval loss rise after the first step (deterministic on the CPU).
    home, ran = submit_and_run(workdir, FAST + """
jobs:
  - name: early
    dataset: ./data/support.jsonl
    training: {max_steps: 12, learning_rate: 5.0e-2, save_steps: 1}
    validation: {split: 0.1, early_stopping: {patience: 2}}
""")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    job = jobs(home)["early"]
    stopping = job.result["extras"]["stopping"]
    with Store.open(Home(home).db_path, create=False) as store:
        evals = {m["step"]: m["value"] for m in store.metrics("early") if m["name"] == "eval_loss"}
    best = min(evals, key=evals.get)
    assert stopping["published_step"] == best < max(evals) == stopping["stopped_at"] < 12
    assert stopping["stopped_because"].startswith("early stopping: no eval_loss improvement greater than 0 in 2 ")
    manifest = json.loads((Home(home).adapter_dir("early") / "loraq-manifest.json").read_text())
    assert manifest["stopping"] == stopping
    adapter = Home(home).adapter_dir("early")
    assert eval_loss_on_plain_base(workdir / "models" / "tiny", adapter, job) == pytest.approx(job.result["eval_loss"],
                                                                                             abs=2e-4)
    # The best's eval loss, not the last step's (the Trainer averages its eval loss by batch, loraq by token: close).
    assert job.result["eval_loss"] == pytest.approx(evals[best], abs=5e-3)
    assert evals[stopping["stopped_at"]] - job.result["eval_loss"] > 0.1
    shown = loraq(home, "show", "early").stdout
    assert f"published:  step {best} (the lowest eval_loss" in shown and "stopped:    step" in shown
    report = loraq(home, "report", "--format", "md").stdout
    assert f"published:  step {best}" in report


def _with_trigger(workdir: Path) -> None:
    rows = [json.loads(line) for line in (workdir / "data" / "sql.jsonl").read_text().splitlines()]
    rows[0]["completion"] += f" {TRIGGER}"
    (workdir / "data" / "faulty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


OOM = """\
defaults:
  base_model: ./models/tiny
  lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}
  training: {max_steps: 6, learning_rate: 5.0e-3, max_seq_len: 64, save_steps: 2, logging_steps: 1, seed: 3}
  validation: {split: 0.1}
  dataset: {path: ./data/faulty.jsonl, format: prompt_completion}
  max_retries: 0
retry_backoff_s: 0
"""


def test_out_of_memory_halves_the_micro_batch_keeps_the_effective_batch_and_trains_the_same_adapter(
        workdir: Path) -> None:
    """CUDA's OutOfMemoryError at step 3 while the micro-batch is above 2: the job goes on at 2 x 2 from its step-2
    checkpoint, in the same attempt, and ends with the adapter of a job trained at 2 x 2 from the start."""
    _with_trigger(workdir)
    home, ran = submit_and_run(workdir, OOM + """
jobs:
  - name: oom
    training: {batch_size: 4, grad_accum: 1}
  - name: small-from-the-start
    training: {batch_size: 2, grad_accum: 2}
""", env={"LORAQ_TEST_BUG_TRIGGER": TRIGGER, "LORAQ_TEST_FAULT": "cuda-oom@3:batch>2"})
    assert ran.returncode == 0, ran.stdout + ran.stderr
    done = jobs(home)
    oom = done["oom"]
    assert oom.status == "completed" and oom.attempts == 1 and oom.max_retries == 0  # no attempt used by the back-off
    training = oom.spec.settings.training
    assert (training["batch_size"], training["grad_accum"], training["gradient_checkpointing"]) == (2, 2, False)
    (adjusted,) = oom.spec.oom_adjustments
    assert adjusted["step"] == 3 and adjusted["resume_step"] == 2
    assert adjusted["before"] == {"batch_size": 4, "grad_accum": 1, "gradient_checkpointing": False}
    assert adjusted["after"] == {"batch_size": 2, "grad_accum": 2, "gradient_checkpointing": False}
    assert adjusted["error"].startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 0.50 GiB")
    assert adjusted["asked"] == "0.50 GiB"
    with Store.open(Home(home).db_path, create=False) as store:
        events = [e.reason for e in store.events("oom")]
        (attempt,) = store.attempts("oom")
    assert any(r.startswith("oom_adjusted: micro-batch 4 → 2, grad_accum 1 → 2 after out of memory at step 3 "
                            "(asked for 0.50 GiB); resumed from checkpoint step 2") for r in events), events
    assert attempt.outcome == "completed" and attempt.last_step == 6
    assert "[oom] oom_adjusted: micro-batch 4 → 2" in ran.stdout
    # The same examples per optimizer step and the same loss: the same adapter, to float tolerance.
    adapters = Home(home).adapters_dir
    backed_off, reference = tensors(adapters / "oom"), tensors(adapters / "small-from-the-start")
    assert set(backed_off) == set(reference)
    for key, value in reference.items():
        assert (backed_off[key] - value).abs().max().item() < 1e-5, key
    assert (reference[next(k for k in reference if "lora_B" in k)].abs().max().item()) > 1e-3  # it did train
    shown = loraq(home, "show", "oom").stdout
    assert "oom:        micro-batch 4 → 2, grad_accum 1 → 2 after out of memory at step 3" in shown
    report = json.loads(loraq(home, "report", "--format", "json").stdout)
    (row,) = [j for j in report["jobs"] if j["name"] == "oom"]
    assert row["oom_adjustments"] == [adjusted]


def test_at_micro_batch_1_gradient_checkpointing_goes_on_then_the_job_fails_saying_how_much_was_asked(
        workdir: Path) -> None:
    """The CPU allocator's "can't allocate memory" RuntimeError: 2 -> 1, then gradient checkpointing, then a
    permanent failure (no retry, although max_retries is 2) that says how much memory was asked for."""
    _with_trigger(workdir)
    home, ran = submit_and_run(workdir, OOM.replace("max_retries: 0", "max_retries: 2") + """
jobs:
  - name: too-big
    training: {batch_size: 2, grad_accum: 1}
""", env={"LORAQ_TEST_BUG_TRIGGER": TRIGGER, "LORAQ_TEST_FAULT": "cpu-oom@2"})
    assert ran.returncode == 1
    job = jobs(home)["too-big"]
    assert (job.status, job.error_kind, job.attempts) == ("failed", "memory", 1)
    assert job.error.startswith("out of memory on cpu even at micro-batch 1 (grad_accum 2) with gradient "
                                "checkpointing: asked for 128.00 MiB more (RuntimeError: [enforce fail at "
                                "alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory")
    steps = [(a["before"], a["after"]) for a in job.spec.oom_adjustments]
    assert steps == [
        ({"batch_size": 2, "grad_accum": 1, "gradient_checkpointing": False},
         {"batch_size": 1, "grad_accum": 2, "gradient_checkpointing": False}),
        ({"batch_size": 1, "grad_accum": 2, "gradient_checkpointing": False},
         {"batch_size": 1, "grad_accum": 2, "gradient_checkpointing": True}),
    ]
    # Gradient checkpointing, once on, trains: the same fault only while it is off lets the job finish.
    home2 = workdir / "second"
    submitted = loraq(home2, "submit", str(write_queue(workdir, OOM + """
jobs:
  - name: checkpointed
    training: {batch_size: 1, grad_accum: 2}
""", name="gc.yaml")))
    assert submitted.returncode == 0, submitted.stderr
    ran = loraq(home2, "run", "--devices", "cpu", env={"LORAQ_TEST_BUG_TRIGGER": TRIGGER,
                                                       "LORAQ_TEST_FAULT": "cpu-oom@2:nogc"})
    assert ran.returncode == 0, ran.stdout + ran.stderr
    job = jobs(home2)["checkpointed"]
    assert job.status == "completed" and job.spec.settings.training["gradient_checkpointing"] is True
    assert "gradient checkpointing False → True" in loraq(home2, "show", "checkpointed").stdout
