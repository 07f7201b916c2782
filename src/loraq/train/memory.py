"""Memory options of a job, decided in the trainer: gradient checkpointing (``auto``) and the fused loss.

- :func:`checkpointing`: ``training.gradient_checkpointing: auto`` turns it on when
  the activations the largest micro-batch keeps for the backward pass
  (:func:`activation_bytes`, an estimate from the model's shape) would take more than
  half of the device's free memory (CUDA's free memory; on the CPU the memory the
  system has available). ``true`` and ``false`` are taken as they are; the OOM
  back-off turns it on at micro-batch 1 either way.
- :func:`fused_loss`: ``training.fused_loss: true`` uses liger-kernel's fused linear
  cross-entropy (Trainer's ``use_liger_kernel`` with only that kernel): the logits of
  the whole vocabulary are never materialised. It needs liger-kernel (``pip install
  'loraq[liger]'``), a CUDA device (its kernels are Triton's, which do not run on the
  CPU) and an architecture liger-kernel patches; otherwise the job trains with the
  plain loss and says why.

Each returns the decision and a JSON-able note (``extras["memory"]``).
"""

from __future__ import annotations

from typing import Any

#: Fraction of the free memory the activations may take before ``auto`` turns checkpointing on.
AUTO_FRACTION = 0.5


def _dims(config: Any) -> tuple[int, int, int, int]:
    text = getattr(config, "text_config", None) or config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or 0)
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or 0)
    inter = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    return hidden, layers, inter, vocab


def activation_bytes(config: Any, tokens: int, dtype_bytes: int, *, checkpointing: bool) -> int:
    """What one micro-batch of ``tokens`` keeps for its backward pass, estimated from the model's shape.

    Per token and layer a Llama-style block keeps about 18 hidden-sized tensors (norm
    outputs, q/k/v, attention output, residuals, LoRA inputs and their dropout) and 5
    intermediate-sized ones (gate, up, their activation and product); with checkpointing
    only each layer's input, plus one layer recomputed at a time. The logits are kept in
    float32 with their gradient (the loss upcasts them). The constants were fitted to the
    peak RSS of SmolLM2-135M training steps on the CPU (benchmarks/README.md, bench_real.py).
    """
    hidden, layers, inter, vocab = _dims(config)
    per_layer = (18 * hidden + 5 * inter) * dtype_bytes
    logits = 3 * vocab * 4
    if checkpointing:
        return tokens * (layers * hidden * dtype_bytes + per_layer + logits)
    return tokens * (layers * per_layer + logits)


def free_bytes(device: str) -> int:
    """Free memory of ``device``: CUDA's free memory, or the system's available memory for the CPU."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def checkpointing(setting: bool | str, config: Any, max_micro_tokens: int, dtype_bytes: int,
                  device: str) -> tuple[bool, dict[str, Any]]:
    """Whether the job trains with gradient checkpointing, and why (see the module docstring)."""
    if setting != "auto":
        return bool(setting), {"gradient_checkpointing": bool(setting), "setting": setting}
    need = activation_bytes(config, max_micro_tokens, dtype_bytes, checkpointing=False)
    free = free_bytes(device)
    on = need > AUTO_FRACTION * free
    return on, {"gradient_checkpointing": on, "setting": "auto", "max_micro_tokens": max_micro_tokens,
                "estimated_activations_mb": round(need / 2**20, 1),
                "estimated_with_checkpointing_mb": round(
                    activation_bytes(config, max_micro_tokens, dtype_bytes, checkpointing=True) / 2**20, 1),
                "free_mb": round(free / 2**20, 1),
                "rule": f"on when the activations would take over {AUTO_FRACTION:.0%} of the free memory"}


def fused_loss(wanted: bool, device: str, model: Any) -> tuple[bool, str | None]:
    """Whether to train with liger-kernel's fused linear cross-entropy; the reason when it was asked for and not used."""
    if not wanted:
        return False, None
    if not device.startswith("cuda"):
        return False, f"fused_loss: not used on {device}: liger-kernel's kernels run on CUDA devices only"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False, "fused_loss: not used: liger-kernel is not installed (pip install 'loraq[liger]')"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False, f"fused_loss: not used: liger-kernel does not patch {model_type!r} models"
    return True, None


def liger_args(on: bool) -> dict[str, Any]:
    """TrainingArguments for the fused loss alone (no other liger kernel replaces a layer of the resident base)."""
    if not on:
        return {}
    return {"use_liger_kernel": True,
            "liger_kernel_config": {"fused_linear_cross_entropy": True, "cross_entropy": False, "rope": False,
                                    "rms_norm": False, "swiglu": False}}
