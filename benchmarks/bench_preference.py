"""DPO on the real base: loraq against TRL's ``DPOTrainer`` with a PEFT config, on the same pairs (issue 23).

    .venv/bin/python benchmarks/bench_preference.py [--pairs 64] [--eval-pairs 16] [--epochs 1] [--batch 8]
                                                    [--lr 2e-3] [--beta 0.1] [--max-seq-len 64] [--model DIR]
                                                    [--trl-defaults] [--trl-first] [--gradient-checkpointing]

The base is SmolLM2-135M-Instruct as the real tier builds it (tools/real_model.py), or ``--model``.
The pairs are generated (fixed seed), the real tier's task as plain text: ``Question: What is a
plus b?\\nAnswer:`` with the chosen answer in capitals (`` THE ANSWER IS n.``) and the rejected one
plain (`` The answer is n.``), which the base prefers. Both trainers train the same LoRA (r 16,
alpha 32, no dropout, all linear layers) from the base, DPO sigmoid loss, the same beta, pairs,
epochs, batch, learning rate, seed and linear schedule, each in a process of its own with the
threads loraq gives a CPU trainer (``executors.base.trainer_env``):

- **loraq**: ``loraq submit`` + ``loraq run`` (``method: {type: dpo}``; samples off);
- **trl**: this script's ``--child trl``: ``DPOTrainer(model, args=DPOConfig(...), peft_config=...)``,
  the reference being the base with the adapter disabled at each step (TRL's default for PEFT), in
  float32 without gradient checkpointing as loraq's job (``bf16=False, gradient_checkpointing=False``:
  DPOConfig's own defaults are bf16 autocast and gradient checkpointing on);
- **trl-defaults** (``--trl-defaults``): the same with DPOConfig's own defaults.

``--gradient-checkpointing``: loraq's job (``training.gradient_checkpointing: true``) and the matched
TRL run both with gradient checkpointing.

Per trainer: *pairs/s*, training: pairs x epochs over ``trainer.train()`` (TRL) or loraq's reference
pass over the train pairs and ``Trainer.train()`` less its evaluation of the last step
(``timings.reference_s + train_s - eval_s``); *whole*: with the held-out evaluation, TRL's
``trainer.evaluate()`` after training, loraq's reference pass over the eval pairs and that last-step
evaluation (its final figures reuse it); *peak RSS* of the training process (``ru_maxrss``; loraq:
its trainer process); *accuracy*: each published adapter loaded with PEFT in this process, its
held-out preference accuracy (the summed answer log-probability margin > 0) on the same eval pairs.
Goals: loraq >= 1.0x TRL's pairs/s, peak RSS <= TRL's, accuracy within 0.05 of TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
LORAQ = str(Path(sys.executable).with_name("loraq"))


def pairs(rng: random.Random, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        out.append({"prompt": f"Question: What is {a} plus {b}?\nAnswer:", "chosen": f" THE ANSWER IS {a + b}.",
                    "rejected": f" The answer is {a + b}."})
    return out


def trl_child(args: argparse.Namespace) -> None:
    """Train with TRL's DPOTrainer; print what was measured as one JSON line."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows, held = ([json.loads(line) for line in Path(path).read_text().splitlines()]
                  for path in (args.data, args.eval_data))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # DPOConfig's own defaults differ from TrainingArguments' (and loraq's): bf16 autocast (on a CPU with AMX,
    # bfloat16 matmuls) and gradient checkpointing on; matched, TRL computes as loraq does (float32, no recompute)
    same = {} if args.trl_defaults else {"bf16": False, "gradient_checkpointing": args.gradient_checkpointing}
    config = DPOConfig(output_dir=args.out, per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
                       num_train_epochs=args.epochs, learning_rate=args.lr, lr_scheduler_type="linear",
                       warmup_steps=0, beta=args.beta, max_length=args.max_seq_len, seed=7, data_seed=7,
                       logging_steps=1000, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                       disable_tqdm=True, dataloader_num_workers=0, **same)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(held), processing_class=tokenizer, peft_config=peft)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.evaluate()  # the held-out pairs' loss and rewards (the reference forward with the adapter disabled)
    eval_s = time.perf_counter() - t0
    trainer.model.save_pretrained(args.out + "/adapter")
    print(json.dumps({"train_s": train_s, "whole_s": train_s + eval_s, "steps": trainer.state.global_step,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "settings": {"bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing}}))


def run_loraq(work: Path, model: str, args: argparse.Namespace) -> dict[str, Any]:
    queue = work / "queue.yaml"
    queue.write_text(f"""\
jobs:
  - name: dpo
    base_model: {model}
    dataset: ./train.jsonl
    method: {{type: dpo, beta: {args.beta}}}
    lora: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
    training: {{epochs: {args.epochs}, batch_size: {args.batch}, learning_rate: {args.lr}, max_seq_len: {args.max_seq_len},
               save_steps: 100000, logging_steps: 1000, seed: 7,
               gradient_checkpointing: {str(args.gradient_checkpointing).lower()}}}
    validation: {{dataset: ./eval.jsonl, samples: 0}}
    max_retries: 0
""", encoding="utf-8")
    home = work / ".loraq"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for cmd in (["submit", str(queue)], ["run", "--devices", "cpu"]):
        done = subprocess.run([LORAQ, "--home", str(home), "--allow-root", model, *cmd], capture_output=True,
                              text=True, env=env, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"loraq {cmd[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    shown = json.loads(subprocess.run([LORAQ, "--home", str(home), "show", "dpo", "--json"], capture_output=True,
                                      text=True, env=env, check=True).stdout)
    result = shown["job"]["result"]
    timings = result["timings"]
    # training: the train pairs' reference pass and Trainer.train() less its evaluation of the last step; whole:
    # with the held-out evaluation (the eval pairs' reference pass, the base's accuracy, the last step's evaluation)
    return {"train_s": timings["reference_s"] + result["train_s"] - timings["eval_s"],
            "whole_s": timings["reference_s"] + timings["eval_reference_s"] + result["train_s"],
            "peak_rss_mb": result["memory"]["peak_rss_mb"], "steps": result["steps"],
            "adapter": str(home / "adapters" / "dpo"), "own_accuracy": result["metrics"]["preference_accuracy"]}


def accuracy(model_dir: str, adapter: str | None, rows: list[dict[str, Any]], max_seq_len: int) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraq.queue.spec import PreferenceMethod
    from loraq.train.preference import PairCollator, encode_pairs, evaluate_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    items, _, _, _ = encode_pairs(rows, "preference", tokenizer, max_seq_len, None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # the accuracy is the summed margin's sign whatever the method; simpo's loss needs no reference pass
    return evaluate_pairs(model, items, PairCollator(pad), PreferenceMethod(type="simpo"), 8).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--eval-pairs", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2.0e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--model", help="a model folder (default: the real tier's SmolLM2-135M-Instruct)")
    parser.add_argument("--trl-defaults", action="store_true",
                        help="also run TRL with DPOConfig's own defaults (bf16 autocast, gradient checkpointing)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="loraq and the matched TRL run both with gradient checkpointing (non-reentrant)")
    parser.add_argument("--trl-first", action="store_true", help="run TRL before loraq (the order's effect)")
    parser.add_argument("--child", choices=["trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--eval-data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "trl":
        trl_child(args)
        return
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tools"))
        import real_model

        model = str(real_model.ensure().folder)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench-preference-"))
    rng = random.Random("bench-preference")
    train, held = pairs(rng, args.pairs), pairs(rng, args.eval_pairs)
    for name, rows in (("train", train), ("eval", held)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"bench_preference: {Path(model).name}, {args.pairs} pairs x {args.epochs:g} epoch(s), {args.eval_pairs} "
          f"held-out pairs, batch {args.batch}, lr {args.lr}, beta {args.beta}, max_seq_len {args.max_seq_len}, "
          f"LoRA r 16 all-linear, cpu, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; load average {os.getloadavg()[0]:.1f}")
    runs: dict[str, dict[str, Any]] = {}
    order = ["trl", "trl-defaults", "loraq"] if args.trl_first else ["loraq", "trl", "trl-defaults"]
    for name in order:
        if name == "trl-defaults" and not args.trl_defaults:
            continue
        t0 = time.perf_counter()
        runs[name] = run_loraq(work, model, args) if name == "loraq" else run_trl(work, model, args, name)
        runs[name]["wall_s"] = time.perf_counter() - t0
        print(f"  {name} done: {json.dumps(runs[name])}; load average {os.getloadavg()[0]:.1f}", flush=True)
    base_acc = accuracy(model, None, held, args.max_seq_len)
    for ran in runs.values():
        ran["accuracy"] = accuracy(model, ran["adapter"], held, args.max_seq_len)
        ran["pairs_s"] = args.pairs * args.epochs / ran["train_s"]
        ran["whole_pairs_s"] = args.pairs * args.epochs / ran["whole_s"]
    print("  pairs/s: training (loraq: the train pairs' reference pass + Trainer.train() less its last-step "
          "evaluation; trl: trainer.train()) | whole (+ the held-out evaluation: loraq's eval-pairs reference pass "
          "and last-step evaluation, trl's trainer.evaluate())")
    for name, ran in runs.items():
        print(f"  {name:12} {ran['pairs_s']:6.2f} pairs/s ({ran['train_s']:.1f} s, {ran['steps']} steps) | whole "
              f"{ran['whole_pairs_s']:5.2f} ({ran['whole_s']:.1f} s)  peak RSS {ran['peak_rss_mb']:6.0f} MB  "
              f"held-out preference accuracy {ran['accuracy']:.3f}  (wall {ran['wall_s']:.0f} s)")
    print(f"  base   held-out preference accuracy {base_acc:.3f}")
    ours = runs["loraq"]
    for name in [n for n in runs if n != "loraq"]:
        theirs = runs[name]
        print(f"ratios vs {name}: pairs/s {ours['pairs_s'] / theirs['pairs_s']:.2f}x (goal >= 1.0), whole "
              f"{ours['whole_pairs_s'] / theirs['whole_pairs_s']:.2f}x; peak RSS "
              f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x (goal <= 1.0); accuracy "
              f"{ours['accuracy'] - theirs['accuracy']:+.3f} (goal within 0.05)")
    print(f"load average {os.getloadavg()[0]:.1f}")


def trl_env() -> dict[str, str]:
    """The environment loraq gives a CPU trainer (its threads: one per usable core, waiting passively rather than
    spinning, which on a busy machine made training steps 3-15x slower): TRL's process runs under the same."""
    from loraq.executors.base import trainer_env

    return trainer_env("cpu", [], {**os.environ, "HF_HUB_OFFLINE": "1"})


def run_trl(work: Path, model: str, args: argparse.Namespace, name: str) -> dict[str, Any]:
    out = work / name
    child = subprocess.run([sys.executable, __file__, "--child", "trl", "--model", model, "--data",
                            str(work / "train.jsonl"), "--eval-data", str(work / "eval.jsonl"), "--out", str(out),
                            "--epochs", str(args.epochs), "--batch", str(args.batch), "--lr", str(args.lr),
                            "--beta", str(args.beta), "--max-seq-len", str(args.max_seq_len),
                            *(["--trl-defaults"] if name == "trl-defaults" else []),
                            *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])],
                           capture_output=True, text=True, env=trl_env(), timeout=3600)
    if child.returncode != 0:
        raise SystemExit(f"TRL failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    theirs: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    theirs["adapter"] = str(out / "adapter")
    return theirs

if __name__ == "__main__":
    main()
