"""The base model with the adapter merged in: one folder that anything loading transformers models can serve.

torch, transformers and peft are imported when :func:`export_merged` runs, never at import.

1. The base is loaded in full precision (float32), never quantised: merging into a 4-bit or
   GGUF-dequantised-on-the-fly base would bake its rounding into every weight. A base whose
   config names a ``quantization_config`` is refused.
2. PEFT loads the adapter onto it; the logits of base + adapter on a few eval rows (the
   adapter's dataset when known, else fixed probe texts) are the reference. An adapter that
   does not change them is refused: it was not made for this base.
3. ``merge_and_unload`` folds B·A·scaling into the weights; the model is cast to the asked
   dtype and saved as sharded safetensors, with the tokenizer, its chat template and the
   generation config, in a hidden folder beside the target. The chat template is the one
   the job trained with (its own ``chat_template``, published beside the adapter) where it
   had one, else the base's; the eval rows of step 2 are rendered with that same template.
   The folder gets loraq's export record (:data:`~.target.EXPORT_RECORD`): what lets a
   later ``--force`` replace it, and nothing else (:mod:`.target`).
4. The saved folder is loaded back from disk (upcast to float32, so what is measured is the
   file, not the arithmetic of a half-precision CPU matmul) and its logits must equal the
   reference within :data:`TOLERANCES`: ``max |merged - reference| <= atol + rtol * max
   |reference|``, and within half the adapter's own effect on them. Only then is the folder
   fsynced and renamed into place (:func:`loraq.fsutil.building_dir`): it appears whole and
   checked, or not at all.

Measured on SmolLM2-135M-Instruct (2 shared cores): fp32 max |diff| 6.6e-5 against a
tolerance of 5.4e-3 (logits up to 44; the adapter moved them by up to 36), 64 s for 542 MB;
bf16 0.26 against 2.27, 75 s for 273 MB; top-1 agreement 100% in both; peak RSS 1.0-1.3 GB.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import fsutil
from ..errors import ExportError
from ..escape import printable
from ..sandbox import Roots, open_regular, path_errors_as
from . import target as target_mod
from .target import EXPORT_RECORD

DTYPES = ("fp32", "bf16", "fp16")
#: (atol, rtol) of the logit check per saved dtype. fp32 measured ~1e-5 on SmolLM2-135M (logits
#: up to ~30); bf16 keeps 8 bits of mantissa, fp16 11: their rounding of every weight moves
#: the logits by up to a few percent of their largest value.
TOLERANCES = {"fp32": (1e-3, 1e-4), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 5e-2)}
#: The merged model must also be closer to base + adapter than half the adapter's own effect
#: (max |base + adapter - base|): else a weak adapter's merge could drown in the rounding of a
#: half-precision dtype, or not have happened at all, and still pass.
MAX_SHARE_OF_EFFECT = 0.5
EVAL_ROWS = 4
MAX_TOKENS = 128
PROBES = (
    "The adapter merged into this model must answer as the adapter does.",
    "Question: what is two plus two?\nAnswer:",
    "Once upon a time, in a city by the sea,",
)
DEFAULT_SHARD_SIZE = "5GB"
#: A shard size: a whole number and a unit, as ``save_pretrained(max_shard_size=...)`` reads it (huggingface_hub).
SHARD_SIZE = re.compile(r"([0-9]{1,13}) ?([KMGT]B)", re.IGNORECASE)
SHARD_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
#: The range a shard may take (bytes): 100KB (a tensor larger than a shard gets a file of its own) to 1TB.
SHARD_BYTES = (100 * 10**3, 10**12)


def shard_size(value: str) -> str:
    """``value`` as ``save_pretrained`` takes it (``5GB``), or ValueError saying why it is not a size within SHARD_BYTES."""
    found = SHARD_SIZE.fullmatch(value.strip())
    if found is None:
        raise ValueError(f"{printable(value)[:40]!r} is not a size: a whole number and a unit (KB, MB, GB, TB), "
                         "e.g. 5GB or 500MB")
    number, unit = int(found[1]), found[2].upper()
    if not SHARD_BYTES[0] <= number * SHARD_UNITS[unit] <= SHARD_BYTES[1]:
        raise ValueError(f"{number}{unit} is outside 100KB-1TB")
    return f"{number}{unit}"


@dataclass(frozen=True)
class Check:
    """The merged model's logits against base + adapter's."""

    rows: int
    tokens: int
    source: str  # where the eval rows came from: a dataset path, or "probe texts"
    max_abs_diff: float
    max_abs_logit: float
    atol: float
    rtol: float
    tolerance: float  # atol + rtol * max_abs_logit
    top1_agreement: float  # share of positions whose most likely next token is the same
    adapter_effect: float  # max |base + adapter - base|: the adapter does change the output


@dataclass(frozen=True)
class MergedResult:
    path: str
    dtype: str
    bytes: int
    shards: int
    files: list[str]
    check: Check
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _eval_inputs(tokenizer: Any, dataset: Path | None, fmt: str | None, roots: Roots | None = None,
                 chat_template: str | None = None) -> tuple[list[list[int]], str]:
    """Token ids of a few eval rows: the first rows of ``dataset`` rendered as loraq trains them, else probes.

    Rows are rendered with the job's own chat template where it had one (as the trainer did), else the base's.
    """
    if dataset is not None:
        from .. import data

        loaded = data.load_dataset(dataset, fmt, roots=roots)
        ids = [list(data.encode(row, loaded.format, tokenizer, MAX_TOKENS, chat_template).input_ids)
               for row in loaded.rows[:EVAL_ROWS]]
        ids = [seq for seq in ids if seq]
        if ids:
            return ids, str(dataset)
    texts = list(PROBES)
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                                   add_generation_prompt=True))
    return [list(tokenizer(t, truncation=True, max_length=MAX_TOKENS).input_ids) for t in texts], "probe texts"


def export_merged(adapter_dir: Path, base: str | Path, dest: Path, *, dtype: str = "fp32",
                  dataset: Path | None = None, dataset_format: str | None = None,
                  shard_size: str = DEFAULT_SHARD_SIZE, source: dict[str, Any] | None = None,
                  chat_template: str | None = None, roots: Roots | None = None) -> MergedResult:
    """Merge the adapter in ``adapter_dir`` into ``base`` (a local folder) and write the model to ``dest``, checked.

    ``chat_template``: the template the job trained with, shipped instead of the base's and
    used to render the eval rows. ``roots``: where ``dataset`` must be (read on a checked
    descriptor). ``dest`` is replaced only if it is an earlier merged export (:mod:`.target`).

    Raises:
        ExportError: a quantised base, an adapter that does not change the base, or a
            merged model whose logits are off by more than the tolerance (nothing is written).
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    with warnings.catch_warnings():
        # transformers 5 warns about its own deprecated is_gradient_checkpointing while saving.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _export(adapter_dir, str(base), dest, dtype=dtype, dataset=dataset, dataset_format=dataset_format,
                       shard_size=shard_size, source=source, chat_template=chat_template, roots=roots)


def _export(adapter_dir: Path, base: str, dest: Path, *, dtype: str, dataset: Path | None,
            dataset_format: str | None, shard_size: str, source: dict[str, Any] | None,
            chat_template: str | None, roots: Roots | None) -> MergedResult:
    started = time.monotonic()
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(base, local_files_only=True)
    if getattr(config, "quantization_config", None):
        method = dict(config.quantization_config).get("quant_method", "quantised") if isinstance(
            config.quantization_config, dict) else "quantised"
        raise ExportError(f"base model {base} is {method}: merging into a quantised base bakes its rounding into "
                          "every weight; merge into the full-precision base instead")
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template  # what the job trained with: shipped, and the check renders with it
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True).eval()
    # PEFT opens files by name: it loads a private copy of the bytes read from checked descriptors,
    # so a file swapped after the inspection (a symlink to a secret, other weights) is never loaded.
    with tempfile.TemporaryDirectory(prefix="loraq-export-") as private:
        _copy_checked(adapter_dir, Path(private), roots)
        try:
            model = PeftModel.from_pretrained(model, private, is_trainable=False).eval()
        except Exception as exc:  # noqa: BLE001 -- PEFT's own words say why the adapter does not fit
            raise ExportError(f"PEFT cannot load {adapter_dir} onto {base}: {type(exc).__name__}: "
                              f"{str(exc).replace(private, str(adapter_dir))}") from None
    inputs, where = _eval_inputs(tokenizer, dataset, dataset_format, roots, chat_template)

    def logits_of(m: Any) -> list[Any]:
        with torch.no_grad():
            return [m(input_ids=torch.tensor([ids])).logits[0].float() for ids in inputs]

    reference = logits_of(model)
    with model.disable_adapter():
        plain = logits_of(model)
    effect = max(float((r - p).abs().max()) for r, p in zip(reference, plain, strict=True))
    if effect == 0.0:
        raise ExportError(f"the adapter does not change {base}'s output at all: not made for this base, or untrained")

    merged = model.merge_and_unload()
    merged = merged.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    merged.config.dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    with fsutil.building_dir(dest) as tmp:
        merged.save_pretrained(tmp, max_shard_size=shard_size)
        tokenizer.save_pretrained(tmp)
        del merged, model, plain
        check = _check(tmp, tokenizer, inputs, reference, dtype, where, effect)
        files = sorted(p.name for p in tmp.iterdir())
        shards = sum(1 for name in files if name.endswith(".safetensors"))
        record = {"loraq_export": 1, "kind": "merged", "dtype": dtype, "base_model": base,
                  "adapter": str(adapter_dir), "check": asdict(check), **(source or {}),
                  "chat_template": "the job's" if chat_template is not None else "the base's"}
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files.append(EXPORT_RECORD)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        fsutil.fsync_tree(tmp)
        target_mod.replaceable(dest, "merged", force=True)  # what is there now, just before it steps aside
    return MergedResult(str(dest), dtype, size, shards, sorted(files), check, round(time.monotonic() - started, 2))


#: What PEFT needs of an adapter folder: the config and the safetensors weights (never a pickle).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _copy_checked(adapter_dir: Path, private: Path, roots: Roots | None) -> None:
    """Copy the adapter's files into ``private`` from descriptors checked to be regular files (inside ``roots``)."""
    for name in ADAPTER_FILES:
        with path_errors_as(ExportError):
            if roots is not None:
                fd, _ = roots.open_file(adapter_dir / name, what=f"adapter file {name}")
            else:
                fd = open_regular(adapter_dir / name, what=f"adapter file {name}")
        try:
            with open(private / name, "wb") as out:
                while chunk := os.read(fd, 1 << 20):
                    out.write(chunk)
        finally:
            os.close(fd)


def _check(folder: Path, tokenizer: Any, inputs: list[list[int]], reference: list[Any], dtype: str, where: str,
           effect: float) -> Check:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if saved_tokenizer.chat_template != tokenizer.chat_template:
        raise ExportError(f"{folder}: the chat template did not survive saving the tokenizer")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        got = [reloaded(input_ids=torch.tensor([ids])).logits[0].float() for ids in inputs]
    diff = max(float((g - r).abs().max()) for g, r in zip(got, reference, strict=True))
    largest = max(float(r.abs().max()) for r in reference)
    positions = sum(r.shape[0] for r in reference)
    agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, reference, strict=True)) / positions
    atol, rtol = TOLERANCES[dtype]
    check = Check(rows=len(inputs), tokens=positions, source=where, max_abs_diff=diff, max_abs_logit=largest,
                  atol=atol, rtol=rtol, tolerance=atol + rtol * largest, top1_agreement=round(agree, 4),
                  adapter_effect=effect)
    if not diff <= check.tolerance:  # NaN fails too
        raise ExportError(f"the merged model's logits differ from base + adapter's by {diff:.3g} (tolerance "
                          f"{check.tolerance:.3g} for {dtype}, on {len(inputs)} rows of {where}); nothing written")
    if not diff <= MAX_SHARE_OF_EFFECT * effect:
        raise ExportError(f"the merged model's logits differ from base + adapter's by {diff:.3g}, more than half the "
                          f"adapter's own effect ({effect:.3g}): {dtype} cannot hold this adapter faithfully; export "
                          "with --dtype fp32; nothing written")
    return check
