"""Packing: the plan (torch-free), packed against padded batches on a model of real shape, the loss of an
accumulated step, and the dry run's estimates against what trains.

The model-level tests use a random-init Llama of SmolLM2-135M's width (hidden 576, 9 query
heads sharing 3 key/value heads, intermediate 1536, the real 49,152-token vocabulary, tied
embeddings) with 2 layers: the shapes and the attention path of the real model, at a
fraction of its cost.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from loraq.data import packing

# ---------------------------------------------------------------- the plan


def lognormal_lengths(n: int, seed: int = 0, low: int = 30, high: int = 1024) -> list[int]:
    rng = random.Random(seed)
    return [min(high, max(low, round(rng.lognormvariate(5.0, 0.8)))) for _ in range(n)]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("batch_size, grad_accum", [(8, 1), (4, 2), (1, 4), (3, 3)])
def test_every_row_is_in_exactly_one_micro_batch_of_one_step_and_packed_steps_keep_to_their_budget(
        packed: bool, batch_size: int, grad_accum: int) -> None:
    lengths = lognormal_lengths(301)
    plan = packing.plan_train(lengths, batch_size=batch_size, grad_accum=grad_accum, packing=packed, seed=7)
    seen = Counter(i for step in plan.steps for micro in step for i in micro)
    assert seen == Counter(range(len(lengths)))
    assert all(len(step) == grad_accum for step in plan.steps)
    assert plan.n_micro == plan.n_steps * grad_accum
    if packed:
        budget = packing.step_budget(lengths, batch_size, grad_accum)
        for step in plan.steps:
            tokens = sum(lengths[i] for micro in step for i in micro)
            rows = sum(len(micro) for micro in step)
            assert tokens <= budget or rows == 1  # an example is never split: a longer one is a step alone
        stats = plan.stats(lengths)
        assert stats["fill"] > 0.9  # no padding: only an empty micro-batch's one token is laid out for nothing
        assert stats["laid_out_tokens_per_epoch"] - stats["tokens_per_epoch"] == stats["empty_micro_batches"]
        # about the rows of a padded step, so the optimizer takes about as many steps
        assert abs(plan.n_steps - len(lengths) / (batch_size * grad_accum)) <= 0.15 * plan.n_steps + 1
    else:
        assert plan.n_steps == -(-len(lengths) // (batch_size * grad_accum))
        assert all(len(micro) <= batch_size for step in plan.steps for micro in step)
        grouped = plan.stats(lengths)
        if batch_size > 1:  # grouped by length, padding costs less than in random batches
            assert grouped["laid_out_tokens_per_epoch"] < 0.8 * grouped["padded_random_tokens_per_epoch"]


@pytest.mark.parametrize("packed", [True, False])
def test_the_back_off_keeps_each_steps_rows_and_the_same_lengths_give_the_same_plan(packed: bool) -> None:
    """Halving the micro-batch and doubling grad_accum (the OOM back-off) cuts the same steps finer; the dry run
    plans from the lengths it counted, the trainer from the ones it encoded: equal lengths, equal plans."""
    lengths = lognormal_lengths(200, seed=3)
    before = packing.plan_train(lengths, batch_size=4, grad_accum=1, packing=packed, seed=11)
    after = packing.plan_train(lengths, batch_size=2, grad_accum=2, packing=packed, seed=11)
    assert [sorted(i for m in s for i in m) for s in before.steps] == [sorted(i for m in s for i in m)
                                                                       for s in after.steps]
    assert packing.plan_train(list(lengths), batch_size=4, grad_accum=1, packing=packed, seed=11) == before
    assert packing.steps_per_epoch(lengths, batch_size=4, grad_accum=1, packing=packed, seed=11) == before.n_steps
    if packed:  # padded, 200 rows are one length-sorted group whatever the seed (only the epochs' order moves)
        assert packing.plan_train(lengths, batch_size=4, grad_accum=1, packing=packed, seed=12) != before


def test_each_epoch_visits_every_step_once_in_its_own_order() -> None:
    orders = [packing.epoch_order(50, seed=5, epoch=e) for e in range(3)]
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert packing.epoch_order(50, seed=5, epoch=1) == orders[1]


def test_a_step_with_fewer_rows_than_grad_accum_gets_empty_micro_batches() -> None:
    plan = packing.plan_train([500, 20, 20, 20, 20], batch_size=1, grad_accum=4, packing=True, seed=0)
    long = next(step for step in plan.steps if any(0 in micro for micro in step))
    assert long[0] == (0,) and all(micro == () for micro in long[1:])


def test_eval_micro_batches_hold_every_row_once_within_the_budget() -> None:
    lengths = lognormal_lengths(97, seed=9)
    for packed in (True, False):
        micro = packing.plan_eval(lengths, budget=2000, batch_size=4, packing=packed)
        assert sorted(i for m in micro for i in m) == list(range(97))
        if packed:
            assert all(sum(lengths[i] for i in m) <= 2000 or len(m) == 1 for m in micro)
        else:
            assert all(len(m) <= 4 for m in micro)


# ---------------------------------------------------------------- packed and padded on a model of real shape


@pytest.fixture(scope="module")
def real_shape() -> Any:
    """SmolLM2-135M's shapes (GQA 9/3 heads, hidden 576, vocabulary 49,152, tied embeddings), 2 layers, random
    init, with a LoRA on every linear layer (B initialised at random, so every LoRA weight gets a gradient)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    assert model.config.use_cache  # as a real checkpoint's config says: the trap is live
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora).eval()


def rows_of(lengths: list[int], seed: int = 1) -> list[dict[str, list[int]]]:
    """Rows of random tokens, a prompt of a third untrained, as the encoder makes them."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(49152) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


def loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """The mean loss over the batch's trainable tokens (as transformers computes it with num_items_in_batch)
    and the gradient of every LoRA weight."""
    count = int((batch["labels"][:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    out = model(**batch, num_items_in_batch=count)
    out.loss.backward()
    return float(out.loss.detach()), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def assert_packed_equals_padded(model: Any, rows: list[dict[str, list[int]]], *, packed_extra: dict[str, Any]) -> None:
    from loraq.model.batching import Collator, PackedCollator

    padded_loss, padded = loss_and_grads(model, Collator(0)(rows))
    packed_batch = PackedCollator(0)(rows) | packed_extra
    packed_loss, grads = loss_and_grads(model, packed_batch)
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5, rel=1e-5)
    for name, grad in padded.items():
        scale = float(grad.abs().max())
        gap = float((grads[name] - grad).abs().max())
        assert gap <= 1e-5 * max(1.0, scale), f"{name}: packed gradient off by {gap:.3g} (scale {scale:.3g})"


# Lengths like real chat data (MEASURED.md: 34 to 267 tokens), one row of a single token's worth of prompt.
REAL_LENGTHS = [34, 120, 7, 267, 58, 191, 81, 147]


def test_a_packed_batch_gives_the_padded_loss_and_lora_gradients_on_a_model_of_real_shape(real_shape: Any) -> None:
    from loraq.model.batching import PackedCollator

    batch = PackedCollator(0)(rows_of(REAL_LENGTHS))
    assert batch["use_cache"] is False and "attention_mask" not in batch
    starts = [sum(REAL_LENGTHS[:k]) for k in range(len(REAL_LENGTHS))]
    assert all(int(batch["position_ids"][0, s]) == 0 for s in starts)
    assert all(int(batch["labels"][0, s]) == -100 for s in starts)  # no row learns its neighbour's first token
    assert_packed_equals_padded(real_shape, rows_of(REAL_LENGTHS), packed_extra={})


def test_the_comparison_fails_when_the_mask_is_lost_with_the_cache_on(real_shape: Any) -> None:
    """With ``use_cache=True`` the model makes a cache, transformers then builds no block-diagonal mask, and the
    packed rows attend to each other: the same comparison must fail (it is what the test above would say if
    the collator ever dropped ``use_cache=False``)."""
    with pytest.raises(AssertionError, match="comparison failed|packed gradient"):
        assert_packed_equals_padded(real_shape, rows_of(REAL_LENGTHS), packed_extra={"use_cache": True})


def test_the_trainers_probe_tells_a_model_that_keeps_packed_rows_apart_from_one_that_does_not(real_shape: Any) -> None:
    import torch

    from loraq.model.batching import attends_across_rows

    assert attends_across_rows(real_shape, 49152) is None

    class CacheOn(torch.nn.Module):  # a model whose forward ignores use_cache=False: the mask is lost
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kw: Any) -> Any:
            return self.inner(**(kw | {"use_cache": True}))

    gap = attends_across_rows(CacheOn(real_shape), 49152)
    assert gap is not None and gap > 1e-3


def test_evaluation_gives_the_same_loss_packed_padded_and_row_by_row(real_shape: Any) -> None:
    from loraq.model.batching import Collator, EvalBatches, ListDataset, PackedCollator
    from loraq.model.evaluation import evaluate_loss

    items = rows_of(REAL_LENGTHS, seed=4)
    lengths = [len(r["input_ids"]) for r in items]
    one_by_one = evaluate_loss(real_shape, ListDataset(items), Collator(0), 1)
    packed = evaluate_loss(real_shape, EvalBatches(items, packing.plan_eval(lengths, budget=400, batch_size=3,
                                                                            packing=True)), PackedCollator(0))
    padded = evaluate_loss(real_shape, EvalBatches(items, packing.plan_eval(lengths, budget=400, batch_size=3,
                                                                            packing=False), False), Collator(0))
    assert packed == pytest.approx(one_by_one, rel=1e-5) and padded == pytest.approx(one_by_one, rel=1e-5)


# ---------------------------------------------------------------- the loss of an accumulated step


@pytest.mark.parametrize("packed", [True, False])
def test_an_accumulated_step_trains_on_the_mean_over_all_its_trainable_tokens(packed: bool, tmp_path: Path) -> None:
    """One optimizer step of 2 micro-batches with very different token counts, through transformers' Trainer as
    loraq drives it: the LoRA gradients are those of the mean loss over every trainable token of the step,
    not the mean of the two micro-batches' means."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from loraq.model.batching import Collator, MicroBatches, PackedCollator, collator_for, sequential_trainer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(config), lora)
    rng = random.Random(2)
    items = []
    for n in (90, 10, 12):
        ids = [rng.randrange(512) for _ in range(n)]
        items.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    plan = packing.Plan(steps=(((0,), (1, 2)),), packed=packed, grad_accum=2)  # 87 trained tokens against 16

    captured: dict[str, Any] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            captured.update({k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad})

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1, remove_unused_columns=False, disable_tqdm=True)
    trainer = sequential_trainer(Trainer)(model=model, args=args, train_dataset=MicroBatches(items, plan, seed=0),
                                          data_collator=collator_for(packed, 0), callbacks=[Capture()])
    trainer.train()
    assert captured

    # The reference: the same three rows in one batch, the loss summed over every trainable token / their count.
    torch.manual_seed(0)
    fresh = get_peft_model(LlamaForCausalLM(config), lora)  # the same initial weights as the trained model had
    batch = (PackedCollator(0) if packed else Collator(0))(items)
    count = int((batch["labels"][:, 1:] != -100).sum())
    fresh.zero_grad()
    fresh(**batch, num_items_in_batch=count).loss.backward()
    expected = {k: p.grad for k, p in fresh.named_parameters() if p.requires_grad}
    for name, grad in expected.items():
        assert torch.allclose(captured[name], grad, atol=1e-6, rtol=1e-4), name
    # ... and not the mean of the micro-batch means
    means = []
    for rows in ([items[0]], items[1:]):
        fresh.zero_grad()
        sub = (PackedCollator(0) if packed else Collator(0))(rows)
        fresh(**sub, num_items_in_batch=int((sub["labels"][:, 1:] != -100).sum())).loss.backward()
        means.append({k: p.grad.clone() for k, p in fresh.named_parameters() if p.requires_grad})
    name = next(iter(expected))
    assert not torch.allclose(captured[name], (means[0][name] + means[1][name]) / 2, atol=1e-6, rtol=1e-3)


# ---------------------------------------------------------------- the dry run's estimate is what trains


@pytest.mark.slow
@pytest.mark.parametrize("packed", [True, False])
def test_the_dry_run_estimates_the_steps_and_epochs_that_train(packed: bool, workdir: Path) -> None:
    from conftest import write_queue
    from test_controls_train import jobs, loraq

    body = f"""\
defaults:
  base_model: ./models/tiny
  lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}}
  training: {{epochs: 2, learning_rate: 5.0e-3, batch_size: 4, grad_accum: 2, max_seq_len: 64, save_steps: 100,
             logging_steps: 5, seed: 3, packing: {str(packed).lower()}}}
  validation: {{split: 0.1}}
jobs:
  - name: chat
    dataset: ./data/support.jsonl
"""
    home = workdir / ".loraq"
    queue = write_queue(workdir, body)
    dry = loraq(home, "submit", str(queue), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)["jobs"][0]["dataset"]
    assert report["batches"]["packed"] is packed
    assert loraq(home, "submit", str(queue)).returncode == 0
    ran = loraq(home, "run", "--devices", "cpu")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    result = jobs(home)["chat"].result
    assert result["steps"] == result["max_steps"] == report["est_steps"]
    assert result["extras"]["packing"]["steps_per_epoch"] == report["batches"]["steps_per_epoch"]
    assert result["extras"]["packing"]["epochs_trained"] == pytest.approx(report["est_epochs"]) == 2
    assert result["extras"]["packing"]["packed"] is packed
