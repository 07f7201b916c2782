"""adapter_config.json for the inspector: validated, and matched against module names the way PEFT matches.

Torch-free. :class:`LoraSettings` mirrors the parts of peft's ``LoraConfig`` that
decide which modules carry LoRA and with which rank (``target_modules``,
``exclude_modules``, ``modules_to_save``, ``layers_to_transform``/``layers_pattern``,
``rank_pattern``); a test checks it against peft's own matcher.

The config comes from an untrusted folder, and its regexes run on every module
name. A regex with a nested quantifier (``(a+)+``), the classic
catastrophic-backtracking shape, or with many repetitions, is refused instead of
run; the rest run on the ``regex`` engine, which can time out, within one time
budget per inspection (:func:`regex_budget`): a pattern that backtracks past it
(``.{0,1000}`` repeated, then a letter the names lack) is a :class:`RegexTimeout`,
which the inspector reports as a ``bad_config`` finding.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import regex

from ..errors import RegexTimeout
from ..escape import excerpt

#: Longest regex accepted in target_modules, exclude_modules or a pattern key.
MAX_REGEX_CHARS = 1000
#: Unbounded repetitions (``*``, ``+``, ``{n,}``) accepted in one regex.
MAX_UNBOUNDED = 4
#: Entries of modules_to_save, and rank_pattern keys that are regexes: each is tried
#: on every module name, so their number multiplies the work.
MAX_SCANNED_PATTERNS = 256
#: Largest rank accepted; real ones are at most a few thousand.
MAX_RANK = 1 << 20

# Python's re cannot time out, and the regexes and the module names they run on both
# come from the folder under inspection. A repeated group ("(a+)+", "(a|a)*") can
# backtrack exponentially; many unbounded repetitions (".*a.*b.*c.*d.*e") polynomially.
# Both are refused; module names are capped in length by the header reader.
_REPEATED_GROUP = re.compile(r"\)(?:[*+]|\{)")
# Repetitions that can each take many lengths: '*', '+', '{n,}' and '{m,n}' with n over 16.
_UNBOUNDED = re.compile(r"(?<!\\)(?:[*+]|\{\d*,\}|\{\d*,(?:1[7-9]|[2-9]\d|\d{3,})\})")
#: Seconds all the regex matching of one inspection may take together.
REGEX_BUDGET_S = 5.0
# How PEFT embeds a pattern key and a layers_pattern into a bigger regex; they are
# checked embedded, since a key that compiles alone may not ("(?i)x", "(?P<idx>.)").
RANK_KEY_REGEX = r"(.*\.)?({})$"
LAYERS_REGEX = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."
# A rank_pattern key of plain name parts is looked up, not run as a regex.
_LITERAL_KEY = re.compile(r"[\w-]+(?:\.[\w-]+)*")


def _timeout(pattern: str, budget: float) -> RegexTimeout:
    return RegexTimeout(f"the regex {excerpt(pattern, 60)} takes longer than {budget:g} s to match the module names "
                        "(it backtracks); list the module names instead")


_deadline: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("_deadline", default=None)


@contextlib.contextmanager
def regex_budget(seconds: float | None = None) -> Iterator[None]:
    """All matches inside share ``seconds`` (default :data:`REGEX_BUDGET_S`); past it they raise :class:`RegexTimeout`."""
    budget = REGEX_BUDGET_S if seconds is None else seconds
    token = _deadline.set((time.monotonic() + budget, budget))
    try:
        yield
    finally:
        _deadline.reset(token)


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> Any:
    return regex.compile(pattern, flags=regex.V0)


def _bounded(how: str, pattern: str, text: str) -> Any:
    """``regex``'s ``match`` or ``fullmatch`` of ``pattern`` on ``text`` within what is left of the budget."""
    deadline, budget = _deadline.get() or (time.monotonic() + REGEX_BUDGET_S, REGEX_BUDGET_S)
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timeout(pattern, budget)
    try:
        return getattr(_compiled(pattern), how)(text, timeout=left)
    except TimeoutError:
        raise _timeout(pattern, budget) from None


def dot_suffixes(name: str) -> list[str]:
    """``name`` and each tail of it that starts after a dot.

    ``name == t or name.endswith("." + t)`` (how PEFT matches a listed target)
    holds exactly when ``t`` is one of these, so a set lookup replaces a scan of
    the list: an expanded all-linear list of a large MoE holds thousands of names.
    """
    out = [name]
    dot = name.find(".")
    while dot != -1:
        out.append(name[dot + 1 :])
        dot = name.find(".", dot + 1)
    return out


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
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """What PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilised LoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_of(self, module: str) -> int:
        """The rank PEFT gives ``module``: that of the first rank_pattern key (in order) matching it, else r.

        PEFT runs every key as ``(.*\\.)?(key)$``; for a key of plain name parts that
        is a dot-suffix lookup.
        """
        literal, regexes = self._rank_keys
        best: tuple[int, int] | None = None
        for tail in dot_suffixes(module):
            if (hit := literal.get(tail)) is not None and (best is None or hit < best):
                best = hit
        for index, key, rank in regexes:
            if best is not None and index > best[0]:
                break
            if _bounded("match", RANK_KEY_REGEX.replace("{}", key), module):
                best = (index, rank)
                break
        return self.r if best is None else best[1]

    @cached_property
    def _rank_keys(self) -> tuple[dict[str, tuple[int, int]], list[tuple[int, str, int]]]:
        literal: dict[str, tuple[int, int]] = {}
        regexes: list[tuple[int, str, int]] = []
        for index, (key, rank) in enumerate(self.rank_pattern.items()):
            if _LITERAL_KEY.fullmatch(key):
                literal.setdefault(key, (index, rank))
            else:
                regexes.append((index, key, rank))
        return literal, regexes

    def is_saved_copy(self, module: str) -> bool:
        """Whether ``module`` is (inside) a modules_to_save entry; PEFT never puts LoRA there."""
        padded = f".{module}."
        return any(f".{m}." in padded for m in self.modules_to_save)

    def targets_module(self, module: str, all_linear: frozenset[str] | None = None) -> bool:
        """Whether PEFT puts LoRA on ``module`` (mirrors peft's ``check_target_module_exists``).

        ``all_linear`` is what "all-linear" expands to on the base; without a base,
        every module but the output layer (``lm_head``) counts.
        """
        if self.exclude is not None and self._excluded(module):
            return False
        if self.is_saved_copy(module) or self.targets is None:
            return False
        if self.targets == "all-linear":
            return module in all_linear if all_linear is not None else module.split(".")[-1] != "lm_head"
        if isinstance(self.targets, str):
            return _bounded("fullmatch", self.targets, module) is not None
        targets = self._target_set
        if module in targets:
            return True  # a name listed in full is taken as is, whatever layers_to_transform says
        if not any(tail in targets for tail in dot_suffixes(module)[1:]):
            return False
        return self.layers_to_transform is None or self._layer_index(module) in self.layers_to_transform

    @cached_property
    def _target_set(self) -> frozenset[str]:
        return frozenset(self.targets) if isinstance(self.targets, tuple) else frozenset()

    def _excluded(self, module: str) -> bool:
        if isinstance(self.exclude, str):
            return _bounded("fullmatch", self.exclude, module) is not None
        excluded = frozenset(self.exclude or ())
        return any(tail in excluded for tail in dot_suffixes(module))

    def _layer_index(self, module: str) -> int | None:
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
            return int(match.group("idx")) if match else None
        for pattern in self.layers_pattern:
            match = _bounded("match", LAYERS_REGEX.replace("{}", pattern), module)
            if match:
                return int(match.group("idx"))
        return None


def _regex_problem(pattern: str, embed: str = "{}") -> str | None:
    if len(pattern) > MAX_REGEX_CHARS:
        return f"is a {len(pattern)}-character regex; at most {MAX_REGEX_CHARS} are accepted"
    if _REPEATED_GROUP.search(pattern):
        return ("repeats a group, as in '(a+)+', which can take exponential time to match; "
                "list the module names instead")
    if (n := len(_UNBOUNDED.findall(pattern))) > MAX_UNBOUNDED:
        return (f"has {n} unbounded repetitions (at most {MAX_UNBOUNDED}), which can take very long to match; "
                "list the module names instead")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "possible nested set" and the like: meaning that will change
            re.compile(embed.replace("{}", pattern))  # as PEFT will compile it
            _compiled(embed.replace("{}", pattern))  # as loraq matches it
    except (re.error, regex.error, RecursionError, OverflowError, Warning) as exc:
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
    r, dropout = cfg.get("r"), cfg.get("lora_dropout", 0.0)
    if not _is_rank(r):
        problems.append(f"r must be a positive integer up to {MAX_RANK:,}, got {str(r)[:40]}")
    if (alpha := _positive_float(cfg.get("lora_alpha"))) is None:
        problems.append(f"lora_alpha must be a positive number, got {str(cfg.get('lora_alpha'))[:40]}")
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        problems.append(f"lora_dropout must be in [0, 1), got {str(dropout)[:40]}")
    targets = _names(cfg.get("target_modules"), "target_modules", problems, allow_regex=True)
    if targets is None and not cfg.get("target_parameters") and "target_modules" not in " ".join(problems):
        problems.append("target_modules is missing; PEFT would not know which modules the weights belong to")
    exclude = _names(cfg.get("exclude_modules"), "exclude_modules", problems, allow_regex=True)
    modules_to_save = _names(cfg.get("modules_to_save"), "modules_to_save", problems, allow_regex=False) or ()
    if len(modules_to_save) > MAX_SCANNED_PATTERNS:
        problems.append(f"modules_to_save lists {len(modules_to_save):,} modules (at most {MAX_SCANNED_PATTERNS}); "
                        "that many full copies is not a LoRA adapter")
    rank_pattern = _pattern(cfg.get("rank_pattern"), "rank_pattern", problems, integer=True)
    _pattern(cfg.get("alpha_pattern"), "alpha_pattern", problems, integer=False)
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) and i >= 0 for i in layers)):
        problems.append(f"layers_to_transform must be a layer index or a list of them, got {str(layers)[:60]}")
        layers = None
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag) not in (None, True, False):
            problems.append(f"{flag} must be true or false, got {str(cfg.get(flag))[:40]}")
    pattern = cfg.get("layers_pattern")
    patterns: tuple[Any, ...] = (pattern,) if isinstance(pattern, str) and pattern else ()
    if isinstance(pattern, list):
        patterns = tuple(pattern)
    for p in patterns:
        problem = _regex_problem(p, LAYERS_REGEX) if isinstance(p, str) and p else "must be a non-empty string"
        if problem:
            problems.append(f"layers_pattern {str(p)[:40]!r} {problem}")
    if problems:
        return None, [("bad_config", p) for p in problems]
    assert isinstance(r, int) and alpha is not None  # checked above, for the type checker
    return LoraSettings(
        r=r, alpha=alpha, dropout=float(dropout), targets=targets, exclude=exclude,
        rank_pattern=rank_pattern, modules_to_save=tuple(modules_to_save),
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=tuple(p for p in patterns if isinstance(p, str)),
        use_dora=cfg.get("use_dora") is True, lora_bias=cfg.get("lora_bias") is True,
        use_rslora=cfg.get("use_rslora") is True,
    ), []


def _pattern(value: Any, field_name: str, problems: list[str], *, integer: bool) -> dict[str, Any]:
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        problems.append(f"{field_name} must map module names to values, got a {type(value).__name__}")
        return {}
    regexes = 0
    for key, v in value.items():
        if _LITERAL_KEY.fullmatch(key):
            pass
        elif problem := _regex_problem(key, RANK_KEY_REGEX):
            problems.append(f"{field_name} key {key[:40]!r} {problem}")
        else:
            regexes += 1
        if not (_is_rank(v) if integer else _positive_float(v) is not None):
            kind = f"integer up to {MAX_RANK:,}" if integer else "number"
            problems.append(f"{field_name}[{key[:40]!r}] must be a positive {kind}, got {str(v)[:40]}")
    if regexes > MAX_SCANNED_PATTERNS:
        problems.append(f"{field_name} has {regexes:,} regex keys (at most {MAX_SCANNED_PATTERNS}); "
                        "use module names")
    return dict(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_RANK


def _positive_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer too big for a float
        return None
    return number if math.isfinite(number) and number > 0 else None
