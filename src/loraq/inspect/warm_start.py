"""Whether an adapter can start a job's LoRA (``init_from``): its rank, targets, variant and base, without torch.

Checked at submit. The adapter's config and safetensors header are read with the
inspector's bounded readers; its LoRA modules are compared with the job's
settings, and, where the base is a local folder, the shape of every module with
the base's own weights (read from their safetensors headers), so an adapter made
for another model is refused before any GPU time is spent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _header(path: Path) -> st.Header | None:
    fd, info = st.open_regular(path)
    try:
        header, defects = st.read_header(fd, info.st_size)
    finally:
        os.close(fd)
    return None if defects else header


def base_shapes(base_folder: Path) -> dict[str, tuple[int, ...]] | None:
    """``tensor name -> shape`` of a local base model's safetensors weights; ``None`` if there are none to read."""
    index = base_folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (base_folder / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            return None
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            header = _header(base_folder / shard)
            if header is None:
                return None
            shapes.update({t.name: tuple(t.shape) for t in header.tensors})
        return shapes
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _linear_modules(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """What target_modules: all-linear selects, from the weights' names: every 2-D weight but embeddings and the output."""
    return {name.removesuffix(".weight") for name, shape in shapes.items()
            if name.endswith(".weight") and len(shape) == 2 and "embed" not in name
            and name.split(".")[-2] not in ("lm_head", "embed_out", "output")}


def check(folder: Path, wanted: WantedLora, base_folder: Path | None) -> list[str]:
    """What stops ``folder`` from starting a LoRA of ``wanted`` on ``base_folder``: one line each (empty: it fits)."""
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config.is_file() or not weights.is_file():
        return [f"{folder} is not an adapter folder (it needs {CONFIG_NAME} and {WEIGHTS_NAME})"]
    try:
        raw = config.read_bytes()[: 1 << 20]
        header = _header(weights)
    except OSError as exc:
        return [f"{folder}: cannot read the adapter: {exc.strerror or exc}"]
    cfg, problems = parse_config(raw)
    if cfg is None or header is None:
        return [f"{folder}: {CONFIG_NAME}: {m}" for _, m in problems] or [f"{folder}: {WEIGHTS_NAME} is damaged"]
    found = Findings()
    modules = sort_tensors(header, cfg, found).modules
    if found.has_errors() or not modules:
        return [f"{folder}: not a loadable LoRA adapter ({(found.result() or ['no LoRA tensors'])[0]})"]
    out = []
    ranks = sorted({m.a.shape[0] for m in modules.values() if m.a is not None and m.a.shape})
    if ranks != [wanted.r] or cfg.r != wanted.r:
        out.append(f"the adapter has rank {ranks[0] if len(ranks) == 1 else ranks} (r={cfg.r}); the job's lora.r is "
                   f"{wanted.r}: a warm start keeps the rank, so set lora.r: {cfg.r}")
    if cfg.use_dora != wanted.use_dora:
        out.append(f"the adapter {'is' if cfg.use_dora else 'is not'} a DoRA adapter; the job's lora.use_dora is "
                   f"{wanted.use_dora}")
    shapes = base_shapes(base_folder) if base_folder is not None else None
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
