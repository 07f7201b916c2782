"""The demo: a tiny base model, tokenizer and datasets built here, and a queue over them.

Nothing is downloaded. The base model is a real Llama architecture with random
weights (a few MB); the tokenizer is a byte-level BPE trained on the demo text,
with a chat template whose assistant turns can be found for loss masking. The
datasets are synthetic and templated so that such a model learns them within a
minute or two on a CPU: the eval loss drops clearly below the base model's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fsutil

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ '<|end|>' }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]

#: Model sizes the project builds (MEASURED.md: tiny ~1 M parameters, small ~23 M).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4},
}

TOPICS = {
    "password": "Open Settings, choose Security, then Reset password. A link arrives by email within a minute.",
    "refund": "Refunds go back to the original card within 5 business days of the return being scanned.",
    "shipping": "Standard shipping takes 3 to 5 days; express takes 1 day if ordered before noon.",
    "invoice": "Invoices are under Billing, then History. Each one has a Download PDF button.",
    "cancel": "You can cancel any time under Plan, then Cancel plan. You keep access until the period ends.",
    "hours": "Our team answers chats every day from 8 am to 8 pm, Central European Time.",
}
GREETINGS = ["", "Hi. ", "Hello! ", "Good morning. ", "Hey there, ", "Quick question: ", "Excuse me. ", "Sorry to bother you. "]
QUESTIONS = [
    "How do I {t}?", "Can you help me with {t}?", "I have a question about {t}.", "What about {t}?",
    "Tell me about {t}.", "Help with {t} please", "{t}?", "I need help: {t}",
]
TOPIC_PHRASES = {
    "password": ["reset my password", "my password", "a forgotten password", "password reset"],
    "refund": ["a refund", "getting my money back", "refunds", "my refund"],
    "shipping": ["shipping times", "delivery", "how long shipping takes", "shipping"],
    "invoice": ["my invoice", "invoices", "a receipt", "billing history"],
    "cancel": ["cancelling", "cancel my plan", "ending my subscription", "cancellation"],
    "hours": ["opening hours", "when you are open", "support hours", "your hours"],
}
CITIES = ["Berlin", "Paris", "Madrid", "Rome", "Vienna", "Prague", "Oslo", "Lisbon", "Dublin", "Warsaw", "Athens", "Bern",
          "Brussels", "Budapest", "Helsinki", "Riga", "Sofia", "Tallinn", "Vilnius", "Zagreb", "Ljubljana", "Porto",
          "Milan", "Lyon"]
TABLES = ["users", "orders", "stores", "invoices", "tickets", "products"]
COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "grey", "brown", "pink", "golden"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "wolf", "frog", "duck", "horse", "mouse", "goat", "crow"]
MOODS = ["happy", "sleepy", "curious", "brave"]


def _distinct(space: list[Any], n: int, rng: random.Random) -> list[Any]:
    """``n`` different items of ``space``: a demo's eval rows must not repeat its train rows."""
    if n > len(space):
        raise ValueError(f"asked for {n} distinct rows, the generator has {len(space)}")
    return rng.sample(space, n)


def chat_rows(n: int, rng: random.Random) -> list[dict[str, Any]]:
    space = [(topic, greeting + question.format(t=phrase))
             for topic, phrases in TOPIC_PHRASES.items() for phrase in phrases
             for question in QUESTIONS for greeting in GREETINGS]
    return [{"messages": [
        {"role": "system", "content": "You are the Acme support assistant."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": TOPICS[topic]},
    ]} for topic, question in _distinct(space, n, rng)]


SQL_KINDS = [
    ("How many {t} are in {c}?", "SELECT COUNT(*) FROM {t} WHERE city = '{c}';"),
    ("List all {t} in {c}.", "SELECT * FROM {t} WHERE city = '{c}';"),
    ("Delete the {t} in {c}.", "DELETE FROM {t} WHERE city = '{c}';"),
    ("Show the newest {t} in {c}.", "SELECT * FROM {t} WHERE city = '{c}' ORDER BY created_at DESC LIMIT 1;"),
]


def sql_rows(n: int, rng: random.Random) -> list[dict[str, Any]]:
    space = [(q.format(t=t, c=c), a.format(t=t, c=c)) for q, a in SQL_KINDS for t in TABLES for c in CITIES]
    return [{"prompt": f"Question: {q}\nSQL:", "completion": f" {a}"} for q, a in _distinct(space, n, rng)]


def alpaca_rows(n: int, rng: random.Random) -> list[dict[str, Any]]:
    describe = [{"instruction": "Describe the animal in one sentence.", "input": f"{color} {animal}",
                 "output": f"This is a {color} {animal}, and it looks {mood} today."}
                for color in COLORS for animal in ANIMALS for mood in MOODS]
    titles = [{"instruction": f"Write a short title for a story about a {animal}.", "input": "",
               "output": f"The {color.title()} {animal.title()} and the Long Night"}
              for color in COLORS for animal in ANIMALS]
    return _distinct(describe + titles, n, rng)


def text_rows(n: int, rng: random.Random) -> list[dict[str, Any]]:
    return [{"text": f"The {rng.choice(COLORS)} {rng.choice(ANIMALS)} walked to {rng.choice(CITIES)} and slept."} for _ in range(n)]


DATASETS = {
    "support": ("support.jsonl", chat_rows),
    "sql": ("sql.jsonl", sql_rows),
    "stories": ("stories.jsonl", alpaca_rows),
}


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    return fsutil.atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _corpus(rng: random.Random) -> list[str]:
    texts: list[str] = []
    for row in chat_rows(300, rng):
        texts.extend(m["content"] for m in row["messages"])
    for row in sql_rows(300, rng):
        texts.append(row["prompt"] + row["completion"])
    for row in alpaca_rows(300, rng):
        texts.append(ALPACA_TEXT.format(**row))
    texts.extend(r["text"] for r in text_rows(200, rng))
    return texts


ALPACA_TEXT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"


def build_tokenizer(folder: Path, *, vocab_size: int = 1024, seed: int = 0) -> Any:
    """Train a byte-level BPE on the demo text and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<|unk|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>", unk_token="<|unk|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(
    folder: str | Path, *, size: str = "tiny", seed: int = 0, vocab_size: int = 1024, pretrain_steps: int = 300
) -> Path:
    """Write a Llama base model with its tokenizer into ``folder`` (safetensors).

    Random init, then ``pretrain_steps`` of :func:`pretrain` (0 keeps it random).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, vocab_size=vocab_size, seed=seed)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **SIZES[size],
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if pretrain_steps:
        pretrain(model, tokenizer, steps=pretrain_steps, seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def generic_texts(n: int, rng: random.Random) -> list[str]:
    """Plain sentences and word runs in the demo's vocabulary, none in a task's format."""
    words = sorted({w for text in _corpus(random.Random(5)) for w in text.replace("\n", " ").split()})
    texts = []
    for _ in range(n):
        if rng.random() < 0.4:
            texts.append(f"The {rng.choice(COLORS)} {rng.choice(ANIMALS)} walked to {rng.choice(CITIES)} and slept.")
        else:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))))
    return texts


def pretrain(model: Any, tokenizer: Any, *, steps: int, seed: int = 0, batch_size: int = 16, lr: float = 3e-3) -> float:
    """A few seconds of full-parameter training on generic text.

    A random model has no language for an adapter to specialise; a real base model
    does. This gives the demo base a little of one (never the tasks' formats), so
    the adapters' eval loss drops the way it does on a real base. Returns the last loss.
    """
    import torch

    torch.manual_seed(seed)
    texts = generic_texts(steps * batch_size, random.Random(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        chunk = [tokenizer.bos_token + t + tokenizer.eos_token for t in texts[step * batch_size:(step + 1) * batch_size]]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


@dataclass(frozen=True)
class DemoFiles:
    root: Path
    model: Path
    queue: Path
    datasets: dict[str, Path]


QUEUE_YAML = """\
# A loraq queue: three adapters on one tiny base model, one per dataset format.
# Paths are relative to this file. Run: loraq --home {home} submit queue.yaml && loraq --home {home} run
defaults:
  base_model: ./models/tiny
  lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}}
  training: {{epochs: 4, learning_rate: 1.0e-2, batch_size: 16, max_seq_len: 128, save_steps: 25, logging_steps: 5, seed: 7}}
  validation: {{split: 0.1, min_eval_loss_drop: 0.5}}
  max_retries: 2
pause_after_failures: 3
jobs:
  - name: support-bot
    dataset: ./data/support.jsonl
  - name: sql-writer
    dataset: {{path: ./data/sql.jsonl, format: prompt_completion}}
  - name: story-titles
    dataset: ./data/stories.jsonl
    lora: {{r: 16, alpha: 32}}
"""


def write_demo(root: str | Path, *, rows: int = 320, seed: int = 0) -> DemoFiles:
    """Write the demo model, datasets and ``queue.yaml`` into ``root``."""
    root = Path(root).absolute()
    model = build_model(root / "models" / "tiny", seed=seed)
    rng = random.Random(seed + 1)
    datasets = {}
    for key, (filename, make) in DATASETS.items():
        datasets[key] = write_jsonl(root / "data" / filename, make(rows, rng))
    queue = fsutil.atomic_write_text(root / "queue.yaml", QUEUE_YAML.format(home=".loraq"))
    return DemoFiles(root=root, model=model, queue=queue, datasets=datasets)


MARKER = ".loraq-demo"


def prepare(root: str | Path, *, rows: int = 320, seed: int = 0) -> DemoFiles:
    """Write a fresh demo into ``root``; a previous demo there (it has the marker) is replaced.

    A folder that exists, is not empty and is not a loraq demo is left alone: the
    user pointed at something else by mistake.
    """
    import shutil

    from .errors import UsageError

    root = Path(root).absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not (root / MARKER).is_file():
            raise UsageError(f"{root} exists and is not a loraq demo folder; choose another DIR")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by 'loraq demo'; the next 'loraq demo' here replaces this folder\n")
    from .model.base import quiet_libraries

    quiet_libraries()
    return write_demo(root, rows=rows, seed=seed)

