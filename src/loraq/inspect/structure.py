"""What the inspector finds and the LoRA structure it checks, without torch.

:class:`Finding` and :class:`Findings` are the inspector's vocabulary; :class:`Weights`
sorts a safetensors header into LoRA modules, and the ``check_*`` functions compare
them with each other, with the config and (in :mod:`.on_base`) with the base model.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from ..workspace import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from . import safetensors as st
from .lora_config import LoraSettings, dot_suffixes

Severity = Literal["error", "warning", "info"]

CONFIG_NAME, WEIGHTS_NAME = ADAPTER_CONFIG, ADAPTER_WEIGHTS
#: PEFT prefixes every saved key with this; a key without it is never loaded.
KEY_PREFIX = "base_model.model."
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
    serving: dict[str, Any] = field(default_factory=dict)  # engine -> serving.Verdict (not part of passing)
    #: What the gates judged (eval losses, metrics base -> adapter, the minimums): set by :func:`.verdict.verdict`.
    quality: dict[str, Any] | None = None

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
            "serving": {engine: verdict.to_json() for engine, verdict in self.serving.items()},
        } | ({"quality": self.quality} if self.quality is not None else {})


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
    # DoRA: each output's magnitude is the norm of a weight row; a zero one zeroes that output.
    dead = sorted(m.name for m in weights.modules.values() if m.magnitude is not None
                  and (mag := values.get(m.magnitude.name)) is not None and mag.finite and not mag.nonzero)
    if dead:
        found.add("dora_magnitude_zero", "error", f"{len(dead)} module(s) have an all-zero lora_magnitude_vector "
                                                  f"(e.g. {dead[0]!r}): DoRA would zero their output", f)
    top = [values[m.b.name].max_abs for m in complete if m.b is not None and m.b.name in values]
    if top:
        stats["lora_b_max_abs"] = max(top)
