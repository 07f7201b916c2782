"""Whether an adapter can start a job's LoRA (``init_from``): its rank, targets, variant and base, without torch.

Checked at submit. The adapter's config and safetensors header are read with the
inspector's bounded readers, each from a descriptor checked to be the regular file
inside the roots (:meth:`loraq.sandbox.Roots.open_file`): an ``adapter_config.json``
symlinked to a file outside them is refused unread, so no error can quote it. Every
value of the weights is read once: a NaN or Inf is refused, naming the file and the
tensor. Its LoRA modules are compared with the job's settings, and, where the base is
a local folder, the shape of every module with the base's own weights (read from their
safetensors headers, inside the roots too), so an adapter made for another model is
refused before any GPU time is spent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PathError
from ..sandbox import Roots, read_fd
from ..workspace import Home
from . import safetensors as st
from .lora_config import parse_config
from .structure import CONFIG_NAME, WEIGHTS_NAME, Findings, sort_tensors


@dataclass(frozen=True)
class WantedLora:
    """The job's LoRA, as the warm start must match it."""

    r: int
    targets: str | list[str]  # "all-linear" or module names
    use_dora: bool = False

    @classmethod
    def of(cls, lora: dict[str, Any]) -> WantedLora:
        """From a job's ``lora`` settings as JSON (the stored spec's)."""
        return cls(r=lora.get("r", 8), targets=lora.get("target_modules", "all-linear"),
                   use_dora=bool(lora.get("use_dora")))


#: The largest adapter_config.json or weight index read.
MAX_JSON_BYTES = 1 << 20


def _open(path: Path, roots: Roots | None) -> tuple[int, os.stat_result]:
    """A checked descriptor: inside ``roots`` where given (else PathError); a regular file, not a symlink, always."""
    if roots is None:
        return st.open_regular(path)
    return roots.open_file(path, what=path.name)


def _header(path: Path, roots: Roots | None) -> st.Header | None:
    fd, info = _open(path, roots)
    try:
        header, defects = st.read_header(fd, info.st_size)
    finally:
        os.close(fd)
    return None if defects else header


def _small(path: Path, roots: Roots | None) -> bytes:
    fd, _ = _open(path, roots)
    try:
        return read_fd(fd, MAX_JSON_BYTES)
    finally:
        os.close(fd)


def base_shapes(base_folder: Path, roots: Roots | None = None) -> dict[str, tuple[int, ...]] | None:
    """``tensor name -> shape`` of a local base model's safetensors weights; ``None`` if there are none to read.

    With ``roots``, each file is read only if it is the regular file inside them that it names.
    """
    index = base_folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            shards = sorted(set(json.loads(_small(index, roots))["weight_map"].values()))
        elif (base_folder / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            return None
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard:
                return None  # a weight_map entry that is not a file of this folder
            header = _header(base_folder / shard, roots)
            if header is None:
                return None
            shapes.update({t.name: tuple(t.shape) for t in header.tensors})
        return shapes
    except (OSError, PathError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _non_finite(weights: Path, header: st.Header, roots: Roots | None) -> str | None:
    """The first tensor of ``weights`` holding a NaN or an Inf, or ``None``; every value is read once."""
    fd, _ = _open(weights, roots)
    try:
        values, defects = st.scan_values(fd, header)
    finally:
        os.close(fd)
    if defects:
        return defects[0].message
    bad = [name for name, v in values.items() if not v.finite]
    return (f"{WEIGHTS_NAME}: tensor {bad[0]!r} holds NaN or Inf ({len(bad)} tensor(s) do): a diverged adapter "
            "cannot start a job") if bad else None


def _linear_modules(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """What target_modules: all-linear selects, from the weights' names: every 2-D weight but embeddings and the output."""
    return {name.removesuffix(".weight") for name, shape in shapes.items()
            if name.endswith(".weight") and len(shape) == 2 and "embed" not in name
            and name.split(".")[-2] not in ("lm_head", "embed_out", "output")}


def check(folder: Path, wanted: WantedLora, base_folder: Path | None, roots: Roots | None = None) -> list[str]:
    """What stops ``folder`` from starting a LoRA of ``wanted`` on ``base_folder``: one line each (empty: it fits).

    ``roots``: where every file read must be (the adapter's and the base's), on a checked descriptor.
    """
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config.is_file() or not weights.is_file():
        return [f"{folder} is not an adapter folder (it needs {CONFIG_NAME} and {WEIGHTS_NAME})"]
    try:
        raw = _small(config, roots)
        header = _header(weights, roots)
    except PathError as exc:
        return [str(exc)]  # names the file and where it leads, never what it holds
    except OSError as exc:
        return [f"{folder}: cannot read the adapter: {exc.strerror or exc}"]
    cfg, problems = parse_config(raw)
    if cfg is None or header is None:
        return [f"{folder}: {CONFIG_NAME}: {m}" for _, m in problems] or [f"{folder}: {WEIGHTS_NAME} is damaged"]
    found = Findings()
    modules = sort_tensors(header, cfg, found).modules
    if found.has_errors() or not modules:
        why = [f.message for f in found.result()] or ["no LoRA tensors"]
        return [f"{folder}: not a loadable LoRA adapter ({why[0]})"]
    try:
        non_finite = _non_finite(weights, header, roots)
    except PathError as exc:
        return [str(exc)]
    except OSError as exc:
        return [f"{folder}: cannot read the adapter: {exc.strerror or exc}"]
    if non_finite:
        return [f"{folder}: {non_finite}"]
    out = []
    ranks = sorted({m.a.shape[0] for m in modules.values() if m.a is not None and m.a.shape})
    if ranks != [wanted.r] or cfg.r != wanted.r:
        out.append(f"the adapter has rank {ranks[0] if len(ranks) == 1 else ranks} (r={cfg.r}); the job's lora.r is "
                   f"{wanted.r}: a warm start keeps the rank, so set lora.r: {cfg.r}")
    if cfg.use_dora != wanted.use_dora:
        out.append(f"the adapter {'is' if cfg.use_dora else 'is not'} a DoRA adapter; the job's lora.use_dora is "
                   f"{wanted.use_dora}")
    shapes = base_shapes(base_folder, roots) if base_folder is not None else None
    names = set(modules)
    if isinstance(wanted.targets, list):
        have = {name.rsplit(".", 1)[-1] for name in names}
        if have != set(wanted.targets):
            out.append(f"the adapter's LoRA is on {sorted(have)}; the job's lora.target_modules is "
                       f"{sorted(wanted.targets)}: a warm start keeps the targets")
    elif shapes is not None and names != _linear_modules(shapes):
        out.append(f"the adapter's LoRA is on {len(names)} modules ({sorted({n.rsplit('.', 1)[-1] for n in names})}), "
                   "not on all the base's linear layers as target_modules: all-linear asks")
    if shapes is not None:
        for name in sorted(names):
            module = modules[name]
            shape = shapes.get(f"{name}.weight")
            if shape is None:
                out.append(f"the adapter has LoRA on {name!r}, which the base model {base_folder} does not have: "
                           "it was trained on another model")
                break
            dims = module.dims
            if dims is not None and len(shape) == 2 and (dims[1], dims[0]) != (shape[0], shape[1]):
                out.append(f"the adapter's {name!r} maps {dims[0]} -> {dims[1]} features, the base's weight is "
                           f"{list(shape)}: it was trained on another model")
                break
    return out


def published(home: Home, name: str, lora: dict[str, Any], base_model: str) -> tuple[Path, list[str]]:
    """The published adapter of the completed job ``name`` (a job's ``after``), and what stops it from starting
    a job with ``lora`` settings (as JSON) on ``base_model``: :func:`check`'s lines (empty: it fits).

    Submit checks a dependency that has completed already; the worker again when it claims the waiting job.
    """
    folder = home.adapter_dir(name)
    if not folder.is_dir():
        return folder, [f"{name} completed, but its adapter is not in {home.adapters_dir} (moved or deleted)"]
    base = Path(base_model)
    return folder.resolve(), check(folder.resolve(), WantedLora.of(lora), base if base.is_dir() else None)
