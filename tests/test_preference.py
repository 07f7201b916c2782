"""Preference tuning (issue 23): pair formats and their row errors, the method's spec, the losses against TRL's
trainers, and a DPO job through the queue on the tiny model, published and loaded with PEFT."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import LORAQ, write_queue
from loraq.data import check_dataset
from loraq.queue.spec import JobSpec

# ---------------------------------------------------------------- data


def pairs_rows(n: int = 40) -> list[dict[str, Any]]:
    """Plain-text pairs with one clear preference: the right sum over a wrong one."""
    return [{"prompt": f"{a} plus {b} is", "chosen": f" {a + b}.", "rejected": f" {a + b + 3}, I think."}
            for a in range(1, 9) for b in range(1, 6)][:n]


def openai_rows(n: int = 30) -> list[dict[str, Any]]:
    return [{"input": {"messages": [{"role": "user", "content": f"Greet visitor {i}."}]},
             "preferred_output": [{"role": "assistant", "content": f"Hello, visitor {i}!"}],
             "non_preferred_output": [{"role": "assistant", "content": "Go away."}]} for i in range(n)]


def conversational_rows(n: int = 20) -> list[dict[str, Any]]:
    return [{"prompt": [{"role": "user", "content": f"Say {i}"}],
             "chosen": [{"role": "assistant", "content": f"{i}"}],
             "rejected": [{"role": "assistant", "content": f"{i + 1}"}]} for i in range(n)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(("rows", "fmt"), [(pairs_rows(), "preference"), (conversational_rows(), "preference"),
                                           (openai_rows(), "openai_preference")])
def test_pair_formats_are_detected(tmp_path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    dataset, problems = check_dataset(write_jsonl(tmp_path / "p.jsonl", rows))
    assert problems.count == 0, problems.problems()
    assert dataset is not None and dataset.format == fmt and len(dataset) == len(rows)


def test_row_errors_name_the_line_and_the_field(tmp_path: Path) -> None:
    rows: list[Any] = pairs_rows(5)
    rows += [{"prompt": "p", "chosen": " same", "rejected": "same "},  # line 6: identical once trimmed
             {"prompt": "p", "chosen": 3, "rejected": "x"},  # line 7
             {"prompt": "p", "chosen": "", "rejected": "x"},  # line 8
             {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]}]  # line 9: an answer that is a user turn
    _, problems = check_dataset(write_jsonl(tmp_path / "p.jsonl", rows))
    found = {p.line: (p.category, p.message) for p in problems.problems()}
    assert found[6][0] == "identical_pair" and "'chosen' and 'rejected'" in found[6][1]
    assert found[7][0] == "wrong_type" and "'chosen'" in found[7][1]
    assert found[8][0] == "empty_example"
    assert found[9][0] == "unrecognized_role" and "'chosen'[0]" in found[9][1]
    assert set(found) == {6, 7, 8, 9}


def test_openai_rows_are_checked_like_openai_checks_them(tmp_path: Path) -> None:
    rows: list[Any] = openai_rows(3)
    rows.append({"input": {"messages": [{"role": "user", "content": "q"}]},
                 "preferred_output": [{"role": "assistant", "content": "same"}],
                 "non_preferred_output": [{"role": "assistant", "content": "same"}]})
    rows.append({"input": {"messages": [{"role": "user", "content": "q"}], "extra": 1},
                 "preferred_output": [{"role": "assistant", "content": "a"}],
                 "non_preferred_output": [{"role": "assistant", "content": "b"}]})
    _, problems = check_dataset(write_jsonl(tmp_path / "o.jsonl", rows))
    found = {p.line: p.category for p in problems.problems()}
    assert found == {4: "identical_pair", 5: "unrecognized_key"}


# ---------------------------------------------------------------- the spec


def job(**fields: Any) -> JobSpec:
    return JobSpec.model_validate({"name": "j", "base_model": "./m", "dataset": "d.jsonl", **fields})


def test_method_defaults_are_the_papers_and_trls() -> None:
    assert job().method is None and job().model_dump(mode="json")["method"] == "sft"
    dpo = job(method="dpo").method
    assert dpo is not None and (dpo.type, dpo.beta, dpo.loss) == ("dpo", 0.1, "sigmoid")
    orpo = job(method={"type": "orpo"}).method
    assert orpo is not None and orpo.beta == 0.1
    simpo = job(method={"type": "simpo"}).method
    assert simpo is not None and (simpo.beta, simpo.gamma_beta_ratio) == (2.0, 0.5)
    again = JobSpec.model_validate(job(method={"type": "dpo", "beta": 0.3}).model_dump(mode="json"))
    assert again.method is not None and again.method.beta == 0.3


@pytest.mark.parametrize(("fields", "said"), [
    ({"method": {"type": "dpo", "beta": 0}}, "greater than 0"),
    ({"method": {"type": "dpo", "beta": 15}}, "at most 10"),
    ({"method": {"type": "dpo", "gamma_beta_ratio": 1}}, "SimPO's margin"),
    ({"method": {"type": "kto"}}, "'dpo', 'orpo' or 'simpo'"),
    ({"method": "ppo"}, "must be sft"),
    ({"method": "dpo", "training": {"fused_loss": True}}, "fused_loss"),
    ({"method": "dpo", "validation": {"metrics": ["rouge_l"], "early_stopping": {"patience": 2, "metric": "rouge_l"}}},
     "early_stopping.metric: a preference job stops on eval_loss"),
    ({"method": "dpo", "lora": {"init": "pissa"}}, "lora.init"),
    ({"method": "dpo", "dataset": {"path": "d.jsonl", "format": "chat"}}, "has none"),
    ({"dataset": {"path": "d.jsonl", "format": "preference"}}, "set method"),
    ({"validation": {"metrics": ["preference_accuracy"]}}, "only a job with method"),
])
def test_bad_method_settings_are_refused_with_the_reason(fields: dict[str, Any], said: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=said.replace("(", r"\(").replace(")", r"\)")):
        job(**fields)


def test_min_preference_accuracy_is_the_general_gate() -> None:
    spec = job(method="dpo", validation={"min_preference_accuracy": 0.8})
    assert spec.validation.min == {"preference_accuracy": 0.8}
    assert spec.validation.metrics == ["preference_accuracy"]
    assert job(method="dpo", validation={"metrics": ["preference_accuracy"],
                                         "min": {"preference_accuracy": 0.7}}).validation.gate_metric == \
        "preference_accuracy"


# ---------------------------------------------------------------- the losses against TRL's trainers


def _trl_trainer(which: str, model_dir: Path, out: Path) -> Any:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    rows = Dataset.from_list(pairs_rows(8))
    common: dict[str, Any] = {"output_dir": str(out), "per_device_train_batch_size": 4, "report_to": [],
                              "use_cpu": True, "max_length": 64, "seed": 0}
    if which == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(model=model, args=DPOConfig(**common, beta=0.3), train_dataset=rows,
                          processing_class=tokenizer, peft_config=peft)
    if which == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(model=model, args=ORPOConfig(**common, beta=0.25), train_dataset=rows,
                           processing_class=tokenizer, peft_config=peft)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    # SimPO as TRL runs it: CPO's simpo loss without its NLL term; simpo_gamma is gamma = ratio x beta
    return CPOTrainer(model=model, args=CPOConfig(**common, beta=2.0, loss_type="simpo", cpo_alpha=0.0,
                                                  simpo_gamma=0.5 * 2.0),
                      train_dataset=rows, processing_class=tokenizer, peft_config=peft)


def _grads(model: Any) -> dict[str, Any]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _our_batch(which: str, batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """TRL's batch in loraq's layout: [chosen; rejected] ids, attention mask and answer labels (-100 elsewhere)."""
    import torch

    if which == "dpo":  # DPOTrainer's own layout: [chosen; rejected] with a completion mask
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)}
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def pad(t: Any, value: int) -> Any:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return {"input_ids": torch.cat([pad(batch["chosen_input_ids"], pad_id), pad(batch["rejected_input_ids"], pad_id)]),
            "attention_mask": torch.cat([pad(batch["chosen_attention_mask"], 0),
                                         pad(batch["rejected_attention_mask"], 0)]),
            "labels": torch.cat([pad(batch["chosen_labels"], -100), pad(batch["rejected_labels"], -100)])}


@pytest.mark.parametrize("which", ["dpo", "orpo", "simpo"])
def test_loss_and_gradients_agree_with_trls_trainers(which: str, tiny_model: Path, tmp_path: Path) -> None:
    import torch

    from loraq.queue.spec import PreferenceMethod
    from loraq.train.preference import forward_logps, preference_loss

    trainer = _trl_trainer(which, tiny_model, tmp_path / "trl")
    model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking LoRA: the policy differs from the reference (the base)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    their_grads = _grads(model)

    settings = {"dpo": {"type": "dpo", "beta": 0.3}, "orpo": {"type": "orpo", "beta": 0.25},
                "simpo": {"type": "simpo", "beta": 2.0, "gamma_beta_ratio": 0.5}}[which]
    method = PreferenceMethod.model_validate(settings)
    ours_batch = _our_batch(which, batch, trainer.processing_class.pad_token_id)
    if which == "dpo":  # the reference: the base, the adapter disabled
        with torch.no_grad(), model.disable_adapter():
            reference = forward_logps(model, ours_batch)
        ours_batch |= {"ref_chosen": reference.chosen, "ref_rejected": reference.rejected}
    ours, _ = preference_loss(method, forward_logps(model, ours_batch))
    ours.backward()
    our_grads = _grads(model)

    assert abs(float(ours.detach()) - float(theirs.detach())) < 1e-5, (float(ours.detach()), float(theirs.detach()))
    assert our_grads.keys() == their_grads.keys() and our_grads
    worst = max(float((our_grads[k] - their_grads[k]).abs().max()) for k in our_grads)
    assert worst < 1e-5, worst
    assert max(float(g.abs().max()) for g in our_grads.values()) > 1e-4  # the gradients compared are not all zero


def _random_pairs(vocab: int) -> dict[str, Any]:
    """Two pairs as loraq batches them: [chosen; rejected], right-padded, -100 on the prompts and the padding."""
    import torch

    shapes = [(3, 4), (5, 2), (2, 6), (4, 3)]  # (prompt, answer) tokens of each row
    width = max(p + a for p, a in shapes) + 1
    generator = torch.Generator().manual_seed(1)
    ids = torch.zeros((len(shapes), width), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, (prompt, answer) in enumerate(shapes):
        ids[row, :prompt + answer] = torch.randint(1, vocab, (prompt + answer,), generator=generator)
        labels[row, prompt:prompt + answer] = ids[row, prompt:prompt + answer]
        mask[row, :prompt + answer] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize(("tied", "targets"), [(False, "all-linear"), (False, ["q_proj", "lm_head"]),
                                               (True, ["embed_tokens", "v_proj", "lm_head"])])
def test_the_answer_positions_pass_is_the_full_forwards(tied: bool, targets: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM head on the scored positions only (in one chunk or several) gives the log-probabilities and gradients
    of the full forward's vocabulary-wide logits, an adapter on the head or on tied embeddings included."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraq.train import preference

    vocab = 96
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():  # a trained-looking LoRA
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, 0.2)
    batch = _random_pairs(vocab)

    def run() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        logps = preference.forward_logps(model, batch)
        assert logps.chosen_full is not None
        (logps.chosen.sum() - 0.5 * logps.rejected.sum() + 0.25 * logps.chosen_full.sum()).backward()
        with torch.no_grad(), model.disable_adapter():
            reference = preference.forward_logps(model, batch, nll=False)
        assert reference.chosen_full is None
        values = {"chosen": logps.chosen, "rejected": logps.rejected, "chosen_full": logps.chosen_full,
                  "ref_chosen": reference.chosen, "ref_rejected": reference.rejected}
        counts = {"chosen": logps.chosen_tokens, "rejected": logps.rejected_tokens, "full": logps.chosen_full_tokens}
        return {k: v.detach().clone() for k, v in values.items()}, counts, _grads(model)

    lean = run()
    monkeypatch.setattr(preference, "HEAD_CHUNK_BYTES", 4 * vocab * 3)  # three rows a chunk, recomputed in backward
    chunked = run()
    monkeypatch.setattr(preference, "_lean_parts", lambda model: None)  # the model's own forward, every position
    full = run()
    if "lm_head" in targets:
        assert any("lm_head" in k and "lora" in k for k in full[2])
    for got in (lean, chunked):
        assert got[0].keys() == full[0].keys() and got[2].keys() == full[2].keys() and full[2]
        for key in full[0]:
            assert torch.allclose(got[0][key], full[0][key], atol=1e-5, rtol=0), key
        assert all(torch.equal(got[1][k], full[1][k]) for k in full[1])
        worst = max(float((got[2][k] - full[2][k]).abs().max()) for k in full[2])
        assert worst < 1e-5, worst
    assert max(float(g.abs().max()) for g in full[2].values()) > 1e-4


def test_a_model_that_transforms_its_logits_gets_its_own_forward() -> None:
    """Softcapping or a logit scale after the head (Gemma 2, Cohere, Granite): the lean pass would miss it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraq.train import preference

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert preference._lean_parts(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert preference._lean_parts(model) is None


# ---------------------------------------------------------------- through the queue


def loraq(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"loraq {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


QUEUE = """\
defaults:
  base_model: ./models/tiny
  lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}
  training: {epochs: 3, learning_rate: 1.0e-2, batch_size: 8, max_seq_len: 48, save_steps: 5, logging_steps: 2}
  validation: {split: 0.2, samples: 2}
retry_backoff_s: 0
jobs:
"""


@pytest.fixture
def pairs_dir(tmp_path: Path, tiny_model: Path) -> Path:
    (tmp_path / "models").mkdir()
    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs_rows(40))
    write_jsonl(tmp_path / "data" / "openai.jsonl", openai_rows(20))
    return tmp_path


def test_dry_run_shows_pairs_and_refuses_a_prompt_with_no_room(pairs_dir: Path) -> None:
    write_jsonl(pairs_dir / "data" / "long.jsonl", pairs_rows(10) + [{"prompt": "word " * 200, "chosen": "a",
                                                                       "rejected": "b"}])
    queue = write_queue(pairs_dir, QUEUE + "  - name: ok\n    dataset: ./data/pairs.jsonl\n    method: dpo\n"
                        "  - name: long\n    dataset: ./data/long.jsonl\n    method: {type: orpo}\n")
    refused = loraq(pairs_dir / "h", "submit", str(queue), "--dry-run", check=False)
    assert refused.returncode == 1
    assert "long.jsonl:11: [untrainable] chosen: the prompt leaves no room for the answer at max_seq_len 48" in \
        refused.stderr
    assert "long.jsonl:11: [untrainable] rejected:" in refused.stderr
    queue = write_queue(pairs_dir, QUEUE + "  - name: ok\n    dataset: ./data/pairs.jsonl\n    method: dpo\n")
    shown = loraq(pairs_dir / "h", "submit", str(queue), "--dry-run").stdout
    assert "train / eval: 32 / 8 pairs" in shown
    assert "pairs: 40 (prompt_completion sides), method dpo beta 0.1" in shown
    assert "chosen tokens: mean" in shown and "rejected tokens: mean" in shown and "truncated 0" in shown
    packed = write_queue(pairs_dir, QUEUE + "  - name: p\n    dataset: ./data/pairs.jsonl\n    method: dpo\n"
                         "    training: {packing: true}\n")
    refused = loraq(pairs_dir / "h", "submit", str(packed), "--dry-run", check=False)
    assert refused.returncode == 1 and "training.packing" in refused.stderr and "trains padded" in refused.stderr


def test_a_dpo_job_trains_through_the_queue_and_publishes_a_plain_peft_lora(pairs_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    home = pairs_dir / "h"
    queue = write_queue(pairs_dir, QUEUE + "  - name: dpo\n    dataset: ./data/pairs.jsonl\n"
                        "    method: {type: dpo, beta: 0.5}\n    validation: {min_preference_accuracy: 0.5}\n"
                        "    tracking: {report_to: [tensorboard]}\n"
                        "  - name: oai-simpo\n    dataset: ./data/openai.jsonl\n    method: simpo\n"
                        "    training: {epochs: 1}\n"
                        "  - name: warm\n    after: sft\n    dataset: ./data/pairs.jsonl\n    method: dpo\n"
                        "    training: {epochs: 1}\n"
                        "  - name: sft\n    dataset: ./data/sft.jsonl\n    training: {max_steps: 3}\n")
    write_jsonl(pairs_dir / "data" / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                                   for r in pairs_rows(20)])
    loraq(home, "submit", str(queue))
    loraq(home, "run")
    jobs = {j["name"]: j for j in json.loads(loraq(home, "status", "--json").stdout)["jobs"]}
    assert {j["status"] for j in jobs.values()} == {"completed"}, jobs
    dpo = jobs["dpo"]
    assert dpo["attempts"] == 1
    assert dpo["eval_loss"] < dpo["base_eval_loss"]  # below ln 2, DPO's loss where the policy is the reference
    assert abs(dpo["base_eval_loss"] - 0.6931) < 1e-3
    assert dpo["preference_accuracy"] >= 0.5 and dpo["base_preference_accuracy"] is not None
    assert "preference accuracy base -> adapter" in loraq(home, "status").stdout

    shown = json.loads(loraq(home, "show", "dpo", "--json").stdout)
    logged = {m["name"] for m in shown["metrics"]}
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "logps_chosen", "logps_rejected"} <= logged
    assert "preference_accuracy: base" in loraq(home, "show", "dpo").stdout
    # The experiment trackers get the preference metrics as the job's events do, and the final figures.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(home / "tensorboard" / "dpo"))
    board.Reload()
    tracked = set(board.Tags()["scalars"])
    assert {"loss", "eval_loss", "reward_margin", "eval_rewards_chosen", "preference_accuracy",
            "base_preference_accuracy", "base_eval_loss"} <= tracked, tracked
    assert board.Scalars("preference_accuracy")[-1].value == pytest.approx(dpo["preference_accuracy"])
    report = loraq(home, "report", "--format", "md", "-o", str(pairs_dir / "report.md"))
    assert report.returncode == 0 and "preference\\_accuracy" in (pairs_dir / "report.md").read_text()  # md-escaped

    folder = home / "adapters" / "dpo"
    manifest = json.loads((folder / "loraq-manifest.json").read_text())
    assert manifest["method"]["type"] == "dpo" and manifest["method"]["beta"] == 0.5
    assert manifest["method"]["reference"] == "the base"
    assert "| method | DPO (beta=0.5" in (folder / "README.md").read_text()
    inspection = json.loads((folder / "inspection.json").read_text())
    assert inspection["passed"]

    base = AutoModelForCausalLM.from_pretrained(str(pairs_dir / "models" / "tiny"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder))  # an ordinary PEFT LoRA
    assert any("lora_B" in n and float(p.abs().max()) > 0 for n, p in model.named_parameters())
    # The published figures are the published weights' (taken from Trainer's evaluation of the last step, which is
    # not run a second time): measured again here on the held-out split, they agree.
    from transformers import AutoTokenizer

    from loraq.data import split_indices
    from loraq.queue.spec import PreferenceMethod
    from loraq.train.preference import PairCollator, add_reference, encode_pairs, evaluate_pairs

    tokenizer = AutoTokenizer.from_pretrained(str(pairs_dir / "models" / "tiny"))
    rows = pairs_rows(40)
    items, _, _, _ = encode_pairs([rows[i] for i in split_indices(len(rows), 0.2, 42)[1]], "preference", tokenizer,
                                  48, None)
    collator = PairCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    add_reference(model, items, collator, 8, disable_adapter=True)
    again = evaluate_pairs(model, items, collator, PreferenceMethod(type="dpo", beta=0.5), 8)
    assert len(items) == shown["job"]["result"]["n_eval"] == 8
    assert again.accuracy == dpo["preference_accuracy"] and abs(again.loss - dpo["eval_loss"]) < 1e-4
    simpo = json.loads((home / "adapters" / "oai-simpo" / "loraq-manifest.json").read_text())
    assert simpo["method"]["type"] == "simpo" and simpo["method"]["reference"] == "none"
    assert simpo["dataset"]["n_train"] == 16
    warm = json.loads((home / "adapters" / "warm" / "loraq-manifest.json").read_text())["method"]
    assert (warm["type"], warm["after"], warm["reference"]) == ("dpo", "sft", "the starting adapter")
    assert warm["started_from"] == str(home / "adapters" / "sft")
    assert "started from" in (home / "adapters" / "warm" / "README.md").read_text()
