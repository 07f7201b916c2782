"""DPO on the real base: loraq against TRL's ``DPOTrainer`` with a PEFT config, on the same pairs (issue 23).

    .venv/bin/python benchmarks/bench_preference.py [--pairs 64] [--eval-pairs 16] [--epochs 1] [--batch 8]
                                                    [--lr 2e-3] [--beta 0.1] [--max-seq-len 64] [--model DIR]

The base is SmolLM2-135M-Instruct as the real tier builds it (tools/real_model.py), or ``--model``.
The pairs are generated (fixed seed), the real tier's task as plain text: ``Question: What is a
plus b?\\nAnswer:`` with the chosen answer in capitals (`` THE ANSWER IS n.``) and the rejected one
plain (`` The answer is n.``), which the base prefers. Both trainers train the same LoRA (r 16,
alpha 32, no dropout, all linear layers) from the base, DPO sigmoid loss, the same beta, pairs,
epochs, batch, learning rate, seed and linear schedule, each in a process of its own:

- **loraq**: ``loraq submit`` + ``loraq run`` (``method: {type: dpo}``; samples off);
- **trl**: this script's ``--child trl``: ``DPOTrainer(model, args=DPOConfig(...), peft_config=...)``,
  the reference being the base with the adapter disabled at each step (TRL's default for PEFT).

Per trainer: *pairs/s*: pairs x epochs over the training time: ``Trainer.train()`` and, for
loraq, the reference pass before it (``timings.reference_s``: TRL computes the reference inside
its steps); *peak RSS* of the training process (``ru_maxrss``; loraq: its trainer process,
which also held the base's eval and the preference-accuracy passes); *accuracy*: each published
adapter loaded with PEFT in this process, its held-out preference accuracy (the summed answer
log-probability margin > 0) on the same eval pairs. Goals: loraq >= 1.0x TRL's pairs/s, peak RSS
<= TRL's, accuracy within 0.05 of TRL's.
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

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = DPOConfig(output_dir=args.out, per_device_train_batch_size=args.batch, num_train_epochs=args.epochs,
                       learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, beta=args.beta,
                       max_length=args.max_seq_len, seed=7, data_seed=7, logging_steps=1000, save_strategy="no",
                       eval_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    trainer.model.save_pretrained(args.out + "/adapter")
    print(json.dumps({"train_s": train_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "steps": trainer.state.global_step}))


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
               save_steps: 100000, logging_steps: 1000, seed: 7}}
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
    return {"train_s": result["train_s"] + result["timings"].get("reference_s", 0.0),
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
    parser.add_argument("--child", choices=["trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
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
          f"LoRA r 16 all-linear, cpu; load average {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    ours = run_loraq(work, model, args)
    loraq_wall = time.perf_counter() - t0
    print(f"  loraq done: {json.dumps(ours)}; load average {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--child", "trl", "--model", model, "--data",
                            str(work / "train.jsonl"), "--out", str(work / "trl"), "--epochs", str(args.epochs),
                            "--batch", str(args.batch), "--lr", str(args.lr), "--beta", str(args.beta),
                            "--max-seq-len", str(args.max_seq_len)],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=3600)
    trl_wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"TRL failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    theirs = json.loads(child.stdout.strip().splitlines()[-1])
    theirs["adapter"] = str(work / "trl" / "adapter")
    print(f"  trl done: {json.dumps(theirs)}; load average {os.getloadavg()[0]:.1f}", flush=True)
    base_acc = accuracy(model, None, held, args.max_seq_len)
    for ran in (ours, theirs):
        ran["accuracy"] = accuracy(model, ran["adapter"], held, args.max_seq_len)
        ran["pairs_s"] = args.pairs * args.epochs / ran["train_s"]
    for name, ran, wall in (("loraq", ours, loraq_wall), ("trl", theirs, trl_wall)):
        print(f"  {name:5}  {ran['pairs_s']:6.2f} pairs/s ({ran['train_s']:.1f} s, {ran['steps']} steps)  "
              f"peak RSS {ran['peak_rss_mb']:6.0f} MB  held-out preference accuracy {ran['accuracy']:.3f}  "
              f"(wall {wall:.0f} s)")
    print(f"  base   held-out preference accuracy {base_acc:.3f}")
    print(f"ratios: pairs/s {ours['pairs_s'] / theirs['pairs_s']:.2f}x TRL's (goal >= 1.0); peak RSS "
          f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x (goal <= 1.0); accuracy "
          f"{ours['accuracy'] - theirs['accuracy']:+.3f} (goal within 0.05); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
