"""One LoRA adapter with plain PEFT and HF Trainer: the script users write today.

    python benchmarks/peft_script.py --base MODEL --data ROWS.jsonl --out DIR [--steps 40] [--seed 0]

A fresh interpreter per adapter: import torch/transformers/peft, load the base,
tokenise the prompt/completion rows (loss on the completion only), train with
``Trainer``, save the adapter, exit. ``bench_adapters.py`` runs it once per adapter,
and ``peft_loop.py`` imports :func:`train_adapter` to run many adapters in one
process. loraq is not imported: this is the baseline, not loraq.

Settings match what ``bench_adapters.py`` gives loraq: the same rows, the same
train/eval split (``random.Random(seed)``, ``--split`` of the rows), LoRA r/alpha
on q_proj,v_proj, batch size, max length, learning rate, linear schedule, a
checkpoint and an evaluation at the last step.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any


def settings_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--split", type=float, default=0.1)
    parser.add_argument("--logging-steps", type=int, default=10)
    return parser


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def split(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    return [rows[i] for i in sorted(order[n_eval:])], [rows[i] for i in sorted(order[:n_eval])]


def encode(rows: list[dict[str, Any]], tokenizer: Any, max_len: int) -> list[dict[str, list[int]]]:
    """Prompt + completion + EOS; labels only on the completion."""
    out = []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"][:max_len]
        labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(item["input_ids"]) for item in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, item in enumerate(batch):
        n = len(item["input_ids"])
        ids[i, :n] = torch.tensor(item["input_ids"])
        labels[i, :n] = torch.tensor(item["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_adapter(base: Any, tokenizer: Any, data: str | Path, out: str | Path, seed: int,
                  settings: argparse.Namespace) -> dict[str, Any]:
    """Train one LoRA on ``base`` (left unchanged: the LoRA is unloaded at the end); save it to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    train_rows, eval_rows = split(read_rows(data), settings.split, seed)
    train_set = encode(train_rows, tokenizer, settings.max_seq_len)
    eval_set = encode(eval_rows, tokenizer, settings.max_seq_len)
    set_seed(seed)
    model = get_peft_model(base, LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(Path(out) / "checkpoints"), per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size, learning_rate=settings.lr, max_steps=settings.steps,
        lr_scheduler_type="linear", logging_steps=settings.logging_steps, save_strategy="steps",
        save_steps=settings.steps, eval_strategy="steps", eval_steps=settings.steps, seed=seed, data_seed=seed,
        use_cpu=True, report_to=[], disable_tqdm=True, remove_unused_columns=False, dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))
    trainer.train()
    model.save_pretrained(str(out))
    eval_loss = next(e["eval_loss"] for e in reversed(trainer.state.log_history) if "eval_loss" in e)
    model.unload()
    return {"eval_loss": float(eval_loss), "steps": trainer.state.global_step}


def load_base(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(parents=[settings_parser()], description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    base, tokenizer = load_base(args.base)
    result = train_adapter(base, tokenizer, args.data, args.out, args.seed, args)
    result["seconds_in_process"] = round(time.perf_counter() - start, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
