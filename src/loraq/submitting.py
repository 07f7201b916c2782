"""What submit and clone do to a validated queue beyond its schema (issue 12), torch-free.

- **warm starts**: a job's ``init_from`` (a published adapter's name, or an
  adapter folder) resolved to a folder inside the roots, and checked against the
  job's rank, targets, variant and base (:mod:`loraq.inspect.warm_start`);
- **dependencies**: a job's ``after`` (a job of the queue, or one in the home) found,
  free of cycles, and able to start this job as a warm start would (the same checks,
  on its adapter where it is published, else on its settings);
- **auto settings**: the values :mod:`loraq.data.check` resolved from the data put
  into the job, with the rule that gave each (:mod:`loraq.queue.auto`);
- **sweeps**: the identity of a job as submitted, so the same sweep submitted again
  is recognised and enqueues nothing new;
- **clones**: a stored job turned back into a queue-file job, with ``--set`` overrides.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import fsutil
from .errors import PathError, Problem, SpecError
from .inspect import warm_start
from .queue import dependencies, halving
from .queue.records import StoredJob
from .queue.spec import NAME_PATTERN, Queue, ResolvedJob, TrainingSpec
from .sandbox import Roots
from .workspace import Home

if TYPE_CHECKING:
    from .queue.records import Job


def _adapter_folder(ref: str, job: ResolvedJob, queue: Queue, home: Home, roots: Roots) -> tuple[Path | None, str | None]:
    if NAME_PATTERN.match(ref) and "/" not in ref and home.adapter_dir(ref).is_dir():
        return home.adapter_dir(ref).resolve(), None
    candidate = Path(ref).expanduser()
    if not candidate.is_absolute():
        candidate = Path(queue.path).parent / candidate
    try:
        roots.check_read(candidate, what="init_from")
    except PathError as exc:
        return None, str(exc)
    if candidate.is_dir():
        return candidate.resolve(), None
    return None, (f"no published adapter named {ref!r} in {home.adapters_dir}, and no adapter folder "
                  f"{candidate}: name an adapter that is published, or its folder")


def resolve_warm_starts(queue: Queue, home: Home, roots: Roots, label: str) -> tuple[Queue, list[Problem]]:
    """Each ``init_from`` as a checked folder (``init_from_path``); a problem per job that cannot start from it."""
    problems: list[Problem] = []
    jobs = []
    for job in queue.jobs:
        ref = job.spec.init_from
        if ref is None:
            jobs.append(job)
            continue
        where = f"{label}: job {job.name!r}: init_from"
        folder, problem = _adapter_folder(ref, job, queue, home, roots)
        if folder is None:
            problems.append(Problem(where, problem or f"cannot use {ref!r}"))
            continue
        lora = job.spec.lora
        wanted = warm_start.WantedLora(r=lora.r, targets=lora.target_modules, use_dora=lora.use_dora)
        base = Path(job.base_model)
        lines = warm_start.check(folder, wanted, base if base.is_dir() else None, roots)
        problems += [Problem(where, f"{ref}: {line}") for line in lines]
        jobs.append(job.model_copy(update={"init_from_path": str(folder)}))
    return queue.model_copy(update={"jobs": jobs}), problems


def _settings_mismatch(name: str, lora: dict[str, Any], base_model: Any, job: ResolvedJob) -> list[str]:
    """What stops a job trained with ``lora`` on ``base_model`` (not trained yet) from starting ``job``."""
    out = []
    wanted = warm_start.WantedLora.of(job.spec.lora.model_dump(mode="json"))
    if lora.get("r") != wanted.r:
        out.append(f"{name} trains a LoRA of rank {lora.get('r')}; this job's lora.r is {wanted.r}: a job started "
                   f"from another's adapter keeps its rank, so set lora.r: {lora.get('r')}")
    if lora.get("target_modules") != wanted.targets:
        out.append(f"{name} trains LoRA on {lora.get('target_modules')}; this job's lora.target_modules is "
                   f"{wanted.targets}: a job started from another's adapter keeps the targets")
    if bool(lora.get("use_dora")) != wanted.use_dora:
        out.append(f"{name} {'is' if lora.get('use_dora') else 'is not'} a DoRA job; this job's lora.use_dora is "
                   f"{wanted.use_dora}")
    if base_model != job.base_model:
        out.append(f"{name} trains on {base_model}; this job's base_model is {job.base_model}: an adapter starts "
                   "only a job on its own base")
    return out


def check_dependencies(queue: Queue, home: Home, stored: Callable[[str], Job | None], label: str) -> list[Problem]:
    """Each ``after``: a job of this queue or of the home (``stored`` looks one up by name), in no cycle, not
    failed or cancelled, and able to start this job; a problem per job that cannot wait on it."""
    problems: list[Problem] = []
    in_queue = {job.name: job for job in queue.jobs}
    for job in queue.jobs:
        after = job.spec.after
        if after is None:
            continue
        where = f"{label}: job {job.name!r}: after"
        if after == job.name:
            problems.append(Problem(where, f"a job cannot wait on itself (after: {after})"))
            continue
        if job.spec.init_from is not None:
            problems.append(Problem(where, f"starts the job from {after}'s adapter; init_from names another start: "
                                           "drop one of the two"))
            continue
        if job.spec.lora.init != "default":
            problems.append(Problem(where, f"starts from {after}'s trained weights; lora.init {job.spec.lora.init!r} "
                                           "would initialise them afresh: drop one of the two"))
            continue
        if (dependency := in_queue.get(after)) is not None:
            lines = _settings_mismatch(after, dependency.spec.lora.model_dump(mode="json"), dependency.base_model, job)
        elif (existing := stored(after)) is not None and existing.name == after:
            if existing.status in ("failed", "cancelled"):
                lines = [f"{after} is {existing.status} in {home.root}: 'loraq retry {after}' first, or drop after"]
            elif existing.status == "completed":
                _, found = warm_start.published(home, after, job.spec.lora.model_dump(mode="json"), job.base_model)
                lines = [f"{after}: {line}" for line in found]
            else:
                lines = _settings_mismatch(after, existing.spec.settings.lora, existing.spec.base_model, job)
        else:
            lines = [f"no job named {after!r} in this queue or in {home.root}"]
        problems += [Problem(where, line) for line in lines]
    edges = {job.name: job.spec.after for job in queue.jobs if job.spec.after != job.name}
    if (loop := dependencies.cycle(edges)) is not None:
        problems.append(Problem(f"{label}: job {loop[0]!r}: after",
                                f"a cycle ({' -> '.join(loop)}): no job of it could ever start"))
    return problems


def with_auto(queue: Queue, reports: dict[str, Any]) -> Queue:
    """Every ``auto`` of every job replaced by the value the data analysis resolved it to."""
    jobs = []
    for job in queue.jobs:
        resolved = getattr(reports.get(job.name), "auto", None)
        if not resolved:
            jobs.append(job)
            continue
        training = job.spec.training.model_dump(mode="json")
        for key, entry in resolved.items():
            training[key.removeprefix("training.")] = entry["value"]
        spec = job.spec.model_copy(update={"training": TrainingSpec.model_validate(training)})
        jobs.append(job.model_copy(update={"spec": spec, "auto": resolved}))
    return queue.model_copy(update={"jobs": jobs})


def submitted_sha256(job: ResolvedJob) -> str:
    """The job as submitted (spec and resolved paths), hashed: what makes a resubmitted sweep job "the same"."""
    doc = job.model_dump(mode="json")
    doc.pop("queue_file", None)
    if doc.get("halving") is None:  # a job submitted before halving existed hashes as it did then
        doc.pop("halving", None)
    else:  # ...and a halving job as it did while its round was kept in its plan (migration 6)
        doc["halving"] = halving.SUBMITTED_AS | doc["halving"]
    if (doc.get("spec") or {}).get("after") is None:  # ...and one submitted before after existed (issue 23)
        doc["spec"].pop("after", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def identity(job: ResolvedJob) -> dict[str, Any]:
    """What the store keeps beside the job to recognise it, and its warm start's weights as checked."""
    out: dict[str, Any] = {"submitted_sha256": submitted_sha256(job)}
    if job.init_from_path:
        weights = Path(job.init_from_path) / "adapter_model.safetensors"
        out["init_from_sha256"] = fsutil.sha256_file(weights)
    return out


def same_sweep_job(stored: StoredJob, job: ResolvedJob) -> bool:
    """Whether the stored job is this job of a sweep, submitted before with the same settings."""
    return (job.spec.group is not None and stored.settings.group == job.spec.group
            and stored.submitted_sha256 == submitted_sha256(job))


def sweeps_of(queue: Queue) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for job in queue.jobs:
        if job.sweep is not None and job.spec.group is not None:
            out.setdefault(job.spec.group, []).append(job.name)
    return out


def _set(doc: dict[str, Any], key: str, value: Any) -> None:
    node = doc
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if part == "dataset" and node is doc and isinstance(child, str):
            child = {"path": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


#: Keys a clone's ``--set`` cannot give: they make a job one of a sweep (queue/sweep.py), which a copy never is.
CLONE_FIXED = ("group", "sweep", "sweep_strategy")


def clone_doc(stored: StoredJob, new_name: str, sets: list[str], label: str) -> dict[str, Any]:
    """A queue document of one job: the stored job as submitted, renamed, with ``key=value`` overrides.

    Paths are the ones resolved at submit (absolute); an ``auto`` of the original is
    ``auto`` again, so it is resolved for the copy's data. Raises :class:`SpecError`
    for an override that is not ``key=value``.
    """
    job = copy.deepcopy(stored.settings.doc)
    job["name"] = new_name
    job.pop("group", None)  # a clone is a job of its own, not one of the sweep
    if stored.plan is not None:  # and trains the sweep's full budget, not the round it was in
        job.setdefault("training", {})["max_steps"] = stored.plan.budget
    resolved = stored.auto or {}
    training = job.setdefault("training", {})
    for key in resolved:
        if key == "training.grad_accum":  # made up by batch_size: auto, not the job's own
            training.pop("grad_accum", None)
        else:
            training[key.removeprefix("training.")] = "auto"
    job["base_model"] = stored.base_model or job.get("base_model")
    job["dataset"] = dict(job.get("dataset") or {}) | {"path": stored.dataset_path}
    if stored.eval_dataset_path:
        job.setdefault("validation", {})["dataset"] = stored.eval_dataset_path
    if stored.init_from_path and not stored.settings.after:  # with after, the dependency's adapter, bound at claim
        job["init_from"] = stored.init_from_path
    problems = []
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(f"{label}: --set {item}", "expected key=value, e.g. training.learning_rate=1e-4"))
            continue
        if key == "name":
            problems.append(Problem(f"{label}: --set name", "the copy's name is the NEW argument"))
            continue
        if key.split(".")[0] in CLONE_FIXED:
            # A sweep's ranking (and a halving sweep's rounds) compare the jobs it was submitted with;
            # a copy set into one would be ranked against configurations it was never part of.
            problems.append(Problem(f"{label}: --set {key}", "a clone is one job of its own, in no sweep: it cannot "
                                    "join a sweep's group or start one (submit a queue file with the sweep instead)"))
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            problems.append(Problem(f"{label}: --set {key}", f"not a YAML value: {getattr(exc, 'problem', exc)}"))
            continue
        _set(job, key, value)
    if problems:
        raise SpecError(problems)
    # The serving gate its queue gave the job goes with the copy (only the job keeps it; the home's settings stay).
    return {"jobs": [job]} | ({"serving": list(stored.serving)} if stored.serving else {})

