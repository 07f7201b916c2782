"""The adapter inspector: the gate an adapter passes before loraq publishes it.

Tools that publish whatever ``save_pretrained`` wrote ship 40-byte adapters from
ZeRO-3 (trl#4416, peft#2892), adapters whose ``lora_B`` stayed zero (peft#1402),
NaN adapters, and adapters whose keys miss the base and load with only a warning
(peft#2699). :func:`inspect_adapter` stops all of these, cheapest check first,
and says what is wrong in findings a person can act on:

1. the folder: not empty; files regular and inside it; pickles refused, never opened;
2. ``adapter_config.json``: a LoRA config with sane values;
3. ``adapter_model.safetensors``: the header, read by loraq with bounds (``_safetensors``);
4. the LoRA structure: A and B per module, shapes and ranks against the config,
   modules against ``target_modules`` (matched the way PEFT matches them);
5. the values, read once: finite, and ``lora_B`` not all zero;
6. with ``base``: names and shapes against the base model built on the meta device,
   then a real load with ``PeftModel.from_pretrained`` that must change the output;
7. with ``data`` too: eval loss of base and adapter, and :func:`quality_gate`.

Steps 1-5 use numpy only (the supervisor never imports torch); 6-7 import torch
lazily, in ``_inspect_base``.

Finding codes (severity):

=========================  ========  =====================================================
code                       severity  meaning
=========================  ========  =====================================================
empty_folder               error     the folder holds nothing
too_many_files             error     more entries than an adapter folder ever has
symlink_escape             error     an entry is a symlink that resolves outside the folder
not_regular_file           error     the config or weights name a FIFO, device or folder
unreadable                 error     a file cannot be read (permissions, I/O error)
pickle_refused             error     a pickle file (.bin .pt .pth .pkl .pickle .ckpt); never loaded
missing_config             error     no adapter_config.json
bad_config                 error     the config is not JSON, or a field has a bad value
not_lora                   error     the config's peft_type is not LORA
no_weights                 error     no adapter_model.safetensors
multiple_weights           error     other .safetensors files beside it: which is the adapter?
zero_size                  error     a 0-byte config or weights file
oversized                  error     bigger than the config and base allow (warning: a bloated header)
truncated                  error     the file ends before what its header describes
header_too_large           error     the header length is over the 100 MB cap
header_not_json            error     the header is not UTF-8 JSON (or does not start with '{')
header_not_object          error     the header is JSON but not an object
header_duplicate_key       error     a name appears twice in the header
header_too_many_entries    error     more header entries than the cap
header_bad_entry           error     an entry lacks dtype/shape/data_offsets or has bad values
bad_metadata               error     __metadata__ is not a str -> str map
bad_dtype                  error     an unknown dtype, or LoRA weights that are not F16/BF16/F32/F64
span_mismatch              error     a span's length is not dtype size x element count
span_out_of_bounds         error     a span ends past the data region
span_overlap               error     two spans share bytes
span_gap                   error     bytes that belong to no tensor (holes, trailing bytes)
no_lora_keys               error     no lora_A / lora_B tensor at all
unexpected_key             error     a tensor PEFT would silently ignore (wrong prefix, adapter name in key)
missing_lora_a             error     a module has lora_B but no lora_A
missing_lora_b             error     a module has lora_A but no lora_B
missing_dora_magnitude     error     use_dora without lora_magnitude_vector
empty_tensor               error     a LoRA tensor with a 0 dimension (ZeRO-3 saved its local shard)
shape_mismatch             error     A and B disagree with each other, or have the wrong number of dims
rank_mismatch              error     A's rows or B's columns differ from the config's r (or rank_pattern)
wrong_targets              error     weights on a module target_modules does not select (PEFT drops them)
missing_targets            error     a target with no weights (PEFT would load it untrained)
nonfinite                  error     NaN or Inf values
lora_b_zero                error     every lora_B is zero: untrained (warning: only some modules)
lora_a_zero                error     every lora_A is zero (warning: only some modules)
modules_to_save_bloat      warning   full module copies outweigh the LoRA weights
base_mismatch              error     a module or tensor that the base model does not have
base_shape_mismatch        error     shapes that do not fit the base (made for another model)
load_failed                error     PEFT cannot load the adapter onto the base
load_mismatch              error     PEFT loads it with missing keys or fewer LoRA modules
nonfinite_output           error     the adapted model outputs NaN or Inf
no_effect                  error     the adapter does not change the base model's output
quality_gate               error     eval loss not at least min_drop below the base's (or not finite)
=========================  ========  =====================================================
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import _safetensors as st
from ._lora_config import LoraSettings, dot_suffixes, parse_config
from .errors import InspectionError, PathError
from .sandbox import Roots, is_pickle

Severity = Literal["error", "warning", "info"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PEFT prefixes every saved key with this; a key without it is never loaded.
KEY_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
MAX_FILES = 10_000
#: Findings listed per code; the rest are counted in one more finding.
MAX_PER_CODE = 5
_LORA_KEY = re.compile(
    r"(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<param>weight|bias))?"
)


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str
    file: str | None = None


@dataclass(frozen=True)
class Inspection:
    """The verdict on one adapter folder: findings and what was measured."""

    path: str
    findings: list[Finding]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.errors()

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "passed": self.passed,
            "findings": [{"code": f.code, "severity": f.severity, "message": f.message, "file": f.file}
                         for f in self.findings],
            "stats": _finite_json(self.stats),
        }


def _finite_json(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


class Findings:
    """Collects findings, keeping a hostile file's ten thousand bad entries to a few lines."""

    def __init__(self) -> None:
        self.items: list[Finding] = []
        self._seen: Counter[tuple[str, Severity]] = Counter()

    def add(self, code: str, severity: Severity, message: str, file: str | None = None) -> None:
        self._seen[code, severity] += 1
        if self._seen[code, severity] <= MAX_PER_CODE:
            self.items.append(Finding(code, severity, message, file))

    def has_errors(self) -> bool:
        return any(severity == "error" for _, severity in self._seen)

    def result(self) -> list[Finding]:
        out = list(self.items)
        for (code, severity), n in self._seen.items():
            if n > MAX_PER_CODE:
                file = next(f.file for f in self.items if f.code == code and f.severity == severity)
                out.append(Finding(code, severity, f"... and {n - MAX_PER_CODE} more {code} findings like these", file))
        return out


# ---------------------------------------------------------------- the LoRA structure


@dataclass
class Module:
    """The LoRA tensors of one module: A, B and the optional extras."""

    name: str  # as in the base model, without KEY_PREFIX
    a: st.TensorInfo | None = None
    b: st.TensorInfo | None = None
    embedding: bool = False  # lora_embedding_A / _B (an Embedding layer) rather than lora_A / lora_B
    embedding_b: bool = False
    magnitude: st.TensorInfo | None = None
    bias: st.TensorInfo | None = None

    @property
    def dims(self) -> tuple[int, int] | None:
        """``(in, out)`` when both A and B are there."""
        if self.a is None or self.b is None or len(self.a.shape) < 2 or len(self.b.shape) < 2:
            return None
        return self.a.shape[1], self.b.shape[0]


@dataclass
class Weights:
    """What adapter_model.safetensors holds, sorted into LoRA modules and the rest."""

    header: st.Header
    modules: dict[str, Module]
    copies: list[st.TensorInfo]  # full module copies (modules_to_save, saved base layers, tokens)

    @property
    def lora_bytes(self) -> int:
        return sum(t.nbytes for m in self.modules.values() for t in (m.a, m.b, m.magnitude, m.bias) if t is not None)

    @property
    def copy_bytes(self) -> int:
        return sum(t.nbytes for t in self.copies)


def sort_tensors(header: st.Header, cfg: LoraSettings | None, found: Findings) -> Weights:
    modules: dict[str, Module] = {}
    copies: list[st.TensorInfo] = []
    for t in header.tensors:
        match = _LORA_KEY.fullmatch(t.name)
        if not t.name.startswith(KEY_PREFIX):
            found.add("unexpected_key", "error", f"tensor {t.name[:200]!r} does not start with {KEY_PREFIX!r}; "
                                                 "PEFT would ignore it", WEIGHTS_NAME)
            continue
        if match is None:
            rest = t.name[len(KEY_PREFIX):]
            if ".base_layer." in rest or "trainable_tokens_" in rest or (cfg and cfg.is_saved_copy(rest)):
                copies.append(t)
            else:
                found.add("unexpected_key", "error", f"tensor {t.name[:200]!r} is neither LoRA nor in modules_to_save; "
                                                     "PEFT would ignore it", WEIGHTS_NAME)
            continue
        name, part, param = match.group("module")[len(KEY_PREFIX):], match.group("part"), match.group("param")
        module = modules.setdefault(name, Module(name))
        embedding = part.startswith("lora_embedding")
        if part in ("lora_A", "lora_embedding_A") and param == (None if embedding else "weight") and module.a is None:
            module.a, module.embedding = t, embedding
        elif part in ("lora_B", "lora_embedding_B") and param == (None if embedding else "weight") and module.b is None:
            module.b, module.embedding_b = t, embedding
        elif part == "lora_B" and param == "bias" and (cfg is None or cfg.lora_bias):
            module.bias = t
        elif part == "lora_magnitude_vector" and param in (None, "weight") and (cfg is None or cfg.use_dora):
            module.magnitude = t
        else:
            found.add("unexpected_key", "error", f"tensor {t.name[:200]!r} is not a tensor this config's LoRA has "
                                                 "(an adapter name in the key, a second A or B for the module, or "
                                                 "lora_bias/use_dora off); PEFT would ignore it", WEIGHTS_NAME)
    return Weights(header, modules, copies)


def check_structure(weights: Weights, cfg: LoraSettings | None, found: Findings) -> None:
    """A and B per module, their shapes, ranks and targets, against each other and the config."""
    f = WEIGHTS_NAME
    if not weights.modules:
        found.add("no_lora_keys", "error", f"{f} holds no lora_A/lora_B tensors "
                                           f"({len(weights.header.tensors)} tensors in all); nothing to load", f)
        return
    for m in sorted(weights.modules.values(), key=lambda m: m.name):
        if m.a is None:
            found.add("missing_lora_a", "error", f"module {m.name!r} has lora_B but no lora_A", f)
        if m.b is None:
            found.add("missing_lora_b", "error", f"module {m.name!r} has lora_A but no lora_B", f)
        for t in (m.a, m.b, m.magnitude, m.bias):
            if t is not None and t.dtype not in st.FLOAT_DTYPES:
                found.add("bad_dtype", "error", f"tensor {t.name!r} is {t.dtype}; LoRA weights must be "
                                                "F16, BF16, F32 or F64", f)
        if m.a is None or m.b is None:
            continue
        if any(0 in t.shape for t in (m.a, m.b)):
            found.add("empty_tensor", "error", f"module {m.name!r} has an empty tensor (A {list(m.a.shape)}, "
                                               f"B {list(m.b.shape)}): saved from a ZeRO-3 shard without gathering "
                                               "the weights (trl#4416, peft#2892)", f)
            continue
        if m.embedding != m.embedding_b:
            found.add("shape_mismatch", "error", f"module {m.name!r} mixes lora_embedding_* and lora_A/lora_B "
                                                 "tensors; it is one kind of layer or the other", f)
            continue
        want_dims = 2 if m.embedding else len(m.a.shape)
        if len(m.a.shape) < 2 or len(m.a.shape) != want_dims or len(m.b.shape) != want_dims:
            found.add("shape_mismatch", "error", f"module {m.name!r}: A {list(m.a.shape)} and B {list(m.b.shape)} "
                                                 "must be matrices (or conv kernels) of the same rank", f)
            continue
        if m.a.shape[0] != m.b.shape[1]:
            found.add("shape_mismatch", "error", f"module {m.name!r}: A {list(m.a.shape)} has rank {m.a.shape[0]} "
                                                 f"but B {list(m.b.shape)} has rank {m.b.shape[1]}", f)
        elif cfg is not None and m.a.shape[0] != (want := cfg.rank_of(m.name)):
            found.add("rank_mismatch", "error", f"module {m.name!r} has rank {m.a.shape[0]} but adapter_config.json "
                                                f"says r={want}; PEFT would fail to load it", f)
        out = m.b.shape[0]
        for extra, what in ((m.magnitude, "lora_magnitude_vector"), (m.bias, "lora_B.bias")):
            if extra is not None and math.prod(extra.shape) != out:
                found.add("shape_mismatch", "error", f"module {m.name!r}: {what} {list(extra.shape)} does not match "
                                                     f"the {out} outputs of B", f)
        if cfg is not None and cfg.use_dora and m.magnitude is None:
            found.add("missing_dora_magnitude", "error", f"module {m.name!r} has no lora_magnitude_vector but the "
                                                         "config says use_dora", f)
    if cfg is not None:
        check_targets(weights, cfg, found)


def check_targets(weights: Weights, cfg: LoraSettings, found: Findings,
                  all_linear: frozenset[str] | None = None) -> None:
    """Weights only on targeted modules; every listed target has weights."""
    names = sorted(weights.modules)
    wrong = [name for name in names if not cfg.targets_module(name, all_linear)]
    if wrong:
        targets = _short(cfg.targets)
        for name in wrong:
            found.add("wrong_targets", "error", f"module {name!r} has LoRA weights but target_modules {targets} "
                                                "does not select it; PEFT would drop them with only a warning "
                                                "(peft#2699)", WEIGHTS_NAME)
    if isinstance(cfg.targets, tuple):
        # A listed target is matched by a module named so or ending in "." + target: a set lookup.
        tails = {tail for name in names for tail in dot_suffixes(name)}
        for target in cfg.targets:
            if target not in tails:
                found.add("missing_targets", "error", f"target_modules lists {target!r} but no weights for it are "
                                                      "saved; PEFT would load it untrained", WEIGHTS_NAME)


def _short(value: Any) -> str:
    text = json.dumps(sorted(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_values(fd: int, weights: Weights, found: Findings, stats: dict[str, Any]) -> None:
    """One pass over the values: finite everywhere, and A and B not all zero."""
    f = WEIGHTS_NAME
    values, defects = st.scan_values(fd, weights.header)
    for d in defects:
        found.add(d.code, "error", f"{f}: {d.message}", f)
    for name, v in values.items():
        if not v.finite:
            found.add("nonfinite", "error", f"tensor {name!r} holds NaN or Inf (largest magnitude {v.max_abs}); "
                                            "training diverged: lower the learning rate", f)
    complete = [m for m in weights.modules.values() if m.a is not None and m.b is not None
                and m.a.nbytes and m.b.nbytes]  # empty tensors are already an empty_tensor finding
    if not complete or defects:
        return
    for part in ("b", "a"):
        scanned = [(m.name, values.get(getattr(m, part).name)) for m in complete]
        zero = sorted(name for name, v in scanned if v is not None and v.finite and not v.nonzero)
        code, label = f"lora_{part}_zero", f"lora_{part.upper()}"
        if zero and len(zero) == len(complete):
            hint = ("untrained: did the optimizer step, and was the trained copy saved (peft#1402)?" if part == "b"
                    else "this LoRA cannot change anything")
            found.add(code, "error", f"every {label} ({len(zero)} modules) is all zeros; {hint}", f)
        elif zero:
            found.add(code, "warning", f"{len(zero)} of {len(complete)} modules have an all-zero {label} "
                                       f"(e.g. {zero[0]!r}); they change nothing", f)
    top = [values[m.b.name].max_abs for m in complete if m.b is not None and m.b.name in values]
    if top:
        stats["lora_b_max_abs"] = max(top)


# ---------------------------------------------------------------- the folder


def _resolve(folder: str | Path, roots: Roots | None) -> Path:
    path = Path(folder).expanduser()
    if roots is not None:
        try:
            roots.check_read(path, what="adapter folder")
        except PathError as exc:
            raise InspectionError(str(exc)) from None
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InspectionError(f"adapter folder {str(folder)!r} does not exist") from None
    if not resolved.is_dir():
        raise InspectionError(f"adapter folder {str(folder)!r} is not a folder")
    return resolved


def _list(root: Path, found: Findings) -> list[str]:
    names: list[str] = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if len(names) >= MAX_FILES:
                    found.add("too_many_files", "error", f"{root} holds more than {MAX_FILES:,} entries; "
                                                         "not an adapter folder")
                    break
                names.append(entry.name)
    except OSError as exc:
        raise InspectionError(f"adapter folder {root} cannot be listed: {exc.strerror or exc}") from None
    names.sort()
    if not names:
        found.add("empty_folder", "error", f"{root} is empty: no adapter was saved (with ZeRO-3 or FSDP, gather "
                                           "the full weights before saving: trl#4416)")
    for name in names:
        path = root / name
        if path.is_symlink():
            try:
                target = path.resolve()
            except (OSError, RuntimeError):
                target = None
            if target is None or not target.is_relative_to(root):
                found.add("symlink_escape", "error", f"{name} is a symlink to {str(target)!r}, outside the adapter "
                                                     "folder (or a loop); copy the file in instead", name)
        if is_pickle(path):
            found.add("pickle_refused", "error", f"{name} is a pickle file; loraq never loads pickles (they can run "
                                                 "code); save with safe_serialization=True and delete it", name)
    return names


def _open(root: Path, name: str, found: Findings) -> tuple[int, int] | None:
    """Open ``root/name`` if it is a regular file inside ``root``: ``(fd, size)`` or ``None``."""
    path = root / name
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        found.add("unreadable", "error", f"{name} cannot be resolved (a symlink loop?)", name)
        return None
    if not resolved.is_relative_to(root):
        return None  # already a symlink_escape finding; never opened
    try:
        fd, stat_result = st.open_regular(resolved)
    except OSError as exc:
        if exc.errno == 0 or path.is_dir():
            found.add("not_regular_file", "error", f"{name} is not a regular file", name)
        else:
            found.add("unreadable", "error", f"{name} cannot be read: {exc.strerror or exc}", name)
        return None
    if stat_result.st_size == 0:
        os.close(fd)
        found.add("zero_size", "error", f"{name} is 0 bytes: the save was cut off or ran on a rank that held no "
                                        "weights (ZeRO-3); save again", name)
        return None
    return fd, stat_result.st_size


def _read_config(root: Path, names: list[str], found: Findings, stats: dict[str, Any]) -> LoraSettings | None:
    if CONFIG_NAME not in names:
        if names:
            found.add("missing_config", "error", f"no {CONFIG_NAME} in {root}; PEFT cannot load the adapter "
                                                 "without it (save with save_pretrained)")
        return None
    opened = _open(root, CONFIG_NAME, found)
    if opened is None:
        return None
    fd, size = opened
    try:
        if size > MAX_CONFIG_BYTES:
            found.add("oversized", "error", f"{CONFIG_NAME} is {size:,} bytes; a LoRA config is a few KB "
                                            f"(cap {MAX_CONFIG_BYTES:,})", CONFIG_NAME)
            return None
        raw = st.read_at(fd, 0, size)
    except OSError as exc:
        found.add("unreadable", "error", f"{CONFIG_NAME} cannot be read: {exc.strerror or exc}", CONFIG_NAME)
        return None
    finally:
        os.close(fd)
    cfg, problems = parse_config(raw)
    for code, message in problems:
        found.add(code, "error", f"{CONFIG_NAME}: {message}", CONFIG_NAME)
    if cfg is not None:
        stats.update(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                     target_modules=sorted(cfg.targets) if isinstance(cfg.targets, tuple) else cfg.targets)
    return cfg


def _read_weights(root: Path, names: list[str], cfg: LoraSettings | None, found: Findings,
                  stats: dict[str, Any]) -> Weights | None:
    others = [n for n in names if n.lower().endswith(".safetensors") and n != WEIGHTS_NAME]
    if WEIGHTS_NAME not in names:
        pickles = [n for n in names if n.startswith("adapter_model.") and is_pickle(Path(n))]
        hint = (f"only {pickles[0]} (a pickle, refused) is there; save with safe_serialization=True" if pickles
                else f"found {others[0]}; PEFT loads only {WEIGHTS_NAME}" if others else "save with save_pretrained")
        if names:
            found.add("no_weights", "error", f"no {WEIGHTS_NAME} in {root}: {hint}")
        return None
    if others:
        found.add("multiple_weights", "error", f"{len(others)} other .safetensors file(s) beside {WEIGHTS_NAME} "
                                               f"({', '.join(others[:3])}); an adapter folder holds one", others[0])
    opened = _open(root, WEIGHTS_NAME, found)
    if opened is None:
        return None
    fd, size = opened
    stats["bytes"] = size
    try:
        header, defects = st.read_header(fd, size)
        for d in defects:
            found.add(d.code, "error", f"{WEIGHTS_NAME}: {d.message}", WEIGHTS_NAME)
        if header is None or defects:
            return None  # the rest would describe a file whose layout is already wrong
        weights = sort_tensors(header, cfg, found)
        _weights_stats(weights, found, stats)
        check_structure(weights, cfg, found)
        if header.header_len > (1 << 20) + 1024 * len(header.tensors):
            found.add("oversized", "warning", f"{WEIGHTS_NAME}: the header is {header.header_len:,} bytes for "
                                              f"{len(header.tensors)} tensors; mostly padding or metadata",
                      WEIGHTS_NAME)
        check_values(fd, weights, found, stats)
        return weights
    except OSError as exc:
        found.add("unreadable", "error", f"{WEIGHTS_NAME} cannot be read: {exc.strerror or exc}", WEIGHTS_NAME)
        return None
    finally:
        os.close(fd)


def _weights_stats(weights: Weights, found: Findings, stats: dict[str, Any]) -> None:
    dtypes = sorted({t.dtype for t in weights.header.tensors})
    stats.update(
        n_tensors=len(weights.header.tensors), n_modules=len(weights.modules), header_bytes=weights.header.header_len,
        dtype=dtypes[0] if len(dtypes) == 1 else dtypes, lora_bytes=weights.lora_bytes,
        modules_to_save_bytes=weights.copy_bytes,
        targets=sorted({name.rsplit(".", 1)[-1] for name in weights.modules}),
    )
    if weights.copies and weights.copy_bytes > weights.lora_bytes:
        copied = sorted({t.name[len(KEY_PREFIX):].rsplit(".", 1)[0] for t in weights.copies})
        found.add("modules_to_save_bloat", "warning",
                  f"full copies of {', '.join(copied[:3])} take {weights.copy_bytes / 2**20:,.1f} MiB, more than "
                  f"the LoRA weights ({weights.lora_bytes / 2**20:,.1f} MiB); drop them from modules_to_save unless "
                  "they must be trained", WEIGHTS_NAME)


# ---------------------------------------------------------------- the public interface


def inspect_adapter(folder: str | Path, *, roots: Roots | None = None, base: str | None = None,
                    data: str | None = None, min_eval_loss_drop: float = 0.0, max_seq_len: int = 512) -> Inspection:
    """Inspect one adapter folder; the returned :class:`Inspection` passes when no finding is an error.

    Args:
        folder: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        roots: when given, the folder, ``base`` and ``data`` must resolve inside them.
        base: a local base model folder: check names and shapes against it, load
            the adapter onto it with PEFT and require that the output changes.
        data: a dataset (needs ``base``): compare the eval loss of base and adapter
            and apply :func:`quality_gate` with ``min_eval_loss_drop``.
        max_seq_len: rows of ``data`` are cut to this many tokens.

    Raises:
        InspectionError: the folder (or ``base``/``data``) is missing, not a folder,
            outside ``roots``, or unusable. Anything wrong inside the folder is a finding.
    """
    root = _resolve(folder, roots)
    if data is not None and base is None:
        raise InspectionError("an eval dataset needs a base model to compare with; give base as well")
    data_path: Path | None = None
    if base is not None:
        from . import _inspect_base  # torch-free to import; torch comes with the base model's checks

        # Whether there is anything to inspect against is settled first, whatever the folder holds.
        base = _inspect_base.resolve_base(base, roots)
        data_path = _inspect_base.resolve_data(data, roots) if data is not None else None
    found = Findings()
    stats: dict[str, Any] = {}
    names = _list(root, found)
    cfg = _read_config(root, names, found, stats)
    weights = _read_weights(root, names, cfg, found, stats)
    if base is not None:
        stats["base"] = base
        if cfg is not None and weights is not None:
            _inspect_base.inspect_on_base(root, weights, cfg, found, stats, base=base, data_path=data_path,
                                          min_drop=min_eval_loss_drop, max_seq_len=max_seq_len)
    return Inspection(str(root), found.result(), stats)


def check_finite(path: Path) -> str | None:
    """What is wrong with one safetensors file's structure or values, in one line; ``None`` if nothing.

    Run on every training checkpoint, so a run that diverged stops at once
    instead of training on NaN for hours.
    """
    path = Path(path)
    try:
        fd, stat_result = st.open_regular(path)
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or 'not a regular file'})"
    try:
        if stat_result.st_size == 0:
            return f"{path}: 0 bytes; the save was cut off"
        header, defects = st.read_header(fd, stat_result.st_size)
        if header is None or defects:
            return f"{path}: {defects[0].message}"
        if not header.tensors:
            return f"{path}: holds no tensors"
        values, defects = st.scan_values(fd, header)
        if defects:
            return f"{path}: {defects[0].message}"
        bad = [name for name, v in values.items() if not v.finite]
        if bad:
            return (f"{path}: NaN or Inf in {len(bad)} tensor(s), first {bad[0]!r}; training diverged: "
                    "lower the learning rate")
        return None
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    finally:
        os.close(fd)


def quality_gate(base_eval_loss: float | None, eval_loss: float | None, min_drop: float) -> Finding | None:
    """The queue's quality gate: the adapter's eval loss must be at most ``base_eval_loss - min_drop``.

    With ``min_drop`` 0 the adapter must simply not be worse than the base.
    Returns ``None`` when it passes, or when a loss is missing (nothing to judge);
    a non-finite loss is an error.
    """
    if base_eval_loss is None or eval_loss is None:
        return None
    if not all(math.isfinite(x) for x in (base_eval_loss, eval_loss, min_drop)):
        return Finding("quality_gate", "error", f"eval loss {eval_loss} vs base {base_eval_loss} (min drop "
                                                f"{min_drop}) is not finite; the adapter or the eval data is broken")
    if eval_loss <= base_eval_loss - min_drop:
        return None
    drop = base_eval_loss - eval_loss
    verdict = f"a drop of only {drop:.4f}" if drop > 0 else "no better"
    return Finding("quality_gate", "error",
                   f"eval loss {eval_loss:.4f} vs the base's {base_eval_loss:.4f} is {verdict}; the gate asks for a "
                   f"drop of at least {min_drop:.4f} (train longer, raise the learning rate, or lower "
                   "validation.min_eval_loss_drop)")
