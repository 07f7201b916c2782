"""Real sizes in the fast tests: the bugs a real base met that the 1 M-parameter demo model hides.

The models (``shaped_models``, built once per session by tests/shapes.py) have an
embedding past 2**24 values, a 150,016-token vocabulary whose used ids are all above
149,000, grouped-query attention, and tied or untied embeddings. On them: the base
fingerprint, a whole training job in the trainer (exact match and samples included),
the inspector against the base with data (layout, size budget, load, eval), LoRA on
the embedding itself, the collator, the submit-time token analysis, and the
safetensors reader on a file past 4 GiB (sparse: it costs no disk).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

import shapes
from loraq import demo
from loraq.model import base as basemodel
from loraq.protocol import Done, JobInput, TrainRequest
from loraq.queue.spec import JobSpec


@pytest.fixture(scope="module")
def sql(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.write_jsonl(tmp_path_factory.mktemp("shaped-data") / "sql.jsonl", demo.sql_rows(60, random.Random(4)))


def test_the_models_have_the_shapes_they_claim(shaped_models: dict[str, Path]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    for name, folder in shaped_models.items():
        config = AutoConfig.from_pretrained(folder)
        tied, heads, kv_heads = shapes.SHAPES[name]
        assert config.vocab_size * config.hidden_size > 2**24
        assert (config.num_attention_heads, config.num_key_value_heads) == (heads, kv_heads) and kv_heads < heads
        assert config.tie_word_embeddings is tied
        ids = AutoTokenizer.from_pretrained(folder)("Question: How many users are in Paris?\nSQL:")["input_ids"]
        assert min(ids) >= shapes.SHIFT > 2**16


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_the_fingerprint_covers_every_value_of_a_big_model(shaped_models: dict[str, Path], name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shaped_models[name]).eval()
    reference = basemodel.weights_checksum(model)
    assert basemodel.weights_checksum(AutoModelForCausalLM.from_pretrained(shaped_models[name])) == reference
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        flat = weight.data.view(-1)
        for index in (flat.numel() - 1, flat.numel() // 2 + 3):  # the last value (a sample), one between samples
            with torch.no_grad():
                saved = flat[index].clone()
                flat[index] = torch.nextafter(saved, torch.tensor(float("inf")))
                assert basemodel.weights_checksum(model) != reference, (name, index)
                flat[index] = saved
        assert basemodel.weights_checksum(model) == reference


def request(name: str, base: Path, dataset: Path, folder: Path, lora: dict[str, Any] | None = None) -> TrainRequest:
    spec = JobSpec.model_validate({
        "name": name, "base_model": str(base), "dataset": {"path": str(dataset), "format": "prompt_completion"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]} | (lora or {}),
        "training": {"max_steps": 3, "learning_rate": 5.0e-3, "batch_size": 2, "max_seq_len": 48, "save_steps": 3,
                     "logging_steps": 1, "seed": 3},
        "validation": {"split": 0.1, "metrics": ["exact_match"], "samples": 2},
    })
    job_dir = folder / name
    return TrainRequest(job_id=1, attempt=1, epoch=1,
                        job=JobInput(spec=spec.model_dump(mode="json"), base_model=str(base), dataset_path=str(dataset)),
                        log_path=str(job_dir / "train.log"), checkpoints_dir=str(job_dir / "checkpoints"),
                        staging_dir=str(job_dir / "staging"))


@pytest.fixture(scope="module")
def service() -> Any:
    import torch

    from loraq.train.service import TrainerService

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TrainerService(device="cpu")
    torch.set_num_threads(threads)


CASES = {
    "gqa-tied": None,
    "gqa-untied": None,
    # LoRA on the 150,016 x 128 embedding itself: lora_embedding_A is r x 150,016
    "gqa-untied-embedding": {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_job_trains_inspects_and_leaves_the_base_as_loaded(service: Any, shaped_models: dict[str, Path], sql: Path,
                                                             tmp_path: Path, case: str) -> None:
    from loraq.inspect import inspect_adapter

    base = shaped_models[case.removesuffix("-embedding")]
    outcome = service.run_job(request(case, base, sql, tmp_path, CASES[case]), lambda event: None)
    assert isinstance(outcome, Done), outcome
    result = outcome.result
    assert result.eval_loss < result.base_eval_loss  # ln(150,016) = 11.9 at random init: it learns the few ids used
    assert set(result.metrics) == {"exact_match", "base_exact_match"} and len(result.extras["samples"]) == 2
    assert service.cache.verify()  # the fingerprint of the 19 M-value embedding(s): unchanged
    report = inspect_adapter(result.staging, base=str(base), data=str(sql), max_seq_len=48)
    assert report.passed, [f for f in report.findings if f.severity == "error"]
    assert report.stats["eval_loss"] < report.stats["base_eval_loss"]
    assert not [f for f in report.findings if f.severity == "warning"], report.findings
    # only LoRA weights: PEFT's default would add the whole 150,016 x 128 embedding (77 MB) beside LoRA on it
    from safetensors import safe_open

    weights = Path(result.staging) / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as fh:
        assert all("lora_" in key for key in fh.keys()), list(fh.keys())
    assert weights.stat().st_size < 4 * (4 * shapes.VOCAB + 4 * 10 * shapes.HIDDEN) + 65536


def test_the_collator_keeps_ids_past_2_to_the_16_exactly() -> None:
    from loraq.model.batching import Collator

    ids = [shapes.VOCAB - 1, shapes.SHIFT, 2**16 + 1, 2**24 + 1]
    batch = Collator(pad_id=shapes.SHIFT + 1)([{"input_ids": ids, "labels": ids}, {"input_ids": ids[:1], "labels": [-100]}])
    assert batch["input_ids"][0].tolist() == ids and batch["labels"][0].tolist() == ids
    assert batch["input_ids"][1].tolist() == [ids[0]] + [shapes.SHIFT + 1] * 3


def test_submit_counts_tokens_of_a_wide_vocabulary_exactly(shaped_models: dict[str, Path], sql: Path,
                                                             tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from loraq import data
    from loraq.data import check as datacheck
    from loraq.queue.spec import ResolvedJob

    base = shaped_models["gqa-tied"]
    spec = JobSpec.model_validate({"name": "wide", "base_model": str(base),
                                   "dataset": {"path": str(sql), "format": "prompt_completion"},
                                   "training": {"max_seq_len": 30}})
    job = ResolvedJob(spec=spec, queue_file=str(tmp_path / "q.yaml"), base_model=str(base), dataset_path=str(sql))
    report = datacheck.analyze_job(job, cache=datacheck.TokenCache())
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = data.load_dataset(sql).rows
    lengths = [len(data.encode(row, "prompt_completion", tokenizer, 10_000).input_ids) for row in rows]
    assert report.tokens.total == sum(lengths) and report.tokens.max == max(lengths)
    assert report.truncated_rows == sum(1 for n in lengths if n > 30)


def test_the_safetensors_reader_handles_offsets_past_4_gib(tmp_path: Path) -> None:
    """A 4 GiB tensor, then a small one after it: offsets past 2**32, read by seeking, not by reading it all."""
    import os

    import numpy as np

    from loraq.inspect import safetensors as st

    big = 2**30 + 1  # F32 values: 4 GiB + 4 bytes
    small = np.array([0.5, -3.25, 0.0, 2.0], dtype="<f4")
    header = {"big": {"dtype": "F32", "shape": [big], "data_offsets": [0, 4 * big]},
              "small": {"dtype": "F32", "shape": [4], "data_offsets": [4 * big, 4 * big + 16]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.seek(8 + len(raw) + 4 * big)
        fh.write(small.tobytes())
    assert os.path.getsize(path) > 2**32
    fd, stat = st.open_regular(path)
    try:
        parsed, defects = st.read_header(fd, stat.st_size)
        assert defects == [] and parsed is not None
        assert [(t.name, t.begin, t.end) for t in parsed.tensors] == [("big", 0, 4 * big),
                                                                       ("small", 4 * big, 4 * big + 16)]
        values, defects = st.scan_values(fd, parsed, names=["small"])
        assert defects == [] and values["small"] == st.Values(finite=True, nonzero=True, max_abs=3.25)
    finally:
        os.close(fd)
