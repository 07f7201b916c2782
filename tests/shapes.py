"""Random-init models of a real model's shape, small enough for the fast tests.

A real base differs from the demo's 1 M-parameter model in its sizes, not its code:
an embedding past 2**24 values (where float32 stops holding every integer index), a
vocabulary of ~150 k with the ids a text uses far above 2**16 (where int16/uint16 and
float16 stop holding them), grouped-query attention, and tied or untied embeddings.
:func:`build` writes such a model (one layer, hidden 128: a few seconds, 77-154 MB)
with a tokenizer whose 150,016-entry vocabulary puts every real token at id >= 149,000.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Like Qwen2's 151,936: a vocabulary padded to a multiple of 64, far past 2**16.
VOCAB = 150_016
#: Ids below this are filler entries no text produces: every real token's id is at least this.
SHIFT = 149_000
HIDDEN = 128

SHAPES = {
    # name: (tie_word_embeddings, num_attention_heads, num_key_value_heads)
    "gqa-tied": (True, 4, 1),
    "gqa-untied": (False, 4, 2),
}


def wide_tokenizer(folder: Path) -> None:
    """The demo's byte-level BPE (and chat template) with its ids moved up past ``SHIFT``, saved in ``folder``."""
    from transformers import AutoTokenizer

    from loraq import demo

    demo.build_tokenizer(folder)
    path = folder / "tokenizer.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"]
    assert max(vocab.values()) + SHIFT < VOCAB
    moved = {f"<|filler_{i}|>": i for i in range(SHIFT)}
    moved.update({token: index + SHIFT for token, index in vocab.items()})
    doc["model"]["vocab"] = moved
    for added in doc["added_tokens"]:
        added["id"] += SHIFT
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token_id >= SHIFT and len(tokenizer) == SHIFT + len(vocab)


def build(folder: Path, name: str, *, seed: int = 0) -> Path:
    """A one-layer Llama of shape ``SHAPES[name]`` with the wide tokenizer, in ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tied, heads, kv_heads = SHAPES[name]
    folder.mkdir(parents=True, exist_ok=True)
    wide_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    assert model.get_input_embeddings().weight.numel() > 2**24
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    model.save_pretrained(folder, safe_serialization=True)
    return folder
