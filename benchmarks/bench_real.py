"""Real model, real lengths: loraq against plain PEFT + Trainer and TRL's SFTTrainer, on the same examples.

    .venv/bin/python benchmarks/bench_real.py [--rounds 2] [--rows 32] [--epochs 1] [--max-seq-len 1024]
                                              [--device cpu|cuda] [--no-checkpointing] [--keep DIR]

The base is SmolLM2-135M-Instruct as the real tier builds it (tools/real_model.py, float32,
from $LORAQ_CACHE or ~/.cache/loraq). The dataset is generated (fixed seed): prompt /
completion rows of support-style text whose token counts are log-normal (median 80,
sigma 0.9, clipped to 30-1,024 tokens, prompt 10-35% of each row), as real SFT data is,
plus held-out rows from the same distribution. Three trainers train the same LoRA (r 16,
alpha 32, no dropout, all linear layers) on the same rows for the same epochs, batch size,
learning rate, seed and linear schedule, each in processes of its own as a user starts it:

- **plain**: ``real_peers.py plain``: PEFT + HF ``Trainer``, transformers' padded collator;
- **trl**: ``real_peers.py trl``: TRL's ``SFTTrainer`` with ``padding_free=True``;
- **loraq**: ``loraq submit`` + ``loraq run`` through the command line (packing on, the
  defaults otherwise; ``gradient_checkpointing: auto``; ``validation.samples: 0``, since the
  peers generate nothing).

``--rounds`` rounds, in rotating order; the ratios are of the medians of one run. Per trainer:

- *trainable tok/s*: the loss-carrying tokens trained through (epochs x the rows'
  completion tokens) over the time of ``Trainer.train()`` (``train_s``; it includes the
  evaluation at the last step for all three);
- *wall s*: the processes, start to exit (for loraq: submit + run, with its base eval loss);
- *peak RSS*: the training process's high-water mark (loraq: its trainer process);
- *eval loss*: each trainer's adapter of the last round, loaded with PEFT on the base in this
  process and evaluated on the held-out rows the same way for all (mean over every trainable
  token, one row at a time, no padding);
- *FLOP/s*: the model FLOPs of the real tokens (matmuls 2 x params x tokens forward and as
  much again backward into the activations, LoRA's three passes, causal attention; padding and
  recomputation not counted) over ``train_s``, as a fraction of this machine's matmul peak
  measured in the same run on the model's own shapes (``torch.matmul`` of the run's mean
  micro-batch tokens x hidden 576 by 576 x 1,536, 1,536 x 576 and 576 x 49,152; the best).

With ``--checkpointing`` (the default) loraq also trains the first ``--ckpt-rows`` rows once
with ``gradient_checkpointing: true`` and once ``false`` (a trainer process each): the
peak RSS and ``train_s`` of both.

Goals (issue 11): loraq >= 2.0x plain's tok/s, >= 1.0x TRL's, eval loss within 2% of plain's,
peak RSS no higher than plain's. All children run with ``OMP_WAIT_POLICY=PASSIVE`` (loraq's
default for CPU trainers) and the same thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: the matmul peak is measured as the trainers run

from _bench import BENCH_DIR, LORAQ, PYTHON, load, machine, median, quiet_env, table  # noqa: E402

sys.path.insert(0, str(BENCH_DIR.parent / "tools"))

import real_model  # noqa: E402  (tools/)

TRAINERS = ("plain", "trl", "loraq")

# ---------------------------------------------------------------- the dataset

_WHO = ["The router", "Your account", "The invoice", "Our support team", "The latest update", "This plan",
        "The mobile app", "The backup service", "Your subscription", "The billing page", "The admin console",
        "The shipping label", "Your order", "The warranty", "The firmware", "The login page"]
_DOES = ["renews", "restarts", "syncs", "ships", "expires", "includes", "blocks", "resets", "stores", "covers",
         "refunds", "lists", "updates", "checks", "sends", "keeps"]
_WHAT = ["every device on the network", "the payment method on file", "the last thirty days of data",
         "a copy of each receipt", "the settings you saved", "two-factor codes", "the tracking number",
         "any unused credit", "the default password", "all open tickets", "the monthly usage report",
         "a spare power adapter", "the contact details", "each scheduled job", "the regional tax rate"]
_WHEN = ["at midnight", "after a reboot", "within two business days", "on the first of the month",
         "when you sign in", "before the trial ends", "once the payment clears", "every Sunday",
         "as soon as it is enabled", "unless you opt out"]
_ASK = ["How do I", "Can I", "Why does it", "What happens if I", "Is it possible to", "When should I"]
_ACT = ["change my plan", "move my data", "cancel the order", "reset the router", "add a user",
        "download my invoices", "turn off renewal", "update the firmware", "restore a backup", "change the address"]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_WHO)} {rng.choice(_DOES)} {rng.choice(_WHAT)} {rng.choice(_WHEN)}."


def _text(rng: random.Random, tokens: int, count: Any, lead: str = "") -> str:
    """Sentences until about ``tokens`` tokens (as ``count`` counts them), then cut back word by word."""
    text = lead
    while count(text) < tokens:
        text += (" " if text else "") + _sentence(rng)
    words = text.split(" ")
    while len(words) > 1 and count(" ".join(words)) > tokens:
        words.pop()
    return " ".join(words)


def lengths(n: int, seed: int, median_tokens: float = 80.0, sigma: float = 0.9, low: int = 30,
            high: int = 1024) -> list[int]:
    """``n`` row lengths in tokens: log-normal, clipped to ``[low, high]``."""
    rng = random.Random(seed)
    return [min(high, max(low, round(rng.lognormvariate(math.log(median_tokens), sigma)))) for _ in range(n)]


def rows(n: int, seed: int, tokenizer_json: Path) -> list[dict[str, str]]:
    """Prompt/completion rows of the lengths :func:`lengths` draws (prompt 10-35% of each)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    rng = random.Random(seed + 1)
    out = []
    for total in lengths(n, seed):
        prompt_tokens = max(8, round(total * rng.uniform(0.10, 0.35)))
        ask = f"Question: {rng.choice(_ASK)} {rng.choice(_ACT)}?"
        prompt = _text(rng, prompt_tokens - 2, count, ask) + "\nAnswer:"
        completion = " " + _text(rng, max(4, total - count(prompt) - 1), count)
        out.append({"prompt": prompt, "completion": completion})
    return out


def write_jsonl(path: Path, data: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return path


# ---------------------------------------------------------------- FLOPs and the machine's peak


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, folder: Path) -> Shape:
        c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        heads = int(c["num_attention_heads"])
        return cls(int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"]), heads,
                   int(c.get("num_key_value_heads") or heads), int(c.get("head_dim") or c["hidden_size"] // heads),
                   int(c["vocab_size"]))

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def forward(self, n: int, r: int = 0) -> float:
        """Forward FLOPs of one row of ``n`` tokens (with a LoRA of rank ``r`` on every linear layer when r > 0)."""
        per_token = 2 * (self.layers * sum(a * b for a, b in self.linears()) + self.hidden * self.vocab)
        attention = 2 * 2 * self.layers * self.heads * self.head_dim * n * (n + 1) / 2  # QK^T and AV, causal
        lora = 2 * r * self.layers * sum(a + b for a, b in self.linears()) * n
        return per_token * n + attention + lora

    def train(self, n: int, r: int) -> float:
        """A LoRA training step's FLOPs for one row: the frozen matmuls forward and backward into the
        activations (no weight gradients), attention's three passes, the LoRA's forward and both gradients."""
        lora = 2 * r * self.layers * sum(a + b for a, b in self.linears()) * n
        matmuls = 2 * (self.layers * sum(a * b for a, b in self.linears()) + self.hidden * self.vocab) * n
        attention = self.forward(n) - matmuls
        return 2 * matmuls + 3 * attention + 3 * lora


def matmul_peak(shape: Shape, tokens: int, device: str, seconds: float = 0.4) -> tuple[float, str]:
    """The best FLOP/s of ``torch.matmul`` on the model's own shapes at ``tokens`` rows (and which shape gave it)."""
    import torch

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    best, which = 0.0, ""
    for k, n in ((shape.hidden, shape.intermediate), (shape.intermediate, shape.hidden), (shape.hidden, shape.vocab)):
        a = torch.randn(tokens, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        torch.matmul(a, b)  # warm up
        if device != "cpu":
            torch.cuda.synchronize()  # the clock starts with the GPU idle
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.matmul(a, b)
            reps += 1
        if device != "cpu":
            torch.cuda.synchronize()
        rate = 2 * tokens * k * n * reps / (time.perf_counter() - t0)
        if rate > best:
            best, which = rate, f"{tokens}x{k} @ {k}x{n}"
    return best, which


# ---------------------------------------------------------------- running the trainers


@dataclass
class Ran:
    trainer: str
    wall_s: float
    train_s: float
    trainable_tokens: int
    tokens: int
    laid_out_tokens: int
    peak_rss_mb: float
    adapter: Path
    steps: int
    own_eval_loss: float
    cuda_peak_mb: float | None = None
    note: str = ""


def measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, str, float]:
    """Run ``cmd``; its wall time, stdout, and the peak RSS (MB) of it and the children it waited for."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as err, tempfile.TemporaryFile("w+", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        stdout = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stdout[-2000:]}\n"
                         f"{log.read_text(encoding='utf-8')[-3000:]}")
    return wall, stdout, usage.ru_maxrss / 1024


def run_peer(trainer: str, base: Path, data: dict[str, Path], out: Path, args: argparse.Namespace,
             env: dict[str, str]) -> Ran:
    cmd = [PYTHON, str(BENCH_DIR / "real_peers.py"), trainer, "--base", str(base), "--train", str(data["train"]),
           "--eval", str(data["eval"]), "--out", str(out), "--epochs", str(args.epochs), "--batch-size",
           str(args.batch_size), "--max-seq-len", str(args.max_seq_len), "--lr", str(args.lr), "--seed", "0",
           "--device", args.device]
    wall, stdout, _ = measured(cmd, env, out / "stderr.log")
    r = json.loads(stdout.strip().splitlines()[-1])
    return Ran(trainer, wall, r["train_s"], r["trainable_tokens"], r["tokens"], r["laid_out_tokens"],
               r["peak_rss_mb"], Path(r["adapter"]), r["steps"], r["eval_loss_own"], r.get("cuda_peak_mb"))


QUEUE = """\
jobs:
  - name: {name}
    base_model: {base}
    dataset: {{path: {train}, format: prompt_completion}}
    lora: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
    training: {{epochs: {epochs}, learning_rate: {lr}, batch_size: {batch}, max_seq_len: {max_len}, save_steps: 1000000,
               logging_steps: 1, seed: 0, lr_scheduler: linear, gradient_checkpointing: {ckpt}}}
    validation: {{dataset: {eval}, samples: 0}}
"""


def run_loraq(base: Path, data: dict[str, Path], out: Path, args: argparse.Namespace, env: dict[str, str],
              checkpointing: str = "auto", name: str = "real") -> Ran:
    out.mkdir(parents=True, exist_ok=True)
    queue = out / "queue.yaml"
    queue.write_text(QUEUE.format(name=name, base=base, train=data["train"], eval=data["eval"], epochs=args.epochs,
                                  lr=args.lr, batch=args.batch_size, max_len=args.max_seq_len, ckpt=checkpointing),
                     encoding="utf-8")
    common = [LORAQ, "--home", str(out / ".loraq"), "--allow-root", str(base), "--allow-root", str(data["train"].parent)]
    submit_s, _, _ = measured([*common, "submit", str(queue)], env, out / "submit.log")
    devices = "cpu" if args.device == "cpu" else "0"
    run_s, _, _ = measured([*common, "run", "--devices", devices, "--quiet"], env, out / "run.log")
    shown = json.loads(subprocess.run([*common, "show", name, "--json"], env=env, capture_output=True, text=True,
                                      check=True).stdout)
    job = shown["job"]
    if job["status"] != "completed":
        raise SystemExit(f"loraq job {name} ended {job['status']}: {job.get('error')}")
    result = job["result"]
    packing = result["extras"]["packing"]
    epochs = float(args.epochs)
    memory = result["extras"].get("memory", {})
    return Ran("loraq", submit_s + run_s, result["train_s"], round(result["train_tokens"] * epochs),
               round(packing["tokens_per_epoch"] * epochs), round(packing["laid_out_tokens_per_epoch"] * epochs),
               result["memory"]["peak_rss_mb"], out / ".loraq" / "adapters" / name, result["steps"],
               result["eval_loss"], result["memory"].get("cuda_peak_mb"),
               note=(f"submit {submit_s:.1f} s + run {run_s:.1f} s; {packing['steps_per_epoch']} steps an epoch; "
                     f"gradient checkpointing {'on' if memory.get('gradient_checkpointing') else 'off'}"))


def eval_losses(base: Path, adapters: dict[str, Path], eval_path: Path, max_len: int, device: str) -> dict[str, float]:
    """Each adapter on the base, evaluated alike: the mean loss over every trainable token, a row at a time."""
    import torch
    from peft import PeftModel
    from peft_script import encode, load_base, read_rows

    from loraq.model.batching import Collator, ListDataset
    from loraq.model.evaluation import evaluate_loss

    model, tokenizer = load_base(str(base))
    if device == "cuda":
        model = model.to(device="cuda", dtype=torch.bfloat16)
    items = ListDataset(encode(read_rows(eval_path), tokenizer, max_len))
    collator = Collator(tokenizer.pad_token_id)
    out = {"base": evaluate_loss(model.eval(), items, collator, 1)}
    for name, folder in adapters.items():
        peft_model = PeftModel.from_pretrained(model, str(folder)).eval()
        out[name] = evaluate_loss(peft_model, items, collator, 1)
        model = peft_model.unload()
    return out


# ---------------------------------------------------------------- the run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=24, help="training rows (default 24: 3 steps of 8 an epoch)")
    ap.add_argument("--eval-rows", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of plain,trl,loraq")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure loraq's gradient_checkpointing true vs false (default: on)")
    ap.add_argument("--ckpt-rows", type=int, default=8)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = ap.parse_args()
    trainers = [t for t in args.trainers.split(",") if t]
    unknown = sorted(set(trainers) - set(TRAINERS))
    if unknown:
        raise SystemExit(f"--trainers: unknown trainer(s) {', '.join(unknown)}; choose from {', '.join(TRAINERS)}")

    base = real_model.ensure().folder
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-real-"))
    work.mkdir(parents=True, exist_ok=True)
    env = quiet_env()
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.device == "cuda":
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    started = time.perf_counter()
    print(f"bench_real: SmolLM2-135M-Instruct ({base.name}), {args.rows} training rows x {args.epochs:g} epoch(s), "
          f"{args.eval_rows} eval rows, batch {args.batch_size}, max_seq_len {args.max_seq_len}, lr {args.lr:g}, "
          f"LoRA r 16 all-linear, {args.rounds} round(s), device {args.device}")
    print(f"machine: {machine()}")
    try:
        data = {"train": write_jsonl(work / "data" / "train.jsonl", rows(args.rows, 11, base / "tokenizer.json")),
                "eval": write_jsonl(work / "data" / "eval.jsonl", rows(args.eval_rows, 12, base / "tokenizer.json"))}
        drawn = lengths(args.rows, 11)
        print(f"dataset: lengths drawn {min(drawn)}-{max(drawn)} tokens, median {median(drawn):.0f}, mean "
              f"{sum(drawn) / len(drawn):.0f} (log-normal, median 80, sigma 0.9, clipped to 30-1,024; seed 11)")
        shape = Shape.of(base)
        runs: dict[str, list[Ran]] = {t: [] for t in trainers}
        peaks: list[float] = []
        which = ""
        for n in range(args.rounds):
            order = trainers[n % len(trainers):] + trainers[:n % len(trainers)]
            for trainer in order:
                out = work / f"round-{n}" / trainer
                ran = (run_loraq(base, data, out, args, env) if trainer == "loraq"
                       else run_peer(trainer, base, data, out, args, env))
                runs[trainer].append(ran)
                print(f"  round {n + 1} {trainer:<5} wall {ran.wall_s:6.1f} s  train {ran.train_s:6.1f} s  "
                      f"{ran.trainable_tokens / ran.train_s:6.1f} trainable tok/s  peak RSS {ran.peak_rss_mb:6.0f} MB  "
                      f"own eval loss {ran.own_eval_loss:.4f}  {ran.note}", flush=True)
            micro = round(args.batch_size * sum(drawn) / len(drawn))
            peak, which = matmul_peak(shape, micro, args.device)
            peaks.append(peak)

        last = {t: rs[-1] for t, rs in runs.items()}
        losses = eval_losses(base, {t: r.adapter for t, r in last.items()}, data["eval"], args.max_seq_len,
                             args.device)
        peak = max(peaks)
        train_rows = _encoded_lengths(base, data["train"], args.max_seq_len)
        eval_rows = _encoded_lengths(base, data["eval"], args.max_seq_len)
        flops = (args.epochs * sum(shape.train(n, 16) for n in train_rows) + sum(shape.forward(n, 16) for n in eval_rows))
        print()
        print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({which}, {'fp32' if args.device == 'cpu' else 'bf16'}; "
              f"best of {len(peaks)} measurement(s), one a round: {', '.join(f'{p / 1e9:.1f}' for p in peaks)})")
        print(f"model FLOPs of the run: {flops / 1e12:.2f} TFLOP (training {args.epochs:g} epoch(s) of "
              f"{sum(train_rows)} tokens and one evaluation of {sum(eval_rows)} tokens)")
        table_rows = []
        med: dict[str, dict[str, float]] = {}
        for t, rs in runs.items():
            m = {"train_s": median([r.train_s for r in rs]), "wall_s": median([r.wall_s for r in rs]),
                 "rss": median([r.peak_rss_mb for r in rs])}
            m["tok_s"] = rs[0].trainable_tokens / m["train_s"]
            med[t] = m
            cuda = rs[-1].cuda_peak_mb
            table_rows.append([t, f"{m['tok_s']:.1f}", f"{m['train_s']:.1f}", f"{m['wall_s']:.1f}", f"{m['rss']:.0f}"]
                              + ([f"{cuda:.0f}" if cuda is not None else "-"] if args.device == "cuda" else [])
                              + [f"{losses[t]:.4f}", f"{rs[-1].laid_out_tokens}", f"{flops / m['train_s'] / 1e9:.1f}",
                                 f"{flops / m['train_s'] / peak:.2f}", str(rs[-1].steps)])
        print(table(["trainer", "trainable tok/s", "train s", "wall s", "peak RSS MB"]
                    + (["CUDA peak MB"] if args.device == "cuda" else [])
                    + ["eval loss", "tokens computed", "GFLOP/s", "of peak", "steps"], table_rows))
        print(f"  base eval loss {losses['base']:.4f}; trainable tokens {runs[trainers[0]][0].trainable_tokens}, "
              f"real tokens {runs[trainers[0]][0].tokens} per run; per-round train s: "
              + "; ".join(f"{t} " + ", ".join(f"{r.train_s:.1f}" for r in rs) for t, rs in runs.items()))
        if "loraq" in med:
            print()
            goals = []
            if "plain" in med:
                speed = med["loraq"]["tok_s"] / med["plain"]["tok_s"]
                drift = abs(losses["loraq"] - losses["plain"]) / losses["plain"]
                rss = med["loraq"]["rss"] / med["plain"]["rss"]
                goals += [f"loraq vs plain tok/s: {speed:.2f}x (goal >= 2.0x: {'met' if speed >= 2.0 else 'MISSED'})",
                          f"eval loss vs plain: {drift * 100:.2f}% apart (goal <= 2%: {'met' if drift <= 0.02 else 'MISSED'})",
                          f"peak RSS vs plain: {rss:.2f}x (goal <= 1.0x: {'met' if rss <= 1.0 else 'MISSED'})"]
            if "trl" in med:
                vs_trl = med["loraq"]["tok_s"] / med["trl"]["tok_s"]
                goals.append(f"loraq vs TRL tok/s: {vs_trl:.2f}x (goal >= 1.0x: {'met' if vs_trl >= 1.0 else 'MISSED'})")
            print("\n".join(goals))
        if args.checkpointing and "loraq" in trainers:
            _checkpointing(base, data, work, args, env)
        print(f"end: {load()}; the whole run {time.perf_counter() - started:.0f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _encoded_lengths(base: Path, path: Path, max_len: int) -> list[int]:
    from peft_script import encode, read_rows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    return [len(item["input_ids"]) for item in encode(read_rows(path), tokenizer, max_len)]


def _checkpointing(base: Path, data: dict[str, Path], work: Path, args: argparse.Namespace,
                   env: dict[str, str]) -> None:
    """loraq's gradient_checkpointing true vs false on the same rows: peak memory and training time."""
    subset = dict(data)
    rows_ = (work / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:args.ckpt_rows]
    subset["train"] = work / "data" / "ckpt-train.jsonl"
    subset["train"].write_text("\n".join(rows_) + "\n", encoding="utf-8")
    print()
    print(f"gradient checkpointing (loraq, the first {args.ckpt_rows} rows, {args.epochs:g} epoch(s), a trainer "
          "process each):")
    got = {}
    for setting in ("false", "true"):
        ran = run_loraq(base, subset, work / f"ckpt-{setting}", args, env, checkpointing=setting, name=f"ckpt-{setting}")
        got[setting] = ran
        cuda = f", CUDA peak {ran.cuda_peak_mb:.0f} MB" if ran.cuda_peak_mb is not None else ""
        print(f"  gradient_checkpointing: {setting:<5} peak RSS {ran.peak_rss_mb:6.0f} MB{cuda}, train {ran.train_s:.1f} s, "
              f"eval loss {ran.own_eval_loss:.4f}")
    on, off = got["true"], got["false"]
    print(f"  on vs off: peak RSS {on.peak_rss_mb - off.peak_rss_mb:+.0f} MB ({on.peak_rss_mb / off.peak_rss_mb:.2f}x), "
          f"train time {on.train_s / off.train_s:.2f}x"
          + (f", CUDA peak {on.cuda_peak_mb / off.cuda_peak_mb:.2f}x" if on.cuda_peak_mb and off.cuda_peak_mb else ""))


if __name__ == "__main__":
    main()
