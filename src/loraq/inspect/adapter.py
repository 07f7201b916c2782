"""The adapter inspector: the gate an adapter passes before loraq publishes it.

Tools that publish whatever ``save_pretrained`` wrote ship 40-byte adapters from
ZeRO-3 (trl#4416, peft#2892), adapters whose ``lora_B`` stayed zero (peft#1402),
NaN adapters, and adapters whose keys miss the base and load with only a warning
(peft#2699). :func:`inspect_adapter` stops all of these, cheapest check first,
and says what is wrong in findings a person can act on:

1. the folder: not empty; files regular and inside it; pickles refused, never opened;
2. ``adapter_config.json``: a LoRA config with sane values;
3. ``adapter_model.safetensors``: the header, read by loraq with bounds (:mod:`.safetensors`);
4. the LoRA structure: A and B per module, shapes and ranks against the config,
   modules against ``target_modules`` (matched the way PEFT matches them);
5. the values, read once: finite, and ``lora_B`` not all zero;
6. with ``base``: names and shapes against the base model built on the meta device,
   then a real load with ``PeftModel.from_pretrained`` that must change the output;
7. with ``data`` too: eval loss of base and adapter, and :func:`quality_gate`;
8. the serving verdicts (:mod:`.serving`): vLLM, LoRAX, llama.cpp / Ollama. They do not
   decide passing; a queue's ``serving: [...]`` makes them a gate at publish.

Steps 1-5 use numpy only (the supervisor never imports torch); 6-7 import torch
lazily, in :func:`.on_base.inspect_on_base`.

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
dora_magnitude_zero        error     a DoRA magnitude vector of zeros: the module's output would be zero
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
exact_match_gate           error     the adapter's exact match on the eval prompts below validation.min_exact_match
serving                    error     an engine the queue requires (``serving: [...]``) will not serve it
bad_chat_template          error     ``chat_template.jinja`` is not a Jinja template (or unreadable, over 1 MiB)
=========================  ========  =====================================================
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..data import templates
from ..errors import InspectionError, PathError, RegexTimeout, TemplateError
from ..escape import printable
from ..sandbox import Roots, fd_path, is_pickle, path_errors_as
from . import safetensors as st
from . import serving
from .lora_config import LoraSettings, parse_config, regex_budget
from .structure import (
    CONFIG_NAME,
    KEY_PREFIX,
    WEIGHTS_NAME,
    Findings,
    Inspection,
    Weights,
    check_structure,
    check_values,
    sort_tensors,
)

MAX_CONFIG_BYTES = 1 << 20
MAX_FILES = 10_000


# ---------------------------------------------------------------- the folder


def _resolve(folder: str | Path, roots: Roots | None) -> Path:
    path = Path(folder).expanduser()
    if roots is not None:
        with path_errors_as(InspectionError):
            roots.check_read(path, what="adapter folder")
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise InspectionError(f"adapter folder {printable(folder)!r} does not exist") from None
    if not resolved.is_dir():
        raise InspectionError(f"adapter folder {printable(folder)!r} is not a folder")
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
        actual = fd_path(fd)
        if actual is not None and not actual.is_relative_to(root):
            os.close(fd)
            found.add("symlink_escape", "error", f"{name} changed while it was opened (now {printable(actual)}, "
                                                 "outside the adapter folder); refused", name)
            return None
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


def _read_config(root: Path, names: list[str], found: Findings, stats: dict[str, Any],
                 source: Path | None = None) -> tuple[LoraSettings | None, dict[str, Any]]:
    if CONFIG_NAME not in names:
        if names:
            found.add("missing_config", "error", f"no {CONFIG_NAME} in {root}; PEFT cannot load the adapter "
                                                 "without it (save with save_pretrained)")
        return None, {}
    opened = _open(source or root, CONFIG_NAME, found)
    if opened is None:
        return None, {}
    fd, size = opened
    try:
        if size > MAX_CONFIG_BYTES:
            found.add("oversized", "error", f"{CONFIG_NAME} is {size:,} bytes; a LoRA config is a few KB "
                                            f"(cap {MAX_CONFIG_BYTES:,})", CONFIG_NAME)
            return None, {}
        raw = st.read_at(fd, 0, size)
    except OSError as exc:
        found.add("unreadable", "error", f"{CONFIG_NAME} cannot be read: {exc.strerror or exc}", CONFIG_NAME)
        return None, {}
    finally:
        os.close(fd)
    cfg, problems = parse_config(raw)
    raw_cfg: dict[str, Any] = {}
    if cfg is not None:
        raw_cfg = json.loads(raw.decode("utf-8"))  # parse_config has just read it as a JSON object
    for code, message in problems:
        found.add(code, "error", f"{CONFIG_NAME}: {message}", CONFIG_NAME)
    if cfg is not None:
        stats.update(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                     target_modules=sorted(cfg.targets) if isinstance(cfg.targets, tuple) else cfg.targets,
                     use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, scaling=cfg.scaling,
                     modules_to_save=list(cfg.modules_to_save))
    return cfg, raw_cfg


def _read_weights(root: Path, names: list[str], cfg: LoraSettings | None, found: Findings,
                  stats: dict[str, Any], source: Path | None = None) -> Weights | None:
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
    opened = _open(source or root, WEIGHTS_NAME, found)
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
        # PEFT saves the base's embedding beside LoRA on it (save_embedding_layers) as "<module>.base_layer"
        fix = ("save with save_embedding_layers=False unless the vocabulary was resized"
               if all(name.endswith(".base_layer") for name in copied)
               else "drop them from modules_to_save unless they must be trained")
        found.add("modules_to_save_bloat", "warning",
                  f"full copies of {', '.join(copied[:3])} take {weights.copy_bytes / 2**20:,.1f} MiB, more than "
                  f"the LoRA weights ({weights.lora_bytes / 2**20:,.1f} MiB); {fix}", WEIGHTS_NAME)


# ---------------------------------------------------------------- the public interface


def inspect_adapter(folder: str | Path, *, roots: Roots | None = None, base: str | None = None,
                    data: str | None = None, min_eval_loss_drop: float = 0.0, max_seq_len: int = 512,
                    base_config: dict[str, Any] | None = None) -> Inspection:
    """Inspect one adapter folder; the returned :class:`Inspection` passes when no finding is an error.

    Args:
        folder: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        roots: when given, the folder, ``base`` and ``data`` must resolve inside them.
        base: a local base model folder: check names and shapes against it, load
            the adapter onto it with PEFT and require that the output changes.
        data: a dataset (needs ``base``): compare the eval loss of base and adapter
            and apply :func:`quality_gate` with ``min_eval_loss_drop``.
        max_seq_len: rows of ``data`` are cut to this many tokens.
        base_config: the base model's config.json, for the serving verdicts only (no
            model is loaded); else it is read from ``base``, or from the base that the
            adapter's loraq manifest or adapter_config.json names, where that is readable.

    Raises:
        InspectionError: the folder (or ``base``/``data``) is missing, not a folder,
            outside ``roots``, or unusable. Anything wrong inside the folder is a finding.
    """
    root = _resolve(folder, roots)
    if data is not None and base is None:
        raise InspectionError("an eval dataset needs a base model to compare with; give base as well")
    data_path: Path | None = None
    if base is not None:
        from . import on_base  # torch-free to import; torch comes with the base model's checks

        # Whether there is anything to inspect against is settled first, whatever the folder holds.
        base = on_base.resolve_base(base, roots)
        data_path = on_base.resolve_data(data, roots) if data is not None else None
    found = Findings()
    stats: dict[str, Any] = {}
    names = _list(root, found)
    private = None
    verdicts: dict[str, serving.Verdict] = {}
    try:
        source = root
        if base is not None:
            # PEFT loads by name, after our checks: it loads from a private copy of the exact
            # bytes checked, holding the config and the safetensors only (nothing to unpickle).
            private = _private_copy(root, names, found)
            source = private or root
        with regex_budget():
            try:
                cfg, raw_cfg = _read_config(root, names, found, stats, source=source)
                weights = _read_weights(root, names, cfg, found, stats, source=source)
                chat_template = _read_template(root, names, found, stats)
                if cfg is not None and weights is not None:
                    if base_config is None:
                        base_config = _serving_base_config(root, raw_cfg, base, roots)
                    facts = serving.facts_from_adapter(raw_cfg, [(t.name, t.shape) for t in weights.header.tensors],
                                                       base_config)
                    verdicts = serving.verdicts(facts)
                if base is not None:
                    stats["base"] = base
                    if cfg is not None and weights is not None and private is not None:
                        on_base.inspect_on_base(private, weights, cfg, found, stats, base=base, data_path=data_path,
                                                min_drop=min_eval_loss_drop, max_seq_len=max_seq_len, roots=roots,
                                                chat_template=chat_template)
            except RegexTimeout as exc:
                found.add("bad_config", "error", f"{CONFIG_NAME}: {exc}", CONFIG_NAME)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    return Inspection(str(root), found.result(), stats, verdicts)


def _read_template(root: Path, names: list[str], found: Findings, stats: dict[str, Any]) -> str | None:
    """The folder's ``chat_template.jinja`` (the job's template, written at publish): rows of ``data`` render with it."""
    name = templates.TEMPLATE_FILE
    if name not in names:
        return None
    try:
        if not (root / name).resolve().is_relative_to(root):
            return None  # a symlink_escape finding already; never read
    except (OSError, RuntimeError):
        return None
    try:
        source = templates.load_chat_template(name, base_dir=root, roots=None)
    except TemplateError as exc:
        found.add("bad_chat_template", "error", f"{exc}; a server rendering prompts with it would fail", name)
        return None
    stats["chat_template"] = {"file": name, "sha256": source.sha256}
    return source.text


def _serving_base_config(root: Path, raw_cfg: dict[str, Any], base: str | None,
                         roots: Roots | None) -> dict[str, Any] | None:
    """The config.json of the base the adapter is for: ``base``, else the one its manifest or config names."""
    candidates: list[Any] = [base]
    if base is None:
        manifest = _small_json(root / "loraq-manifest.json")
        candidates += [manifest.get("base_model"), raw_cfg.get("base_model_name_or_path")]
    for candidate in candidates:
        if not isinstance(candidate, str) or not candidate:
            continue
        path = Path(candidate).expanduser()
        if path.exists() and roots is not None:
            try:
                roots.check_read(path, what="base model")
            except PathError:
                continue  # a base outside the roots is not read, not even its config
        config = serving.read_base_config(candidate)
        if config is not None:
            return config
    return None


def _small_json(path: Path) -> dict[str, Any]:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


#: The largest weights file copied aside to be loaded onto a base (far above any LoRA adapter).
MAX_PRIVATE_COPY = 8 << 30


def _private_copy(root: Path, names: list[str], found: Findings) -> Path | None:
    """The config and weights, copied from their checked descriptors into a folder only this process uses.

    ``None`` when either cannot be opened (a finding says why) or the weights are too big to copy.
    """
    if CONFIG_NAME not in names or WEIGHTS_NAME not in names:
        return None
    private = Path(tempfile.mkdtemp(prefix="loraq-inspect-"))  # mode 0700: no other user can swap a file in
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            opened = _open(root, name, found)
            if opened is None:
                shutil.rmtree(private, ignore_errors=True)
                return None
            fd, size = opened
            try:
                if size > MAX_PRIVATE_COPY:
                    found.add("oversized", "error", f"{name} is {size / 2**30:,.1f} GiB: too big to be a LoRA adapter "
                                                    "or to load onto a base", name)
                    shutil.rmtree(private, ignore_errors=True)
                    return None
                out = os.open(private / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    offset = 0
                    while offset < size:
                        chunk = os.pread(fd, min(st.CHUNK_BYTES * 8, size - offset), offset)
                        if not chunk:
                            break  # it shrank: the copy holds what was there, and is checked as it is
                        os.write(out, chunk)
                        offset += len(chunk)
                finally:
                    os.close(out)
            finally:
                os.close(fd)
    except OSError as exc:
        shutil.rmtree(private, ignore_errors=True)
        raise InspectionError(f"cannot copy the adapter aside to load it onto the base: {exc.strerror or exc}") from None
    return private
