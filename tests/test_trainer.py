"""The trainer in this process: a hot base reused across jobs, left exactly as loaded, and checked.

One :class:`TrainerService` serves the module's jobs, as a trainer process serves
a queue. Two bases: the session's tiny model (A) and one built here with another
seed (B: other weights, another tokenizer).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loraq.model import base as basemodel
from loraq.model.batching import Collator
from loraq.model.evaluation import evaluate_loss
from loraq.protocol import (
    FINAL_KINDS,
    Aborted,
    Done,
    Event,
    EventKind,
    Final,
    JobInput,
    Progress,
    Started,
    Stopped,
    TrainRequest,
    TrainResult,
)
from loraq.queue.spec import JobSpec
from loraq.train.prepare import prepare
from loraq.train.service import TrainerService

pytestmark = pytest.mark.slow

TRAINING = {"max_steps": 4, "learning_rate": 5.0e-3, "batch_size": 8, "max_seq_len": 64, "save_steps": 4,
            "logging_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Base B: the tiny architecture with another seed (other weights and tokenizer)."""
    from loraq.demo import build_model

    return build_model(tmp_path_factory.mktemp("other") / "other", seed=1, pretrain_steps=10)


@pytest.fixture(scope="module")
def service() -> Iterator[TrainerService]:
    """One trainer for the module, on one thread (the machine is shared with other tests)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TrainerService(device="cpu")
    torch.set_num_threads(threads)


class Run:
    """A job run on the service, with the events it emitted."""

    def __init__(self, service: TrainerService, request: TrainRequest) -> None:
        self.request = request
        self.events: list[Event] = []
        self.outcome: Final = service.run_job(request, self.events.append)

    @property
    def result(self) -> TrainResult:
        assert isinstance(self.outcome, Done), self.outcome
        return self.outcome.result

    def started(self) -> Started:
        return next(e for e in self.events if isinstance(e, Started))


def request(name: str, base: Path, dataset: Path, folder: Path, validation: dict[str, Any] | None = None,
            **training: Any) -> TrainRequest:
    spec = JobSpec.model_validate({
        "name": name, "base_model": str(base), "dataset": {"path": str(dataset), "format": "prompt_completion"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": TRAINING | training, "validation": {"split": 0.1} | (validation or {}),
    })
    job_dir = folder / name
    return TrainRequest(job_id=1, attempt=1, epoch=1,
                        job=JobInput(spec=spec.model_dump(mode="json"), base_model=str(base), dataset_path=str(dataset)),
                        log_path=str(job_dir / "train.log"), checkpoints_dir=str(job_dir / "checkpoints"),
                        staging_dir=str(job_dir / "staging"))


def tensors_sha256(model: Any) -> str:
    """sha256 over every tensor of the model, byte for byte."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fresh(base: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def eval_set(run: Run, base: Path) -> tuple[Any, Any]:
    """``run``'s eval rows as the trainer prepares them with ``base``'s tokenizer, and a collator."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return prepare(run.request.job, tokenizer).eval, Collator(tokenizer.pad_token_id)


def recorded_eval_loss_reproduced(run: Run, base: Path) -> float:
    """The eval loss of the saved adapter on a fresh load of ``base``, measured as the trainer does."""
    from peft import PeftModel

    rows, collator = eval_set(run, base)
    model = PeftModel.from_pretrained(fresh(base), run.result.staging).eval()
    return evaluate_loss(model, rows, collator, TRAINING["batch_size"])


def base_loss(run: Run, base: Path) -> float:
    """The eval loss of ``base`` itself on ``run``'s eval rows."""
    rows, collator = eval_set(run, base)
    return evaluate_loss(fresh(base), rows, collator, TRAINING["batch_size"])


def test_consecutive_jobs_on_one_base_load_it_once_and_leave_it_bit_for_bit_as_loaded(
        service: TrainerService, tiny_model: Path, demo_datasets: dict[str, Path], tmp_path: Path) -> None:
    loads = service.cache.loads
    first = Run(service, request("first", tiny_model, demo_datasets["sql"], tmp_path))
    after_first = tensors_sha256(service.cache.resident.model)
    second = Run(service, request("second", tiny_model, demo_datasets["sql"], tmp_path, seed=4))

    assert service.cache.loads - loads <= 1  # 0 if an earlier test left A resident
    assert second.result.base_reused is True and second.started().base_reused is True
    assert second.result.base_loads == service.cache.loads == first.result.base_loads  # no load for the second
    # The resident base after two trainings is the base on disk, byte for byte.
    assert tensors_sha256(service.cache.resident.model) == after_first == tensors_sha256(fresh(tiny_model))
    # Two different LoRAs were trained, and each was saved
    assert first.result.eval_loss != second.result.eval_loss
    for run in (first, second):
        assert (Path(run.result.staging) / "adapter_model.safetensors").is_file()


def test_each_job_reports_its_memory_and_sends_rss_as_its_last_metric(
        service: TrainerService, tiny_model: Path, demo_datasets: dict[str, Path], tmp_path: Path) -> None:
    run = Run(service, request("memory", tiny_model, demo_datasets["sql"], tmp_path))
    memory = run.result.memory
    assert memory is not None and memory.rss_mb > 50
    assert run.outcome.memory == memory
    assert run.result.pid and run.result.pid > 0 and set(run.result.timings) >= {"load_s", "train_s", "cleanup_s"}
    last_progress = [e for e in run.events if isinstance(e, Progress)][-1]
    assert last_progress.metrics == {"rss_mb": memory.rss_mb}
    assert last_progress.step == run.result.steps


def test_the_eval_rows_go_through_the_model_once_per_evaluation_and_the_last_one_is_published(
        service: TrainerService, tiny_model: Path, demo_datasets: dict[str, Path], tmp_path: Path) -> None:
    """The base's eval, then ``Trainer``'s at steps 2 and 4; the eval loss published is step 4's, not measured again."""
    import torch

    Run(service, request("warm", tiny_model, demo_datasets["sql"], tmp_path))  # makes A resident
    seen: dict[tuple[int, ...], int] = {}

    def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():  # evaluations; training runs with gradients (no generation: samples 0)
            ids = kwargs.get("input_ids", args[0] if args else None)
            key = tuple(ids.flatten().tolist())
            seen[key] = seen.get(key, 0) + 1

    handle = service.cache.resident.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        run = Run(service, request("once", tiny_model, demo_datasets["sql"], tmp_path, {"samples": 0}, eval_steps=2))
    finally:
        handle.remove()
    assert run.result.base_reused is True and seen
    assert set(seen.values()) == {3}, seen.values()  # base, step 2, step 4: no fourth pass after training
    evals = {e.step: e.metrics["eval_loss"] for e in run.events if isinstance(e, Progress) and "eval_loss" in e.metrics}
    assert sorted(evals) == [2, 4]
    assert run.result.eval_loss == evals[4]
    assert recorded_eval_loss_reproduced(run, tiny_model) == pytest.approx(run.result.eval_loss, rel=1e-4)


def test_the_fingerprint_sees_any_single_weight_changed(tiny_model: Path) -> None:
    import torch

    model = fresh(tiny_model)
    reference = basemodel.weights_checksum(model)
    assert basemodel.weights_checksum(fresh(tiny_model)) == reference
    weight = model.model.embed_tokens.weight
    # Not one of the evenly spaced samples: only the exact sum over every value can see it.
    index = weight.numel() // 2 + 1
    samples = basemodel.sample_indices(weight.numel(), basemodel.CHECKSUM_SAMPLES)
    assert index not in set(samples.tolist())
    with torch.no_grad():
        flat = weight.view(-1)
        flat[index] = torch.nextafter(flat[index], torch.tensor(float("inf")))  # the smallest change there is
        assert basemodel.weights_checksum(model) != reference
        flat[index] = torch.nextafter(flat[index], torch.tensor(float("-inf")))
    assert basemodel.weights_checksum(model) == reference


def test_the_fingerprint_holds_on_a_real_models_embedding_past_2_to_the_24_values() -> None:
    """SmolLM2's embedding, 49,152 x 576 = 28,311,552 values: a float32 linspace indexed one past its end."""
    import torch

    embedding = torch.nn.Embedding(49_152, 576)
    assert embedding.weight.numel() > 2**24
    reference = basemodel.weights_checksum(embedding)
    assert basemodel.weights_checksum(embedding) == reference
    index = basemodel.sample_indices(embedding.weight.numel(), basemodel.CHECKSUM_SAMPLES)
    assert index[0] == 0 and index[-1] == embedding.weight.numel() - 1 and len(set(index.tolist())) == len(index)
    with torch.no_grad():
        embedding.weight.view(-1)[-1] += 1.0  # the last value: a sample, and part of the exact sum
    assert basemodel.weights_checksum(embedding) != reference


def test_a_base_perturbed_between_jobs_is_dropped_and_reloaded(
        service: TrainerService, tiny_model: Path, demo_datasets: dict[str, Path], tmp_path: Path) -> None:
    import torch

    first = Run(service, request("before", tiny_model, demo_datasets["sql"], tmp_path))
    resident = service.cache.resident
    with torch.no_grad():
        resident.model.model.layers[0].mlp.up_proj.weight.view(-1)[7] += 1e-3
    loads = service.cache.loads
    assert service.cache.verify() is False
    assert service.cache.resident is None
    again = Run(service, request("after", tiny_model, demo_datasets["sql"], tmp_path))
    assert again.result.base_reused is False and service.cache.loads == loads + 1
    assert again.result.base_eval_loss == pytest.approx(first.result.base_eval_loss, abs=1e-6)
    assert tensors_sha256(service.cache.resident.model) == tensors_sha256(fresh(tiny_model))


def test_a_lora_merged_into_the_base_by_mistake_is_caught_and_the_base_reloaded(
        service: TrainerService, tiny_model: Path, demo_datasets: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora import LoraModel

    clean = Run(service, request("clean", tiny_model, demo_datasets["sql"], tmp_path))
    assert service.cache.resident is not None
    # The bug: a cleanup that merges the LoRA into the base instead of removing it.
    monkeypatch.setattr(LoraModel, "unload", lambda self, *a, **kw: self.merge_and_unload())
    merged = Run(service, request("merged", tiny_model, demo_datasets["sql"], tmp_path))
    assert merged.result.eval_loss < merged.result.base_eval_loss  # it trained: the merge changed weights
    assert service.cache.resident is None  # caught after the job: dropped
    monkeypatch.undo()

    loads = service.cache.loads
    after = Run(service, request("after-merge", tiny_model, demo_datasets["sql"], tmp_path))
    assert after.result.base_reused is False and service.cache.loads == loads + 1
    # The next job trains on the base as it is on disk, not on the merged one.
    assert after.result.base_eval_loss == pytest.approx(clean.result.base_eval_loss, abs=1e-6)
    assert tensors_sha256(service.cache.resident.model) == tensors_sha256(fresh(tiny_model))


def test_a_job_after_a_job_on_another_base_trains_against_its_own_base(
        service: TrainerService, tiny_model: Path, other_model: Path, demo_datasets: dict[str, Path],
        tmp_path: Path) -> None:
    on_a = Run(service, request("on-a", tiny_model, demo_datasets["sql"], tmp_path))
    loads = service.cache.loads
    on_b = Run(service, request("on-b", other_model, demo_datasets["sql"], tmp_path))
    back_on_a = Run(service, request("back-on-a", tiny_model, demo_datasets["sql"], tmp_path))

    assert on_b.result.base_reused is False and back_on_a.result.base_reused is False
    assert service.cache.loads == loads + 2  # B, then A again: one base resident at a time
    assert service.cache.resident.key.path == str(tiny_model)
    for run, base, wrong in ((on_b, other_model, tiny_model), (back_on_a, tiny_model, other_model)):
        config = json.loads((Path(run.result.staging) / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base)
        # The adapter, loaded with PEFT on a fresh load of its base, gives the eval loss the job recorded,
        assert recorded_eval_loss_reproduced(run, base) == pytest.approx(run.result.eval_loss, rel=1e-4)
        # and the base eval loss the job recorded is that base's, not the other one's.
        assert base_loss(run, base) == pytest.approx(run.result.base_eval_loss, rel=1e-4)
        assert base_loss(run, wrong) != pytest.approx(run.result.base_eval_loss, rel=1e-2)
    # Back on A, the same job trains the same adapter as before B came in between.
    assert back_on_a.result.base_eval_loss == pytest.approx(on_a.result.base_eval_loss, abs=1e-6)
    assert adapter_tensors(back_on_a) == adapter_tensors(on_a)


def adapter_tensors(run: Run) -> dict[str, bytes]:
    from safetensors.numpy import load_file

    return {k: v.tobytes() for k, v in load_file(Path(run.result.staging) / "adapter_model.safetensors").items()}



@pytest.mark.parametrize("graceful", [True, False])
def test_a_stop_sent_before_the_job_starts_training_holds(tiny_model: Path, demo_datasets: dict[str, Path],
                                                          tmp_path: Path, graceful: bool) -> None:
    """A real trainer process: the stop arrives while it is still importing and loading."""
    import time

    from loraq.executors.local import LocalExecutor

    executor = LocalExecutor(["cpu"], log_dir=tmp_path / "logs")
    executor.start()
    slot = executor.slots[0]
    try:
        executor.submit(slot, request("early", tiny_model, demo_datasets["sql"], tmp_path, max_steps=200, save_steps=50))
        executor.stop_job(slot, graceful=graceful)
        final = None
        deadline = time.monotonic() + 300
        while final is None and time.monotonic() < deadline:
            for _slot, message in executor.poll(0.5):
                if message.kind in FINAL_KINDS | {EventKind.EXITED}:
                    final = message.event
        assert final is not None
        if graceful:  # checkpointed at its first step and stopped, not trained to step 200
            assert final == Stopped(step=1, memory=final.memory, base_loads=final.base_loads)
            assert (tmp_path / "early" / "checkpoints" / "checkpoint-1" / "loraq-complete.json").is_file()
        else:
            assert isinstance(final, Aborted)
    finally:
        executor.shutdown()
