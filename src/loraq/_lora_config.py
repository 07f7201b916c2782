"""adapter_config.json for the inspector: validated, and matched against module names the way PEFT matches.

Torch-free. :class:`LoraSettings` mirrors the parts of peft's ``LoraConfig`` that
decide which modules carry LoRA and with which rank (``target_modules``,
``exclude_modules``, ``modules_to_save``, ``layers_to_transform``/``layers_pattern``,
``rank_pattern``); a test checks it against peft's own matcher.

The config comes from an untrusted folder, and its regexes run on every module
name. Python's ``re`` cannot time out, so a regex with a nested quantifier
(``(a+)+``), the classic catastrophic-backtracking shape, is refused instead of run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

#: Longest regex accepted in target_modules, exclude_modules or a pattern key.
MAX_REGEX_CHARS = 1000

# A group holding a quantifier, itself quantified: "(a+)+", "(\w*\.)*". Python's re
# cannot time out, and such a pattern can backtrack for hours on a module name.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[*+}](?:[^()\\]|\\.)*\)[*+{]")


@dataclass(frozen=True)
class LoraSettings:
    """The fields of adapter_config.json the inspector checks against, validated."""

    r: int
    alpha: float
    dropout: float
    targets: str | tuple[str, ...] | None
    exclude: str | tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    use_dora: bool = False
    lora_bias: bool = False

    def rank_of(self, module: str) -> int:
        """The rank PEFT gives ``module``: the first matching rank_pattern key, else r."""
        for key, rank in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return rank
        return self.r

    def is_saved_copy(self, module: str) -> bool:
        return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", module) for m in self.modules_to_save)

    def targets_module(self, module: str, all_linear: frozenset[str] | None = None) -> bool:
        """Whether PEFT puts LoRA on ``module`` (mirrors peft's ``check_target_module_exists``).

        ``all_linear`` is what "all-linear" expands to on the base; without a base,
        every module but the output layer (``lm_head``) counts.
        """
        if self.exclude and _matches(self.exclude, module):
            return False
        if self.is_saved_copy(module) or self.targets is None:
            return False
        if self.targets == "all-linear":
            return module in all_linear if all_linear is not None else module.split(".")[-1] != "lm_head"
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, module) is not None
        if module in self.targets:
            return True
        if not any(module.endswith(f".{t}") for t in self.targets):
            return False
        return self.layers_to_transform is None or self._layer_index(module) in self.layers_to_transform

    def _layer_index(self, module: str) -> int | None:
        patterns = self.layers_pattern or (r"[^.]*",)
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match:
                return int(match.group("idx"))
        return None


def _matches(pattern: str | tuple[str, ...], module: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, module) is not None
    return module in pattern or any(module.endswith(f".{p}") for p in pattern)


def _regex_problem(pattern: str) -> str | None:
    if len(pattern) > MAX_REGEX_CHARS:
        return f"is a {len(pattern)}-character regex; at most {MAX_REGEX_CHARS} are accepted"
    if _NESTED_QUANTIFIER.search(pattern):
        return ("has a nested quantifier such as '(a+)+', which can take exponential time to match; "
                "list the module names instead")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"is not a valid regex ({exc})"
    return None


def _names(value: Any, field_name: str, problems: list[str], *, allow_regex: bool) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            return (value,)
        if value != "all-linear" and (problem := _regex_problem(value)):
            problems.append(f"{field_name} {problem}")
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    problems.append(f"{field_name} must be a module name, a regex or a non-empty list of names, got {str(value)[:80]}")
    return None


def parse_config(raw: bytes) -> tuple[LoraSettings | None, list[tuple[str, str]]]:
    """Validate adapter_config.json; return the settings and ``(code, message)`` problems."""
    try:
        cfg = json.loads(raw.decode("utf-8"), parse_constant=lambda name: float("nan"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, [("bad_config", f"not valid JSON ({str(exc)[:120]})")]
    if not isinstance(cfg, dict):
        return None, [("bad_config", f"must be a JSON object, got a {type(cfg).__name__}")]
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        return None, [("bad_config", "has no peft_type; PEFT cannot load it")]
    if str(peft_type).upper() != "LORA":
        message = f"peft_type is {str(peft_type)[:40]!r}, not 'LORA'; loraq publishes LoRA adapters only"
        return None, [("not_lora", message)]
    problems: list[str] = []
    r, alpha, dropout = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout", 0.0)
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        problems.append(f"r must be a positive integer, got {str(r)[:40]}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        problems.append(f"lora_alpha must be a positive number, got {str(alpha)[:40]}")
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        problems.append(f"lora_dropout must be in [0, 1), got {str(dropout)[:40]}")
    targets = _names(cfg.get("target_modules"), "target_modules", problems, allow_regex=True)
    if targets is None and not cfg.get("target_parameters") and "target_modules" not in " ".join(problems):
        problems.append("target_modules is missing; PEFT would not know which modules the weights belong to")
    exclude = _names(cfg.get("exclude_modules"), "exclude_modules", problems, allow_regex=True)
    modules_to_save = _names(cfg.get("modules_to_save"), "modules_to_save", problems, allow_regex=False) or ()
    rank_pattern = _pattern(cfg.get("rank_pattern"), "rank_pattern", problems, integer=True)
    _pattern(cfg.get("alpha_pattern"), "alpha_pattern", problems, integer=False)
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) and i >= 0 for i in layers)):
        problems.append(f"layers_to_transform must be a layer index or a list of them, got {str(layers)[:60]}")
        layers = None
    pattern = cfg.get("layers_pattern")
    patterns: tuple[Any, ...] = (pattern,) if isinstance(pattern, str) and pattern else ()
    if isinstance(pattern, list):
        patterns = tuple(pattern)
    for p in patterns:
        if not isinstance(p, str) or (problem := _regex_problem(p)):
            problems.append(f"layers_pattern {str(p)[:40]!r} {problem or 'must be a string'}")
    if problems:
        return None, [("bad_config", p) for p in problems]
    assert isinstance(r, int) and isinstance(alpha, (int, float))  # checked above, for the type checker
    return LoraSettings(
        r=r, alpha=float(alpha), dropout=float(dropout), targets=targets, exclude=exclude,
        rank_pattern=rank_pattern, modules_to_save=tuple(modules_to_save),  # type: ignore[arg-type]
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=tuple(p for p in patterns if isinstance(p, str)),
        use_dora=cfg.get("use_dora") is True, lora_bias=cfg.get("lora_bias") is True,
    ), []


def _pattern(value: Any, field_name: str, problems: list[str], *, integer: bool) -> dict[str, Any]:
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        problems.append(f"{field_name} must map module names to values, got a {type(value).__name__}")
        return {}
    for key, v in value.items():
        if problem := _regex_problem(key):
            problems.append(f"{field_name} key {key[:40]!r} {problem}")
        good = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
        if isinstance(v, bool) or not good or v <= 0:
            kind = "integer" if integer else "number"
            problems.append(f"{field_name}[{key[:40]!r}] must be a positive {kind}, got {str(v)[:40]}")
    return dict(value)
