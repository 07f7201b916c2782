"""The two peers of ``bench_real.py``: plain PEFT + HF ``Trainer`` (padded), and TRL's ``SFTTrainer`` (padding-free).

    python benchmarks/real_peers.py plain|trl --base MODEL --train ROWS.jsonl --eval ROWS.jsonl --out DIR
        [--epochs 1] [--batch-size 8] [--max-seq-len 1024] [--lr 1e-3] [--r 16] [--alpha 32] [--seed 0]
        [--device cpu|cuda]

One adapter in a fresh interpreter, as a user runs it: import, load the base, tokenise,
train, evaluate at the end, save, exit. loraq is not imported: these are the baselines.

- **plain**: what users write: ``get_peft_model`` and ``Trainer`` with transformers'
  ``DataCollatorForSeq2Seq`` (every batch padded to its longest row, an attention mask).
- **trl**: ``SFTTrainer`` with ``padding_free=True`` and a ``peft_config``: each batch's
  rows concatenated into one row with ``position_ids`` restarting per row (TRL's best
  CPU-compatible layout; its ``packing`` would also change how many examples a step
  holds). TRL's defaults that would make it a different job are set to the others':
  ``gradient_checkpointing=False`` (TRL defaults to on; loraq's ``auto`` leaves it off
  here), no bf16 on a CPU, the same learning rate.

Both get the same rows, tokenised the same way (``peft_script.encode``: prompt +
completion + EOS, loss on the completion), the same LoRA (r/alpha on all linear layers,
no dropout), batch size, epochs, seed, linear schedule, a checkpoint and an evaluation at
the last step. Printed as one JSON line: the time of ``train()`` (the last step's
evaluation included, as in loraq's ``train_s``), the steps, the trainable tokens trained
through, the tokens the model computed on (padding included), and the peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from peft_script import encode, load_base, read_rows


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trainer", choices=["plain", "trl"])
    ap.add_argument("--base", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return ap


def lora(args: argparse.Namespace) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def common(args: argparse.Namespace, steps_hint: int) -> dict[str, Any]:
    """The TrainingArguments both peers share (an evaluation and a checkpoint at the last step only)."""
    return dict(
        output_dir=str(Path(args.out) / "checkpoints"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, num_train_epochs=args.epochs, learning_rate=args.lr,
        lr_scheduler_type="linear", logging_steps=1, save_strategy="steps", save_steps=steps_hint,
        eval_strategy="steps", eval_steps=steps_hint, seed=args.seed, data_seed=args.seed,
        use_cpu=args.device == "cpu", bf16=args.device == "cuda", fp16=False, report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_pin_memory=False, gradient_checkpointing=False,
    )


class Counted:
    """The trainer's collator, counting the tokens of the training batches it lays out (padding included)."""

    def __init__(self, collator: Any, model: Any) -> None:
        self.collator, self.model, self.tokens = collator, model, 0

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.collator(batch)
        if self.model.training:  # the data loader runs in this process (no workers): training batches only
            self.tokens += int(out["input_ids"].numel())
        return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    started = time.perf_counter()
    import torch
    from transformers import set_seed

    base, tokenizer = load_base(args.base)
    if args.device == "cuda":
        base = base.to(device="cuda", dtype=torch.bfloat16)
    train = encode(read_rows(args.train), tokenizer, args.max_seq_len)
    evals = encode(read_rows(args.eval), tokenizer, args.max_seq_len)
    steps_hint = 10**6  # never reached: the strategy "steps" evaluates and saves at the last step only
    set_seed(args.seed)
    if args.trainer == "plain":
        from peft import get_peft_model
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        model = get_peft_model(base, lora(args))
        trainer = Trainer(model=model, args=TrainingArguments(**common(args, steps_hint)), train_dataset=train,
                          eval_dataset=evals, data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"))
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**common(args, steps_hint), padding_free=True, max_length=None, pad_to_multiple_of=None)
        trainer = SFTTrainer(model=base, args=config, train_dataset=Dataset.from_list(train),
                             eval_dataset=Dataset.from_list(evals), processing_class=tokenizer, peft_config=lora(args))
        model = trainer.model
    counted = trainer.data_collator = Counted(trainer.data_collator, trainer.model)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    model.save_pretrained(str(Path(args.out) / "adapter"))
    trainable = sum(sum(1 for label in item["labels"][1:] if label != -100) for item in train)
    result = {
        "trainer": args.trainer, "train_s": round(train_s, 3), "steps": trainer.state.global_step,
        "epochs": args.epochs, "trainable_tokens": round(trainable * args.epochs),
        "tokens": round(sum(len(item["input_ids"]) for item in train) * args.epochs),
        "laid_out_tokens": counted.tokens,
        "eval_loss_own": next(e["eval_loss"] for e in reversed(trainer.state.log_history) if "eval_loss" in e),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds_in_process": round(time.perf_counter() - started, 3),
        "adapter": str(Path(args.out) / "adapter"),
    }
    if args.device == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
