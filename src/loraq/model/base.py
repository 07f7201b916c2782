"""The hot base model: loaded once per trainer process, kept resident, proven unchanged.

:class:`BaseCache` keeps the last base model (by path, revision, dtype and
quantisation) resident across jobs and loads another only when the key changes.
After each job a fingerprint of every weight (:func:`weights_checksum`) proves the
base is exactly as loaded; a base that changed is dropped and reloaded. Memory
helpers measure what a job left behind (RSS; CUDA allocated, reserved and peak).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FailureKind, TrainingError
from ..sandbox import Roots, model_folder, path_errors_as

#: Weight values sampled per tensor for the base fingerprint (besides the exact sum of every value).
CHECKSUM_SAMPLES = 256
#: Elements summed at a time by the fingerprint: bounds its temporary memory (int64: 128 MiB).
CHECKSUM_CHUNK = 1 << 24


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """The most RSS this process has had (its high-water mark since it started)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def device_memory() -> dict[str, float]:
    """RSS of this process (now, and its peak so far), and where CUDA is in use what its caching allocator holds.

    ``cuda_peak_mb`` is the most allocated since the last :func:`reset_peak_memory`
    (the start of the job, in a trainer).
    """
    import torch

    out = {"rss_mb": round(rss_mb(), 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        out["cuda_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- base models


@dataclass(frozen=True)
class BaseKey:
    """What makes two loads of a base model the same model in memory.

    ``quantization`` (``4bit`` | ``8bit``, a job's ``quantization``: QLoRA through
    bitsandbytes) is part of the key so that a quantised and a full-precision load
    of one folder never share a slot.
    """

    path: str
    revision: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    quantization: str | None = None

    def __str__(self) -> str:
        quant = f"[{self.quantization}]" if self.quantization else ""
        return f"{self.path}@{self.revision or 'main'}[{self.dtype}]{quant}"


#: Integer views of floating dtypes of the same width: the fingerprint sums bit patterns, exactly.
_INT_VIEW = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def weights_checksum(model: Any, samples: int = CHECKSUM_SAMPLES) -> str:
    """A fingerprint of every weight and buffer of a model, computed where the weights are.

    For each tensor: its name, dtype, shape, the exact sum of the bit patterns of all
    its values (each value viewed as an integer of its width, summed in int64), and
    ``samples`` evenly spaced values. A change to any single value changes the sum,
    so a weight perturbed anywhere, or a LoRA merged into the base by mistake, is
    caught; reading every value once costs a few ms per GB on a GPU.
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
            if flat.numel() == 0:
                continue
            width = flat.element_size()
            bits = flat if flat.dtype == torch.bool else flat.view(getattr(torch, _INT_VIEW[width]))
            total = torch.zeros((), dtype=torch.int64, device=flat.device)
            for start in range(0, bits.numel(), CHECKSUM_CHUNK):
                total += bits[start:start + CHECKSUM_CHUNK].sum(dtype=torch.int64)
            if flat.numel() > samples:
                flat = flat[sample_indices(flat.numel(), samples, device=flat.device)]
            digest.update(total.cpu().numpy().tobytes())
            digest.update(flat.to(torch.float64).cpu().numpy().tobytes())
    return digest.hexdigest()


def sample_indices(n: int, samples: int, *, device: Any = None) -> Any:
    """``samples`` evenly spaced indices into ``n`` values, first and last included, in exact integers.

    Integer arithmetic, not ``torch.linspace``: a float32 linspace cannot hold integers
    past 2**24, and on a real model's embedding (49,152 x 576 = 28,311,552 values) it
    rounded the last index up to ``n``, one past the end.
    """
    import torch

    return torch.arange(samples, dtype=torch.int64, device=device) * (n - 1) // max(samples - 1, 1)


@dataclass
class Resident:
    key: BaseKey
    model: Any
    tokenizer: Any
    checksum: str
    loaded_at: float


@dataclass
class BaseCache:
    """Keeps the last base model resident; loads another only when the key changes."""

    device: str = "cpu"
    resident: Resident | None = None
    loads: int = 0

    def get(self, key: BaseKey, roots: Roots | None = None) -> tuple[Resident, bool]:
        """The resident base for ``key`` and whether it was reused (not loaded now).

        A base is loaded from its checked folder (``roots``: see :func:`loraq.sandbox.model_folder`).
        """
        if self.resident is not None and self.resident.key == key:
            return self.resident, True
        self.drop()
        self.resident = self._load(key, roots)
        self.loads += 1
        # What exists now (the libraries, this base) lives as long as the base does:
        # out of the collector's sight, every later collection is cheap (~0.15 s less each
        # with torch+transformers+peft loaded).
        gc.collect()
        gc.freeze()
        return self.resident, False

    def drop(self) -> None:
        """Forget the resident base and free its memory (its reference cycles included)."""
        if self.resident is None:
            return
        self.resident = None
        gc.unfreeze()  # a frozen object is never collected: the old base must be collectable
        release_memory()

    def verify(self) -> bool:
        """Whether the resident base is unchanged since it was loaded; drop it if not."""
        if self.resident is None:
            return True
        if weights_checksum(self.resident.model) == self.resident.checksum:
            return True
        self.drop()
        return False

    def _load(self, key: BaseKey, roots: Roots | None = None) -> Resident:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = resolve_dtype(key.dtype, self.device)
        quantized = quantization_args(key.quantization, dtype, self.device)
        if roots is None:
            roots = Roots.of([key.path] if Path(key.path).is_absolute() else [])
        with path_errors_as(lambda message: TrainingError(f"cannot load base model: {message}",
                                                          kind=FailureKind.BASE_MODEL)):
            # Checked just before the load: every file inside the roots, a hub id from its snapshot folder.
            folder = str(model_folder(key.path, roots, revision=key.revision, download=True))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=key.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, trust_remote_code=key.trust_remote_code, use_safetensors=True, **quantized,
            )
        except OSError as exc:
            if _is_transient_io(exc):
                raise TrainingError(f"I/O error loading base model {key.path}: {exc}", kind=FailureKind.IO) from exc
            raise TrainingError(f"cannot load base model {key.path}: {exc}", kind=FailureKind.BASE_MODEL) from exc
        except (ValueError, KeyError, ImportError) as exc:
            raise TrainingError(f"cannot load base model {key.path}: {exc}", kind=FailureKind.BASE_MODEL) from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not quantized:  # a quantised model is placed by from_pretrained (device_map); it cannot be moved
            model.to(self.device)
        elif self.device == "cpu":
            _plain_cpu_4bit(model)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        del torch  # only the import mattered
        return Resident(key=key, model=model, tokenizer=tokenizer, checksum=weights_checksum(model), loaded_at=time.time())


def _no_kernels_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def quiet_libraries() -> None:
    """Keep Hugging Face's progress bars and notices out of this process's output.

    The one place for it in-process (the trainer, ``inspect --base``, the demo); a
    trainer process also starts with the same environment (``executors.base.trainer_env``).
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # bitsandbytes (the qlora extra) logs at import, on CPUs with AVX512-BF16, that an optional faster 4-bit
    # kernel package is missing: a notice about speed, not about this job.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_kernels_notice)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_warning()


def quantization_args(quantization: str | None, dtype: Any, device: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for a QLoRA base: 4-bit NF4 (compute in ``dtype``) or 8-bit, via bitsandbytes."""
    if quantization is None:
        return {}
    try:
        import bitsandbytes  # noqa: F401  (a clear error here, not deep inside from_pretrained)
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise TrainingError(f"quantization: {quantization} needs bitsandbytes: pip install 'loraq[qlora]' "
                            f"(missing {exc.name})", kind=FailureKind.SPEC) from exc
    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                    bnb_4bit_use_double_quant=True)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": device if device != "cuda" else "cuda:0"}}


def _plain_cpu_4bit(model: Any) -> None:
    """4-bit layers on the CPU evaluate with the kernel they train with.

    bitsandbytes' fast CPU path for inference (on CPUs with AVX512-BF16) repacks a
    layer's weights in place the first time it runs without gradients: the resident
    base would no longer be the one loaded (its fingerprint changes), and it asserts
    out-features divisible by 32 (the tiny test model's 176 are not).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def resolve_dtype(precision: str, device: str) -> Any:
    import torch

    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_transient_io(exc: OSError) -> bool:
    import errno

    return exc.errno in {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.ENOMEM}
