"""Sweeps: one job of a queue file that expands into one job per combination of settings.

A job may carry ``sweep:``, a map of dotted keys (``training.learning_rate``,
``lora.r``) to lists of values. The expansion is their cartesian product, as
Axolotl's sweep files have it; the ``_`` key holds a list of settings that go
together (each a map of dotted keys), and multiplies the product once more::

    - name: lr-sweep
      dataset: ./data/sql.jsonl
      sweep:
        training.learning_rate: [1.0e-4, 3.0e-4]
        _:
          - {lora.r: 8, lora.alpha: 16}
          - {lora.r: 16, lora.alpha: 32}

gives 4 jobs, each named ``<name>-<8 hex digits of the sha256 of its settings>``
and carrying ``group: <name>``. A name depends on the settings alone, so the same
sweep submitted twice names the same jobs, and enqueues nothing new.

Standard library only; the schema whose fields the keys must name is passed in.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import types
import typing
from typing import Any

from ..errors import Problem
from . import halving

#: The most jobs one sweep may expand into: a typo of a list should not enqueue a million jobs.
MAX_JOBS = 1000
#: The most jobs one submit may enqueue, every sweep's product counted before any sweep expands: 200 sweeps
#: aliased in a 12 KB file (YAML anchors) would otherwise be 200,000 jobs and gigabytes of work.
MAX_SUBMIT_JOBS = 1000
#: Keys a sweep cannot set: they name the job and its group, which the sweep decides.
FIXED = ("name", "group", "sweep", "sweep_strategy")
TOGETHER = "_"


def settings_hash(settings: dict[str, Any]) -> str:
    """8 hex digits that name one combination (the same settings, the same name, in any process)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def child_name(name: str, settings: dict[str, Any]) -> str:
    return f"{name}-{settings_hash(settings)}"


def _model_of(annotation: Any) -> Any:
    """The pydantic model inside an annotation (``Model``, ``Model | None``), or ``None``."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    for option in options:
        if isinstance(option, type) and hasattr(option, "model_fields"):
            return option
    return None


def key_problem(key: Any, schema: Any) -> str | None:
    """Why ``key`` cannot be swept over (``None`` if it names a field of ``schema``)."""
    if not isinstance(key, str) or not key:
        return "a sweep key is a dotted field name such as training.learning_rate"
    parts = key.split(".")
    if parts[0] in FIXED:
        return f"{parts[0]} cannot be swept: the sweep names its jobs and their group"
    model = schema
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return "unknown key (check the spelling; a sweep key names a field, e.g. training.learning_rate)"
        if depth < len(parts) - 1:
            model = _model_of(field.annotation)
            if model is None:
                return f"{'.'.join(parts[:depth + 1])} has no fields to set"
    return None


def _set(job: dict[str, Any], key: str, value: Any) -> str | None:
    node = job
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if part == "dataset" and node is job and isinstance(child, str):
            child = node[part] = {"path": child}  # the shorthand, spelled out so a key can be set in it
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"the job's {part} is not a mapping, so {key} cannot be set in it"
        node = child
    node[parts[-1]] = copy.deepcopy(value)
    return None


def _axes(sweep: Any, where: str, schema: Any, problems: list[Problem]) -> list[list[dict[str, Any]]] | None:
    """The sweep as a list of axes, each a list of settings (dotted key -> value) to choose one of."""
    if not isinstance(sweep, dict) or not sweep:
        problems.append(Problem(f"{where}: sweep", "must map dotted keys to lists of values"))
        return None
    axes: list[list[dict[str, Any]]] = []
    seen: set[str] = set()
    ok = True
    for key, values in sweep.items():
        if key == TOGETHER:
            if not isinstance(values, list) or not values or not all(isinstance(v, dict) and v for v in values):
                problems.append(Problem(f"{where}: sweep._", "must be a non-empty list of settings that go together "
                                                             "(each a map of dotted keys to values)"))
                ok = False
                continue
            inner = sorted({k for v in values for k in v}, key=str)
            for k in inner:
                if problem := key_problem(k, schema):
                    problems.append(Problem(f"{where}: sweep._.{k}", problem))
                    ok = False
                elif k in seen:
                    problems.append(Problem(f"{where}: sweep._.{k}", "is swept over twice (also a key of sweep)"))
                    ok = False
            seen.update(k for k in inner if isinstance(k, str))
            axes.append([dict(v) for v in values])
            continue
        if problem := key_problem(key, schema):
            problems.append(Problem(f"{where}: sweep.{key}", problem))
            ok = False
            continue
        if key in seen:
            problems.append(Problem(f"{where}: sweep.{key}", "is swept over twice (also in sweep._)"))
            ok = False
            continue
        seen.add(key)
        if not isinstance(values, list) or not values:
            problems.append(Problem(f"{where}: sweep.{key}", f"must be a non-empty list of values (got {values!r})"))
            ok = False
            continue
        axes.append([{key: value} for value in values])
    return axes if ok else None


def _strategy(raw: dict[str, Any], defaults: dict[str, Any], count: int, axes: list[list[dict[str, Any]]],
              label: str, problems: list[Problem]) -> dict[str, Any] | None | bool:
    """The halving plan of a sweep (``None`` for a grid; ``False`` after a problem)."""
    strategy = raw.get("sweep_strategy", "grid")
    if strategy not in halving.STRATEGIES:
        problems.append(Problem(f"{label}: sweep_strategy", f"must be one of {', '.join(halving.STRATEGIES)} "
                                                            f"(got {strategy!r})"))
        return False
    if strategy == "grid":
        return None
    if count < 2:
        problems.append(Problem(f"{label}: sweep_strategy", f"halving needs at least 2 configurations; "
                                                            f"the sweep gives {count}"))
        return False
    if any("training.max_steps" in part for axis in axes for part in axis):
        problems.append(Problem(f"{label}: sweep.training.max_steps", "cannot be swept with sweep_strategy: halving: "
                                                                     "max_steps is the budget the rounds share"))
        return False
    def field(section: str, key: str) -> Any:
        for source in (raw, defaults):
            value = source.get(section)
            if isinstance(value, dict) and key in value:
                return value[key]
        return None

    budget = field("training", "max_steps")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        problems.append(Problem(f"{label}: training.max_steps", "sweep_strategy: halving needs training.max_steps, "
                                                               "the full budget in optimizer steps that the rounds share"))
        return False
    if problem := halving.budget_problem(count, budget):
        problems.append(Problem(f"{label}: training.max_steps", problem))
        return False
    if field("validation", "early_stopping") is not None:
        problems.append(Problem(f"{label}: validation.early_stopping", "cannot be combined with sweep_strategy: "
                                                                      "halving, which stops the worse configurations itself"))
        return False
    return halving.plan(count, budget)


def expand_jobs(raw_jobs: list[Any], defaults: dict[str, Any], where: str, problems: list[Problem], *,
                schema: Any) -> tuple[list[Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Jobs with a ``sweep`` replaced by their expansion; also ``child name -> its settings``, and
    ``child name -> its halving plan`` for a sweep with ``sweep_strategy: halving``.

    Problems are appended to ``problems``, each naming the file, the job and the key;
    a sweep with any problem expands into nothing.
    """
    out: list[Any] = []
    settings_of: dict[str, dict[str, Any]] = {}
    plans: dict[str, dict[str, Any]] = {}
    # First every sweep's axes and the size of their product, and the submit's total: nothing expands past the cap.
    sized: list[tuple[Any, str, str | None, list[list[dict[str, Any]]] | None, int]] = []
    total = 0
    for index, raw in enumerate(raw_jobs):
        name = raw.get("name") if isinstance(raw, dict) else None
        label = f"{where}: job {name!r}" if isinstance(name, str) else f"{where}: job #{index + 1}"
        if isinstance(raw, dict) and "sweep_strategy" in raw and "sweep" not in raw:
            problems.append(Problem(f"{label}: sweep_strategy", "applies to a sweep: add sweep:, or remove it"))
            continue
        if not isinstance(raw, dict) or "sweep" not in raw:
            sized.append((raw, label, None, None, 1))
            total += 1
            continue
        if not isinstance(name, str):
            problems.append(Problem(f"{label}: name", "a sweep needs a name: its jobs are named after it"))
            continue
        if "group" in raw or "group" in defaults:
            problems.append(Problem(f"{label}: group", "is set by the sweep (to its name); remove it"))
            continue
        axes = _axes(raw["sweep"], label, schema, problems)
        if axes is None:
            continue
        count = 1
        for axis in axes:
            count *= len(axis)
        if count > MAX_JOBS:
            problems.append(Problem(f"{label}: sweep", f"expands into {count:,} jobs; at most {MAX_JOBS:,} a sweep"))
            continue
        sized.append((raw, label, name, axes, count))
        total += count
    if total > MAX_SUBMIT_JOBS:
        sweeps = sum(1 for _, _, name, _, _ in sized if name is not None)
        problems.append(Problem(f"{where}: jobs", f"the queue file's {len(sized):,} job(s) ({sweeps:,} of them sweeps) "
                                                  f"expand into {total:,} jobs; at most {MAX_SUBMIT_JOBS:,} a submit "
                                                  "(split the file, or sweep over fewer values)"))
        return [], {}, {}
    for raw, label, name, axes, count in sized:
        if name is None or axes is None:
            out.append(raw)
            continue
        plan = _strategy(raw, defaults, count, axes, label, problems)
        if plan is False:
            continue
        base = {k: v for k, v in raw.items() if k not in ("sweep", "sweep_strategy")}
        children: list[str] = []  # this sweep's halving jobs
        for combo in itertools.product(*axes):
            settings: dict[str, Any] = {}
            for part in combo:
                settings.update(part)
            job = copy.deepcopy(base)
            failed = next((p for k, v in settings.items() if (p := _set(job, k, v))), None)
            if failed:
                problems.append(Problem(f"{label}: sweep", failed))
                break
            job["name"] = child_name(name, settings)
            job["group"] = name
            settings_of[job["name"]] = settings
            if isinstance(plan, dict):
                plans[job["name"]] = copy.deepcopy(plan)
                children.append(job["name"])
            out.append(job)
        # A halving sweep's rounds are its own: another sweep of the same name (other values, another
        # submit) shares the group but never a round. The id is its jobs' names, so a resubmit is the same.
        for child in children:
            plans[child]["sweep"] = settings_hash({"sweep": name, "jobs": sorted(children)})
    return out, settings_of, plans


def describe(settings: dict[str, Any]) -> str:
    """``training.learning_rate=0.0001, lora.r=8``: one job's settings, for people."""
    return ", ".join(f"{k}={v}" for k, v in settings.items())
