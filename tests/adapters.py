"""Building adapters for the inspector tests: real ones with PEFT, synthetic ones with numpy, broken ones by hand.

The synthetic writer and the header rewriters work on raw bytes, so a test can
make any file at all, including the hostile ones the inspector must refuse.
Torch is imported only by the PEFT helpers.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

PREFIX = "base_model.model."
TINY_LINEAR = {  # the demo "tiny" Llama: name suffix -> (in, out)
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 176), "mlp.up_proj": (64, 176), "mlp.down_proj": (176, 64),
}
NP_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32}


# ---------------------------------------------------------------- raw safetensors


def pack(header: dict[str, Any] | bytes | str, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file from a header (object, or raw JSON text) and a data region.

    ``length`` overrides the 8-byte header length, to make lying files.
    """
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def unpack(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def tensors_to_file(tensors: dict[str, tuple[str, np.ndarray | bytes, tuple[int, ...]]],
                    metadata: dict[str, str] | None = None) -> bytes:
    """Serialise ``name -> (dtype, values or raw bytes, shape)`` contiguously, in the given order."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    chunks, pos = [], 0
    for name, (dtype, values, shape) in tensors.items():
        raw = values if isinstance(values, bytes) else np.ascontiguousarray(values).tobytes()
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    return pack(header, b"".join(chunks))


def rewrite(path: Path, change: Callable[[dict[str, Any], bytes], tuple[Any, bytes] | bytes]) -> None:
    """Rewrite a safetensors file through ``change(header, data)``, which returns a new
    ``(header, data)`` pair or the whole file's bytes."""
    header, data = unpack(path.read_bytes())
    result = change(header, data)
    path.write_bytes(result if isinstance(result, bytes) else pack(*result))


def set_values(path: Path, name: str, edit: Callable[[np.ndarray], None]) -> None:
    """Edit one F32/F16/F64 tensor's values in place."""

    def change(header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        entry = header[name]
        begin, end = entry["data_offsets"]
        values = np.frombuffer(data[begin:end], dtype=NP_DTYPES[entry["dtype"]]).copy()
        edit(values)
        return header, data[:begin] + values.tobytes() + data[end:]

    rewrite(path, change)


def lora_names(path: Path, part: str) -> list[str]:
    header, _ = unpack(path.read_bytes())
    return sorted(k for k in header if k.endswith(f".{part}.weight"))


# ---------------------------------------------------------------- synthetic adapters (numpy)


def config(r: int = 8, alpha: float = 16, targets: Any = ("q_proj", "v_proj"), **extra: Any) -> dict[str, Any]:
    """A minimal adapter_config.json as PEFT writes it."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
            "target_modules": list(targets) if isinstance(targets, (list, tuple)) else targets,
            "bias": "none", "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
            "base_model_name_or_path": "tiny", **extra}


def synthetic(folder: Path, *, r: int = 8, layers: int = 2,
              suffixes: Iterable[str] = ("self_attn.q_proj", "self_attn.v_proj"),
              dims: dict[str, tuple[int, int]] | None = None, dtype: str = "F32", seed: int = 0,
              cfg: dict[str, Any] | None = None) -> Path:
    """A valid LoRA adapter for the tiny demo base, written without torch."""
    rng = np.random.default_rng(seed)
    dims = dims or TINY_LINEAR
    suffixes = list(suffixes)
    tensors = {}
    for layer in range(layers):
        for suffix in suffixes:
            n_in, n_out = dims[suffix]
            module = f"{PREFIX}model.layers.{layer}.{suffix}"
            a = (rng.standard_normal((r, n_in)) * 0.1).astype(NP_DTYPES[dtype])
            b = (rng.standard_normal((n_out, r)) * 0.01).astype(NP_DTYPES[dtype])
            tensors[f"{module}.lora_A.weight"] = (dtype, a, a.shape)
            tensors[f"{module}.lora_B.weight"] = (dtype, b, b.shape)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(tensors_to_file(tensors))
    targets = sorted({s.rsplit(".", 1)[-1] for s in suffixes})
    (folder / "adapter_config.json").write_text(json.dumps(cfg or config(r=r, targets=targets)))
    return folder


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- real adapters (torch + PEFT)


def build_base(folder: Path) -> Path:
    """The demo's tiny Llama, random weights: the inspector needs shapes, not skill."""
    import inspect

    from loraq.demo import build_model

    # Skip the demo's short pretraining where the builder has it: seconds saved per session.
    quick = {"pretrain_steps": 0} if "pretrain_steps" in inspect.signature(build_model).parameters else {}
    return build_model(folder, **quick)


def build_llama(folder: Path, *, hidden: int, intermediate: int, vocab: int = 840) -> Path:
    """A random Llama of another width (no tokenizer): for adapters that must not fit the tiny base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, tie_word_embeddings=False))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def peft_adapter(base: Path, out: Path, *, targets: Any = "all-linear", r: int = 8, alpha: float = 16,
                 bf16: bool = False, perturb: bool = True, seed: int = 0, **lora: Any) -> Path:
    """An adapter saved by plain PEFT; ``perturb`` gives lora_B small random values (as training would)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                  task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if perturb and "lora_B" in name:
                param.normal_(0.0, 0.02)
    if bf16:
        peft_model = peft_model.to(torch.bfloat16)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def trained_adapter(base: Path, out: Path, rows: list[dict[str, Any]], *, steps: int = 10, lr: float = 1e-2) -> Path:
    """An adapter trained a few steps on ``rows`` (prompt/completion), so its eval loss drops."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraq import data
    from loraq.model.batching import Collator

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    items = [data.encode(row, "prompt_completion", tokenizer, 128) for row in rows]
    batch = Collator(pad_id=tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in items])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.save_pretrained(out, safe_serialization=True)
    return out
