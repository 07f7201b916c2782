"""Submit-time dataset analysis: every row of every job, checked with the base model's own tokenizer.

``loraq submit`` calls :func:`analyze_queue` before anything is enqueued. For each
job it reads and checks every row (:mod:`loraq.data`), splits train from eval as
the trainer will, renders and tokenises every row with the base model's tokenizer
and chat template, and finds what would otherwise surface mid-run or never:

- errors: rows that break a format rule, rows the chat template cannot render,
  rows left with no trainable token after truncation to ``max_seq_len`` (the
  trainer would silently drop them), too few rows to split, a tokenizer that
  cannot be loaded;
- warnings: truncated rows, duplicate rows, eval rows that also train, special
  token text inside rows, tiny train or eval sets, ``max_steps`` short of an epoch.

Tokenising is the expensive step, so it happens once per dataset file and
tokenizer: a :class:`FileProfile` (per-row token counts and first trained token)
is kept in memory (:class:`TokenCache`) and on disk under the home, keyed by the
file's sha256, the tokenizer's fingerprint and the format. Any ``max_seq_len`` is
answered from the same profile.

The module imports neither torch nor transformers until a tokenizer is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from .. import data, fsutil
from ..data import Dataset, ProblemList, RowProblem
from ..errors import DataError, Problem, TemplateBudgetError
from ..escape import printable
from ..queue import auto
from ..queue.spec import Queue, ResolvedJob, TrainingSpec
from ..sandbox import Roots, model_folder
from . import packing

#: Bump when what a profile holds, or how rows are rendered, changes: old cache files are then ignored.
ANALYSIS_VERSION = 1
CHUNK_ROWS = 4096  # rows rendered and tokenised per batch: bounds memory on large files
FEW_TRAIN_ROWS = 10  # the OpenAI fine-tuning API's minimum
FEW_EVAL_ROWS = 10

TokenizerLoader = Callable[[ResolvedJob], Any]


# ---------------------------------------------------------------- profiles and their cache


@dataclass(frozen=True)
class FileProfile:
    """What the token checks need from one dataset file under one tokenizer, at any max_seq_len."""

    # arrays, not lists: a profile of a million rows stays a few tens of MB in the cache
    lengths: array[int]  # tokens per row, before truncation
    first_label: array[int]  # index of each row's first trained token; -1: none, or the template failed
    keys: array[int]  # a 64-bit hash of each row's trained content, for duplicates and eval leaks
    template_errors: dict[int, str] = field(default_factory=dict)  # row index -> why it cannot be rendered
    special_rows: list[int] = field(default_factory=list)  # rows whose own text holds a special token's text
    special_example: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version": ANALYSIS_VERSION, "lengths": self.lengths.tolist(), "first_label": self.first_label.tolist(),
                "keys": self.keys.tolist(), "template_errors": {str(k): v for k, v in self.template_errors.items()},
                "special_rows": self.special_rows, "special_example": self.special_example}

    @classmethod
    def from_json(cls, doc: Any, rows: int) -> FileProfile | None:
        """The profile in ``doc``, or None when it is from another version or does not fit ``rows``."""
        try:
            if doc["version"] != ANALYSIS_VERSION:
                return None
            profile = cls(lengths=array("q", doc["lengths"]), first_label=array("q", doc["first_label"]),
                          keys=array("Q", doc["keys"]),
                          template_errors={int(k): str(v) for k, v in doc["template_errors"].items()},
                          special_rows=list(doc["special_rows"]), special_example=str(doc["special_example"]))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            return None
        if not len(profile.lengths) == len(profile.first_label) == len(profile.keys) == rows:
            return None
        return profile

    @cached_property
    def stats(self) -> TokenStats:
        return TokenStats.of(self.lengths)

    @cached_property
    def duplicates(self) -> list[tuple[int, int]]:
        """``(row, earlier row with the same content)`` for every repeat."""
        first: dict[int, int] = {}
        repeats = []
        for index, key in enumerate(self.keys):
            if key in first:
                repeats.append((index, first[key]))
            else:
                first[key] = index
        return repeats


def content_key(payload: str) -> int:
    """A 64-bit hash of ``payload`` (a row's rendered text and loss spans): rows equal here are duplicates."""
    return int.from_bytes(hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _row_texts(row: dict[str, Any], fmt: str) -> list[str]:
    if fmt == "chat":
        return [m["content"] for m in row["messages"]]
    return [row[k] for k in (*data.FORMAT_KEYS[fmt], "input") if isinstance(row.get(k), str)]


def _special_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and t}, key=len,
                      reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def profile_dataset(dataset: Dataset, tokenizer: Any, chat_template: str | None = None) -> FileProfile:
    """Render and tokenise every row in batches (with the job's ``chat_template`` if it names one).

    Raises TemplateError when a chat file meets no template.
    """
    n = len(dataset.rows)
    lengths, firsts = array("q", [0]) * n, array("q", [-1]) * n
    keys = array("Q", [0]) * n
    errors: dict[int, str] = {}
    for start in range(0, n, CHUNK_ROWS):
        rendered = data.render_many(dataset.rows[start:start + CHUNK_ROWS], dataset.format, tokenizer, chat_template)
        good = [(start + i, item) for i, item in enumerate(rendered) if isinstance(item, data.Rendered)]
        for i, item in enumerate(rendered):
            if isinstance(item, data.TemplateError):
                errors[start + i] = str(item)
                # keyed by its file and position: a row that cannot be rendered duplicates nothing
                keys[start + i] = content_key(f"unrendered\x00{dataset.sha256}\x00{start + i}")
        if not good:
            continue
        texts = [item.text for _, item in good]
        for (index, item), tokens in zip(good, data.tokenize_many(tokenizer, texts, good[0][1].add_special_tokens),
                                         strict=True):
            lengths[index] = len(tokens)
            firsts[index] = data.first_label(tokens, item.spans)
            keys[index] = content_key(f"{item.text}\x00{item.spans}")
    special_rows: list[int] = []
    example = ""
    pattern = _special_pattern(tokenizer)
    if pattern is not None:
        for index, row in enumerate(dataset.rows):
            for text in _row_texts(row, dataset.format):
                if found := pattern.search(text):
                    special_rows.append(index)
                    example = example or found.group()
                    break
    return FileProfile(lengths=lengths, first_label=firsts, keys=keys,
                       template_errors=errors, special_rows=special_rows, special_example=example)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how rows tokenise: vocabulary, rules, template, versions."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    versions = {name: getattr(sys.modules.get(name), "__version__", "") for name in ("transformers", "tokenizers")}
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())),
        json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str),
        json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
        json.dumps(sorted(getattr(tokenizer, "all_special_tokens", []))),
        str(getattr(tokenizer, "split_special_tokens", False)),
        json.dumps(versions, sort_keys=True),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


class TokenCache:
    """File profiles in memory (a small LRU) and on disk, keyed by file content, tokenizer and format.

    ``tokenisations`` counts the files actually tokenised, the expensive step: a
    queue of 50 jobs on one dataset and one base model adds 1. Safe to share
    between threads; one lock also keeps two submits from tokenising one file twice.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._lock = threading.RLock()
        self._profiles: OrderedDict[str, FileProfile] = OrderedDict()
        # id(tokenizer) -> (tokenizer, fingerprint); the tokenizer is held so that its id stays its own
        self._fingerprints: OrderedDict[int, tuple[Any, str]] = OrderedDict()
        self.tokenisations = 0
        self.memory_hits = 0
        self.disk_hits = 0
        self.disk_errors = 0  # cache files that could not be written (the analysis is still complete)

    def fingerprint(self, tokenizer: Any) -> str:
        with self._lock:
            held = self._fingerprints.get(id(tokenizer))
            if held is None or held[0] is not tokenizer:
                held = (tokenizer, tokenizer_fingerprint(tokenizer))
                self._fingerprints[id(tokenizer)] = held
                while len(self._fingerprints) > self.capacity:
                    self._fingerprints.popitem(last=False)
            return held[1]

    def key(self, dataset: Dataset, tokenizer: Any, chat_template: str | None = None) -> str:
        mixed = f"{ANALYSIS_VERSION}|{dataset.format}|{self.fingerprint(tokenizer)}"
        if chat_template is not None and dataset.format == "chat":  # a job's own template renders other text
            mixed += "|" + hashlib.sha256(chat_template.encode("utf-8")).hexdigest()
        return f"{dataset.sha256}-{hashlib.sha256(mixed.encode()).hexdigest()[:16]}"

    def profile(self, dataset: Dataset, tokenizer: Any, directory: Path | None = None,
                chat_template: str | None = None,
                deferred: list[tuple[Path, FileProfile]] | None = None) -> FileProfile:
        """The file's profile; a new one is written under ``directory``, or appended to ``deferred``
        to be written by :func:`write_profiles` once the caller knows it wants it on disk."""
        with self._lock:
            return self._profile(dataset, tokenizer, directory, chat_template, deferred)

    def _profile(self, dataset: Dataset, tokenizer: Any, directory: Path | None,
                 chat_template: str | None = None,
                 deferred: list[tuple[Path, FileProfile]] | None = None) -> FileProfile:
        key = self.key(dataset, tokenizer, chat_template)
        if key in self._profiles:
            self.memory_hits += 1
            self._profiles.move_to_end(key)
            return self._profiles[key]
        profile = self._read(directory / f"{key}.json", len(dataset.rows)) if directory else None
        if profile is not None:
            self.disk_hits += 1
        else:
            profile = profile_dataset(dataset, tokenizer, chat_template)
            self.tokenisations += 1
            if directory is not None and deferred is not None:
                deferred.append((directory / f"{key}.json", profile))
            elif directory is not None and not write_profiles([(directory / f"{key}.json", profile)]):
                self.disk_errors += 1
        self._profiles[key] = profile
        while len(self._profiles) > self.capacity:
            self._profiles.popitem(last=False)
        return profile

    @staticmethod
    def _read(path: Path, rows: int) -> FileProfile | None:
        try:
            return FileProfile.from_json(json.loads(path.read_text(encoding="utf-8")), rows)
        except (OSError, ValueError):
            return None  # absent or damaged: tokenise again and overwrite it


def write_profiles(pending: Sequence[tuple[Path, FileProfile]]) -> bool:
    """Write profiles to the disk cache; ``False`` if any could not be (the analysis stands anyway)."""
    ok = True
    for path, profile in pending:
        try:
            fsutil.atomic_write_text(path, json.dumps(profile.to_json(), separators=(",", ":")))
        except OSError:
            ok = False
    return ok


#: The process's cache: a long-lived process (the API) keeps profiles across submits.
DEFAULT_CACHE = TokenCache()


def cache_dir_of(home_root: Path) -> Path:
    """Where profiles live on disk: ``<home>/cache/datasets``."""
    return home_root / "cache" / "datasets"


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class TokenStats:
    mean: float
    p95: int
    max: int
    total: int

    @classmethod
    def of(cls, lengths: Sequence[int]) -> TokenStats:
        if not lengths:
            return cls(0.0, 0, 0, 0)
        ordered = sorted(lengths)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
        return cls(round(sum(ordered) / len(ordered), 1), p95, ordered[-1], sum(ordered))


@dataclass(frozen=True)
class DatasetReport:
    """What submit learned about one job's data; ``to_json`` is what manifests and reports keep."""

    job: str
    path: str
    format: str
    sha256: str
    rows: int
    n_train: int
    n_eval: int
    eval_source: str  # "split" (validation.split of the dataset) | "file" (validation.dataset)
    eval_path: str | None
    eval_sha256: str | None
    base_model: str  # whose tokenizer counted the tokens
    max_seq_len: int
    tokens: TokenStats  # per row of the dataset file, before truncation
    truncated_rows: int  # rows of the dataset (and eval) file longer than max_seq_len
    untrainable_rows: int  # rows with no trainable token after truncation: errors
    duplicate_rows: int
    est_steps: int
    est_epochs: float
    warnings: tuple[str, ...] = ()
    auto: dict[str, Any] | None = None  # what each `auto` setting was resolved to, and why (queue/auto.py)
    chat_template: str | None = None  # the job's own chat template (its name or file), if it names one
    # how the rows are batched: packed or padded, micro-batches, tokens laid out against padding (data/packing.py)
    batches: dict[str, Any] | None = None
    bytes: int | None = None  # the dataset file's size, as checked (the trainer refuses another size unread)
    eval_bytes: int | None = None
    tokenizer: str = "transformers"  # what counted the tokens: tokenizers (torch-free) | transformers
    pairs: dict[str, Any] | None = None  # a preference job's pairs: counts, both sides' tokens (data/pair_check.py)

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["warnings"] = list(self.warnings)
        return doc


def problems_to_json(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Problems as JSON objects, with ``category`` (None for problems outside datasets)."""
    return [p.to_json() if isinstance(p, RowProblem) else {"where": p.where, "category": None, "message": p.message}
            for p in problems]


# ---------------------------------------------------------------- analysis


def load_tokenizer(job: ResolvedJob, roots: Roots | None = None) -> Any:
    """The job's base-model tokenizer: a local folder, or a hub id already in the local cache (no download).

    Loaded from the checked folder (:func:`loraq.sandbox.model_folder`), never by a
    name transformers would look up in the working directory. Torch-free where the base
    has a ``tokenizer.json`` (:class:`.tokenizer.FolderTokenizer`, which the trainer
    checks against transformers on a sample of the job's rows); through transformers
    otherwise, or for a base with ``trust_remote_code`` (its tokenizer may be code).
    """
    from . import tokenizer as light

    if roots is None:
        roots = Roots.of([job.base_model] if Path(job.base_model).is_absolute() else [])
    folder = model_folder(job.base_model, roots, revision=job.spec.revision)
    if not job.spec.trust_remote_code and not light.disabled() and (folder / "tokenizer.json").is_file():
        return light.FolderTokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                         trust_remote_code=job.spec.trust_remote_code)


def loaded_by(tokenizer: Any) -> str:
    """``tokenizers`` for a torch-free :class:`.tokenizer.FolderTokenizer`, else ``transformers``."""
    from .tokenizer import FolderTokenizer

    return "tokenizers" if isinstance(tokenizer, FolderTokenizer) else "transformers"


def _problem(where: str, category: str, message: str) -> RowProblem:
    return RowProblem(where, f"[{category}] {message}", category=category)


class _Run:
    """One analysis: each tokenizer loaded once, each file read once, a shared file's problems listed once.

    Whatever depends only on a file (and a split, or a max_seq_len) is computed once
    per run, so each job after the first costs next to nothing.
    """

    def __init__(self, loader: TokenizerLoader | None, cache_dir: Path | None, cache: TokenCache | None,
                 roots: Roots | None = None, limits: data.ReadLimits = data.DEFAULT_LIMITS,
                 deferred: list[tuple[Path, FileProfile]] | None = None) -> None:
        self.loader = loader or partial(load_tokenizer, roots=roots)
        self.cache_dir = cache_dir
        self.cache = cache if cache is not None else DEFAULT_CACHE
        self.roots, self.limits, self.deferred = roots, limits, deferred
        self._memo: dict[tuple[Any, ...], Any] = {}
        self._reported: dict[tuple[Any, ...], str] = {}

    def memo(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def tokenizer(self, job: ResolvedJob) -> tuple[Any, RowProblem | None]:
        return self.memo(("tokenizer", job.base_model, job.spec.revision, job.spec.trust_remote_code),  # type: ignore[no-any-return]
                         lambda: self._load(job))

    def _load(self, job: ResolvedJob) -> tuple[Any, RowProblem | None]:
        try:
            tokenizer = self.loader(job)
        except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError, ...
            reason = printable((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:300]
            return None, _problem("base_model", "tokenizer",
                                  f"cannot load the tokenizer of base_model {job.base_model!r}: {reason}")
        if not getattr(tokenizer, "is_fast", False):
            return None, _problem("base_model", "tokenizer", f"the tokenizer of {job.base_model!r} is not a fast "
                                  "(Rust) tokenizer; loraq needs its character offsets to mask the loss")
        return tokenizer, None

    def dataset(self, path: str, fmt: str | None) -> tuple[Dataset | None, ProblemList]:
        return self.memo(("dataset", path, fmt),  # type: ignore[no-any-return]
                         lambda: data.check_dataset(path, fmt, roots=self.roots, limits=self.limits))

    def profile(self, dataset: Dataset, tokenizer: Any, chat_template: str | None = None) -> FileProfile:
        template = chat_template if dataset.format == "chat" else None
        # A template that ran past its budget (data/budget.py) once runs past it again: it is not rendered
        # again for another file or job of this submit (each try costs the whole time budget).
        runaway = self._memo.get(("runaway", template, id(tokenizer)))
        if runaway is not None:
            raise runaway
        try:
            return self.memo(("profile", dataset.path, dataset.format, id(tokenizer), template),  # type: ignore[no-any-return]
                             lambda: self.cache.profile(dataset, tokenizer, self.cache_dir, template, self.deferred))
        except TemplateBudgetError as exc:
            self._memo[("runaway", template, id(tokenizer))] = exc
            raise

    def once(self, key: tuple[Any, ...], job: str, problems: list[Problem], shared: str) -> list[Problem]:
        """``problems`` the first time; for a later job, one line pointing at the job they were listed for."""
        if not problems:
            return []
        if key not in self._reported:
            self._reported[key] = job
            return problems
        return [_problem(problems[0].where if shared == "base model" else str(key[1]), "repeated",
                         f"the same problem(s) as listed for job {self._reported[key]!r}, "
                         f"which uses this {shared} too")]


def _token_problems(dataset: Dataset, profile: FileProfile, max_seq_len: int,
                    template: str | None = None) -> ProblemList:
    """The rows that cannot train; ``template`` names the job's chat_template in a row it cannot render."""
    out = ProblemList(dataset.path, dataset.kind)
    bad = [i for i, first in enumerate(profile.first_label) if first < 0 or first >= max_seq_len]
    for index in bad:
        line, record = dataset.locate(index)
        first = profile.first_label[index]
        if index in profile.template_errors:
            why = profile.template_errors[index]
            if template is not None:
                why = why.replace("the chat template", f"chat_template {template!r}", 1)
            out.add("template_error", why, line=line, row=record)
        elif first < 0:
            out.add("untrainable", "no token to train on: the trained part renders to no token", line=line, row=record)
        else:
            out.add("untrainable", f"no token left to train on after truncation to max_seq_len {max_seq_len}: the "
                    f"row has {profile.lengths[index]} tokens and its first trained token is number {first + 1}; "
                    "raise training.max_seq_len or shorten the prompt", line=line, row=record)
    return out


def _where(dataset: Dataset, index: int) -> str:
    return data.where_in(dataset.path, dataset.kind, *dataset.locate(index))


def _truncation(label: str, dataset: Dataset, profile: FileProfile, max_seq_len: int) -> tuple[int, str | None]:
    """How many rows are cut at ``max_seq_len``, and the warning that says so."""
    over = [i for i, n in enumerate(profile.lengths) if n > max_seq_len]
    if not over:
        return 0, None
    longest = max(over, key=profile.lengths.__getitem__)
    share = 100 * len(over) / len(profile.lengths)
    return len(over), (f"{label}{len(over)} of {len(profile.lengths)} rows ({share:.1f}%)"
                       f" are longer than max_seq_len {max_seq_len} tokens and will be cut (longest: "
                       f"{profile.lengths[longest]} tokens, {_where(dataset, longest)})")


def _leaked(profile: FileProfile, eval_profile: FileProfile | None, train_idx: list[int], eval_idx: list[int]) -> int:
    """Eval rows whose content is also trained on."""
    if eval_profile is not None:
        train_keys = set(profile.keys)
        return sum(1 for k in eval_profile.keys if k in train_keys)
    train_keys = {profile.keys[i] for i in train_idx}
    return sum(1 for i in eval_idx if profile.keys[i] in train_keys)


def _analyze(job: ResolvedJob, run: _Run) -> tuple[DatasetReport | None, list[Problem]]:
    spec, training = job.spec, job.spec.training
    max_seq_len = training.max_seq_len
    problems: list[Problem] = []
    train, found = run.dataset(job.dataset_path, spec.dataset.format)
    problems += run.once(("rows", job.dataset_path, spec.dataset.format), job.name, found.problems(), "file")
    eval_set = None
    if job.eval_dataset_path:
        eval_format = spec.dataset.format or (train.format if train else None)
        eval_set, found = run.dataset(job.eval_dataset_path, eval_format)
        problems += run.once(("rows", job.eval_dataset_path, eval_format), job.name, found.problems(), "file")
    if train is None:
        return None, problems
    if spec.preference is not None or train.format in data.PREFERENCE_FORMATS:  # pairs (issue 23)
        return _analyze_pairs(job, run, train, eval_set, problems)
    if spec.validation.measured and train.format == "text":
        where = "validation.metrics" if spec.validation.metrics else "validation.judge"
        problems.append(Problem(where, f"{spec.validation.measured[0]} compares a generated answer with each row's; a "
                                "text dataset has no prompt and answer (use chat, prompt_completion or alpaca)"))

    split: tuple[Any, ...] = ("file", job.eval_dataset_path)
    if job.eval_dataset_path:
        train_idx, eval_idx = list(range(len(train))), []
        n_eval = len(eval_set) if eval_set else 0
    else:
        try:
            data.check_split(train.path, len(train), spec.validation.split)
        except DataError as exc:
            problems += exc.problems
        split = (len(train), spec.validation.split, training.seed)
        train_idx, eval_idx = run.memo(("split", *split), lambda: data.split_indices(*split))
        n_eval = len(eval_idx)

    if spec.chat_template is not None and job.chat_template_text is None and train.format == "chat":
        return None, problems  # the template could not be loaded (templates.resolve_queue_templates said why)
    tokenizer, problem = run.tokenizer(job)
    base_key = ("base", job.base_model, spec.revision, spec.trust_remote_code)
    if problem is not None:
        return None, problems + run.once(base_key, job.name, [problem], "base model")
    template = job.chat_template_text
    try:
        profile = run.profile(train, tokenizer, template)
        eval_profile = run.profile(eval_set, tokenizer, template) if eval_set else None
    except TemplateBudgetError as exc:  # the template ran away (data/budget.py): named, in one line
        named = (f"chat_template {spec.chat_template!r}" if spec.chat_template is not None
                 else f"base model {job.base_model!r}: its chat template")
        runaway = _problem("chat_template", "template_budget", str(exc).replace("the chat template", named, 1))
        return None, problems + run.once(("budget", named, template, base_key), job.name, [runaway], "chat template")
    except data.TemplateError as exc:  # no template at all: the job's chat_template is what fixes it
        no_template = _problem("chat_template", "template_error", f"base model {job.base_model!r}: {exc}")
        return None, problems + run.once(base_key, job.name, [no_template], "base model")

    warnings: list[str] = []
    untrainable = truncated = 0
    for label, dataset, file_profile in (("", train, profile), ("eval file: ", eval_set, eval_profile)):
        if dataset is None or file_profile is None:
            continue
        found = run.memo(("tokens", dataset.path, id(file_profile), max_seq_len, spec.chat_template),
                         partial(_token_problems, dataset, file_profile, max_seq_len, spec.chat_template))
        untrainable += found.count
        problems += run.once(("tokens", str(dataset.path), dataset.format, id(tokenizer), max_seq_len,
                              template if dataset.format == "chat" else None), job.name,
                             found.problems(), "file")
        cut, warning = run.memo(("cut", label, dataset.path, id(file_profile), max_seq_len),
                                partial(_truncation, label, dataset, file_profile, max_seq_len))
        truncated += cut
        warnings += [warning] if warning else []

    repeats = profile.duplicates
    if repeats:
        row, original = repeats[0]
        warnings.append(f"{len(repeats)} row(s) repeat an earlier row (e.g. {_where(train, row)} repeats line "
                        f"{train.locate(original)[0]})")
    leaked = run.memo(("leak", id(profile), id(eval_profile), *split),
                      lambda: _leaked(profile, eval_profile, train_idx, eval_idx))
    if leaked:
        warnings.append(f"{leaked} eval row(s) also appear among the training rows: the eval loss that gates "
                        "publishing will read better than it is")
    if template is not None and train.format == "chat":
        warnings += _template_warnings(spec.chat_template or "", template, tokenizer)
    if profile.special_rows:
        warnings.append(f"{len(profile.special_rows)} row(s) contain the text of a special token (e.g. "
                        f"{profile.special_example!r} at {_where(train, profile.special_rows[0])}); the tokenizer "
                        "reads it as that control token, not as text")

    n_train = len(train_idx)
    resolved = None
    if training.has_auto:  # from this data's rows and token lengths (queue/auto.py)
        values, resolved = auto.resolve(training.model_dump(mode="json"), n_train,
                                        min(profile.stats.p95, max_seq_len) or max_seq_len,
                                        grad_accum_given="grad_accum" in training.model_fields_set)
        spec = spec.model_copy(update={"training": TrainingSpec.model_validate(values)})
        training = spec.training
    # The trainer's own plan (data/packing.py) over the same token counts: the estimate is what runs.
    lengths = [min(profile.lengths[i], max_seq_len) for i in train_idx]
    plan = run.memo(("plan", id(profile), max_seq_len, *split, training.batch_size, training.grad_accum,
                     training.packing, training.seed),
                    lambda: packing.plan_train(lengths, batch_size=int(training.batch_size),
                                               grad_accum=training.grad_accum, packing=training.packing,
                                               seed=training.seed))
    per_epoch = max(1, plan.n_steps)
    steps = spec.total_steps(n_train, per_epoch)
    epochs = round(training.max_steps / per_epoch, 2) if training.max_steps else float(training.epochs)  # resolved above
    if n_train < FEW_TRAIN_ROWS:
        warnings.append(f"only {n_train} training row(s); fine-tuning usually needs at least {FEW_TRAIN_ROWS}")
    if 0 < n_eval < FEW_EVAL_ROWS:
        warnings.append(f"only {n_eval} eval row(s): the eval loss that gates publishing will be noisy")
    if training.max_steps and epochs < 1:
        warnings.append(f"max_steps {training.max_steps} covers {epochs:.2f} of an epoch: "
                        "some rows are never trained on")

    report = DatasetReport(
        job=job.name, path=str(train.path), format=train.format, sha256=train.sha256, rows=len(train),
        n_train=n_train, n_eval=n_eval, eval_source="file" if job.eval_dataset_path else "split",
        eval_path=job.eval_dataset_path, eval_sha256=eval_set.sha256 if eval_set else None,
        base_model=job.base_model, max_seq_len=max_seq_len, tokens=profile.stats,
        truncated_rows=truncated, untrainable_rows=untrainable, duplicate_rows=len(repeats),
        est_steps=steps, est_epochs=epochs, warnings=tuple(warnings), auto=resolved,
        chat_template=spec.chat_template if train.format == "chat" else None,
        batches=_batches(plan, lengths), tokenizer=loaded_by(tokenizer),
        bytes=train.size, eval_bytes=eval_set.size if eval_set else None,
    )
    return report, problems


def _analyze_pairs(job: ResolvedJob, run: _Run, train: Dataset, eval_set: Dataset | None,
                   problems: list[Problem]) -> tuple[DatasetReport | None, list[Problem]]:
    """A preference job's report (data/pair_check.py checks the pairs); steps counted padded, as it trains."""
    from .pair_check import analyze_pairs

    spec, training = job.spec, job.spec.training
    tokenizer, problem = run.tokenizer(job) if spec.preference is not None else (None, None)
    if problem is not None:
        return None, problems + [problem]
    template = job.chat_template_text
    try:
        found = analyze_pairs(job, train, eval_set, lambda side: profile_dataset(
            side, tokenizer, template if side.format == "chat" else None))
    except TemplateBudgetError as exc:
        return None, problems + [_problem("chat_template", "template_budget", str(exc))]
    except data.TemplateError as exc:
        return None, problems + [_problem("chat_template", "template_error", f"base model {job.base_model!r}: {exc}")]
    problems = problems + found.problems
    if not found.ok:
        return None, problems
    resolved = None
    if training.has_auto:  # a pair is two sequences in one micro-batch
        values, resolved = auto.resolve(training.model_dump(mode="json"), found.n_train,
                                        2 * (found.p95 or training.max_seq_len),
                                        grad_accum_given="grad_accum" in training.model_fields_set)
        spec = spec.model_copy(update={"training": TrainingSpec.model_validate(values)})
        training = spec.training
    per_epoch = spec.steps_per_epoch(found.n_train)
    steps = spec.total_steps(found.n_train, per_epoch)
    epochs = round(training.max_steps / per_epoch, 2) if training.max_steps else float(training.epochs)
    warnings = list(found.warnings)
    if found.n_train < FEW_TRAIN_ROWS:
        warnings.append(f"only {found.n_train} training pair(s); preference tuning usually needs many more")
    if 0 < found.n_eval < FEW_EVAL_ROWS:
        warnings.append(f"only {found.n_eval} eval pair(s): the eval loss and preference accuracy will be noisy")
    report = DatasetReport(
        job=job.name, path=str(train.path), format=train.format, sha256=train.sha256, rows=len(train),
        n_train=found.n_train, n_eval=found.n_eval, eval_source="file" if job.eval_dataset_path else "split",
        eval_path=job.eval_dataset_path, eval_sha256=eval_set.sha256 if eval_set else None,
        base_model=job.base_model, max_seq_len=training.max_seq_len, tokens=found.chosen_profile.stats,
        truncated_rows=found.truncated, untrainable_rows=found.untrainable, duplicate_rows=0,
        est_steps=steps, est_epochs=epochs, warnings=tuple(warnings), auto=resolved,
        chat_template=spec.chat_template if found.stats["format"] == "chat" else None,
        tokenizer=loaded_by(tokenizer), bytes=train.size, eval_bytes=eval_set.size if eval_set else None,
        pairs=found.stats,
    )
    return report, problems


def _template_warnings(name: str, template: str, tokenizer: Any) -> list[str]:
    """A built-in template's turn markers that the tokenizer lacks as tokens: trained as text pieces."""
    from .templates import BUILTIN, MARKERS

    if template != BUILTIN.get(name):
        return []
    vocab = tokenizer.get_vocab()
    missing = [marker for marker in MARKERS.get(name, ()) if marker not in vocab]
    if not missing:
        return []
    pieces = len(tokenizer(missing[0], add_special_tokens=False)["input_ids"])
    return [f"chat_template {name}: the tokenizer has no {' / '.join(missing)} token(s); the turn markers are "
            f"trained as plain text ({missing[0]} is {pieces} tokens), which works but costs tokens"]


def _for_job(job: ResolvedJob, problems: list[Problem]) -> list[Problem]:
    return [dataclasses.replace(p, where=f"job {job.name!r}: {p.where}") for p in problems]


def analyze_job(job: ResolvedJob, *, tokenizer_loader: TokenizerLoader | None = None, cache_dir: Path | None = None,
                cache: TokenCache | None = None) -> DatasetReport:
    """Analyse one job's data; raise :class:`DataError` listing every problem (each prefixed with the job)."""
    report, problems = _analyze(job, _Run(tokenizer_loader, cache_dir, cache))
    if problems:
        raise DataError(_for_job(job, problems))
    assert report is not None
    return report


def analyze_queue(queue: Queue, *, cache_dir: Path | None = None, tokenizer_loader: TokenizerLoader | None = None,
                  cache: TokenCache | None = None, roots: Roots | None = None,
                  limits: data.ReadLimits = data.DEFAULT_LIMITS,
                  deferred: list[tuple[Path, FileProfile]] | None = None,
                  ) -> tuple[dict[str, DatasetReport], list[Problem]]:
    """Analyse every job: ``(reports by job name, every problem of every job)``.

    Submit enqueues nothing unless the problem list is empty. A job whose data was
    read and tokenised has a report even when it has problems (``--dry-run`` shows
    both). Each tokenizer is loaded once and each dataset file tokenised once.
    Datasets are read inside ``roots`` within ``limits``; with ``deferred``, new
    profiles for the disk cache are collected there instead of written (a submit
    that is refused writes nothing into the home).
    """
    run = _Run(tokenizer_loader, cache_dir, cache, roots, limits, deferred)
    reports: dict[str, DatasetReport] = {}
    problems: list[Problem] = []
    for job in queue.jobs:
        report, job_problems = _analyze(job, run)
        if report is not None:
            reports[job.name] = report
        problems += _for_job(job, job_problems)
    return reports, problems


# ---------------------------------------------------------------- text for people


def report_json(report: DatasetReport) -> dict[str, Any]:
    """The report as JSON (``submit --json``, the adapter manifest)."""
    return report.to_json()


def describe(report: DatasetReport | None) -> list[str]:
    """The lines ``loraq submit --dry-run`` prints under a job's name (unindented)."""
    if report is None:
        return ["dataset not analysed"]
    tokens = report.tokens
    eval_from = f"validation.dataset {report.eval_path}" if report.eval_source == "file" else "a seeded split"
    if report.pairs is not None:
        from .pair_check import describe_pairs

        lines = [f"dataset: {report.path} ({report.format}, {report.rows} pairs, sha256 {report.sha256[:12]})",
                 f"train / eval: {report.n_train} / {report.n_eval} pairs",
                 *describe_pairs(report.pairs),
                 f"estimated: {report.est_steps} steps, {report.est_epochs:g} epoch(s)", *auto.lines(report.auto)]
        if report.untrainable_rows:
            lines.append(f"untrainable sides: {report.untrainable_rows} (errors)")
        return lines + [f"warning: {warning}" for warning in report.warnings]
    lines = [
        f"dataset: {report.path} ({report.format}, {report.rows} rows, sha256 {report.sha256[:12]})",
        f"train / eval: {report.n_train} / {report.n_eval} rows (eval from {eval_from})",
        f"tokens per row: mean {tokens.mean:g}, p95 {tokens.p95}, max {tokens.max} "
        f"({tokens.total} in all; max_seq_len {report.max_seq_len})",
        f"truncated rows: {report.truncated_rows}",
        f"estimated: {report.est_steps} steps, {report.est_epochs:g} epoch(s)",
        *_batch_lines(report.batches),
        *auto.lines(report.auto),
    ]
    if report.chat_template:
        lines.append(f"chat template: {report.chat_template} (the job's chat_template)")
    if report.untrainable_rows:
        lines.append(f"untrainable rows: {report.untrainable_rows} (errors)")
    lines += [f"warning: {warning}" for warning in report.warnings]
    return lines


def _batches(plan: packing.Plan, lengths: Sequence[int]) -> dict[str, Any]:
    stats = plan.stats(lengths)
    keep = ("packed", "steps_per_epoch", "micro_batches_per_epoch", "tokens_per_epoch", "laid_out_tokens_per_epoch",
            "padding_share", "step_budget", "fill", "max_micro_tokens", "mean_rows_per_step",
            "padded_random_tokens_per_epoch")
    return {k: stats[k] for k in keep}


def _batch_lines(batches: dict[str, Any] | None) -> list[str]:
    if not batches:
        return []
    tokens, laid_out = batches["tokens_per_epoch"], batches["laid_out_tokens_per_epoch"]
    padded = batches["padded_random_tokens_per_epoch"]
    saving = f"; padded random batches would lay out {padded:,} ({1 - tokens / padded:.0%} padding)" if padded else ""
    if batches["packed"]:
        return [f"batches: packed, ~{batches['mean_rows_per_step']:g} rows a step in at most "
                f"{batches['step_budget']:,} tokens ({batches['fill']:.0%} full); {tokens:,} tokens an epoch{saving}"]
    return [f"batches: padded, grouped by length; {laid_out:,} tokens laid out an epoch for {tokens:,} "
            f"({batches['padding_share']:.0%} padding){saving}"]


def summary(report: DatasetReport) -> str:
    """The one line a plain ``loraq submit`` prints after a job's name."""
    warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
    return (f"{report.rows} {report.format} rows, {report.n_train} train / {report.n_eval} eval, "
            f"~{report.est_steps} steps{warned}")
