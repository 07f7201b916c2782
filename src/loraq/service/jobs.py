"""Fine-tuning jobs as OpenAI shapes them, made of loraq jobs.

A create request becomes one job of a queue document, submitted through
:func:`loraq.api.submit_document`: checked as a queue file's job is, then a job in the
queue like any other (``loraq status``, the dashboard and ``loraq run`` see it; its
name is its API id). Hyperparameters map to the job's settings:

- ``n_epochs`` -> ``training.epochs``, ``batch_size`` -> ``training.batch_size`` (the
  examples a step), ``learning_rate_multiplier`` -> ``training.learning_rate`` =
  multiplier x 2e-4 (loraq's base rate for LoRA); each ``"auto"`` stays ``auto``
  (loraq's rules: OpenAI's for epochs and batch size).
- ``seed`` -> ``training.seed``; ``validation_file`` -> ``validation.dataset``.
- Settings OpenAI's schema lacks come as extra body keys: ``lora_r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules``, ``max_steps``, ``max_seq_len``, or whole
  ``lora`` / ``training`` / ``validation`` sections as in a queue file; anything
  else is an error. Nothing a request sends is a path: the base model is a name from
  the home's ``config.yaml`` ``models:``, files are ids.
"""

from __future__ import annotations

import math
import re
import secrets
from pathlib import Path
from typing import Any

from .. import api, checkpoints
from ..errors import DataError, NotFoundError, ProblemsError, SpecError
from ..escape import excerpt
from ..queue import auto
from ..queue.records import CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, Job
from ..queue.spec import MAX_PRIORITY
from ..workspace import Home
from .errors import ApiError, bad_request, not_found
from .files import blob_path, purge
from .state import OPERATOR, ApiJob, ApiState

ID_PREFIX = "ftjob-"
#: Top-level keys of a create request: OpenAI's, then loraq's (``extra_body``).
OPENAI_KEYS = ("model", "training_file", "validation_file", "suffix", "seed", "metadata", "hyperparameters", "method",
               "integrations")
FLAT_EXTRAS = {"lora_r": ("lora", "r"), "lora_alpha": ("lora", "alpha"), "lora_dropout": ("lora", "dropout"),
               "target_modules": ("lora", "target_modules"), "max_steps": ("training", "max_steps"),
               "max_seq_len": ("training", "max_seq_len")}
SECTIONS = ("lora", "training", "validation")
PLAIN_EXTRAS = {"priority": int, "max_retries": int}
#: Settings of a queue file's job that name files or run code: never from a request.
#: A judge would have the server send the eval answers, and any of its environment's keys (``api_key_env``), to a
#: URL the caller names: the operator sets judges in queue files.
REFUSED = {"validation.dataset": "give validation_file (an uploaded file's id)",
           "lora.modules_to_save": None,
           "validation.judge": "a judge sends the answers and a key of the server's to its endpoint; the operator "
                               "sets judges in queue files"}
CHECKPOINT_PREFIX = "ckpt-step-"
CHECKPOINT_LABEL = re.compile(re.escape(CHECKPOINT_PREFIX) + r"([0-9]{1,9})")
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")
METHODS = ("supervised", "dpo")
#: OpenAI's ``validating_files`` is never shown: a create answers only once the files are checked (each upload row by
#: row, then the job's dataset against its base's tokenizer, format and method, as ``loraq submit`` checks one), so no
#: job exists whose files are unchecked; the worker's tokenising after its claim is part of ``running``.
STATUS = {PENDING: "queued", RUNNING: "running", COMPLETED: "succeeded", FAILED: "failed", CANCELLED: "cancelled"}


# ---------------------------------------------------------------- create


def _int_or_auto(value: Any, param: str, low: int, high: int) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"{param} must be 'auto' or an integer from {low} to {high} (got {excerpt(value)})", param,
                          "invalid_value")
    return value


def _hyperparameters(given: Any, param: str, method: str) -> dict[str, Any]:
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise bad_request(f"{param} must be an object", param, "invalid_type")
    allowed = {"n_epochs", "batch_size", "learning_rate_multiplier"} | ({"beta"} if method == "dpo" else set())
    for key in given:
        if key not in allowed:
            raise bad_request(f"{param}.{excerpt(key)}: unknown hyperparameter (known: {', '.join(sorted(allowed))})",
                              f"{param}.{key}", "unknown_parameter")
    training: dict[str, Any] = {}
    if "n_epochs" in given:
        training["epochs"] = _int_or_auto(given["n_epochs"], f"{param}.n_epochs", 1, 1000)
    if "batch_size" in given:
        training["batch_size"] = _int_or_auto(given["batch_size"], f"{param}.batch_size", 1, 4096)
    if "learning_rate_multiplier" in given:
        lrm = given["learning_rate_multiplier"]
        if lrm == "auto":
            training["learning_rate"] = "auto"
        elif isinstance(lrm, bool) or not isinstance(lrm, int | float) or not math.isfinite(lrm) or not 0 < lrm <= 100:
            raise bad_request(f"{param}.learning_rate_multiplier must be 'auto' or a number in (0, 100] "
                              f"(got {excerpt(lrm)})", f"{param}.learning_rate_multiplier", "invalid_value")
        else:
            training["learning_rate"] = float(f"{auto.BASE_LR * lrm:.6g}")
    return training


def preference_methods() -> bool:
    """Whether this loraq's job spec has preference tuning (``method: {type: dpo, beta: ...}``)."""
    from ..queue.spec import JobSpec

    return "method" in JobSpec.model_fields


def _method(body: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """The method's type, the training settings its hyperparameters give, and the job's ``method`` (DPO)."""
    method = body.get("method")
    top = _hyperparameters(body.get("hyperparameters"), "hyperparameters", "supervised")
    if method is None:
        return "supervised", top, None
    if not isinstance(method, dict):
        raise bad_request("method must be an object", "method", "invalid_type")
    kind = method.get("type")
    if kind not in METHODS:
        raise bad_request(f"method.type must be one of {', '.join(METHODS)} (got {excerpt(kind)})", "method.type",
                          "invalid_value")
    for key in method:
        if key not in ("type", kind):
            raise bad_request(f"method.{excerpt(key)}: unknown key for method.type {kind!r}", f"method.{key}",
                              "unknown_parameter")
    if kind == "dpo" and not preference_methods():
        raise bad_request("method.type 'dpo' is not offered by this server yet: loraq's queue has no preference "
                          "method in this version; use 'supervised'", "method.type", "unsupported_method")
    inner = method.get(kind) or {}
    if not isinstance(inner, dict) or set(inner) - {"hyperparameters"}:
        raise bad_request(f"method.{kind} must be an object with only 'hyperparameters'", f"method.{kind}",
                          "invalid_value")
    given = inner.get("hyperparameters")
    nested = _hyperparameters(given, f"method.{kind}.hyperparameters", kind)
    if top and nested:
        raise bad_request("give the hyperparameters in method or at the top level, not both", "hyperparameters",
                          "invalid_value")
    if kind != "dpo":
        return kind, nested or top, None
    beta = given.get("beta", "auto") if isinstance(given, dict) else "auto"
    if beta != "auto" and (isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta)):
        raise bad_request("method.dpo.hyperparameters.beta must be 'auto' or a number", "method.dpo.hyperparameters.beta",
                          "invalid_value")
    return kind, nested or top, {"type": "dpo", **({"beta": float(beta)} if beta != "auto" else {})}


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16:
        raise bad_request("metadata must be an object of at most 16 string keys and values", "metadata",
                          "invalid_type")
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64 or '"' in key or "\\" in key:
            raise bad_request(f"metadata key {excerpt(key)}: a string of 1-64 characters", "metadata", "invalid_value")
        if not isinstance(item, str) or len(item) > 512:
            raise bad_request(f"metadata[{excerpt(key)}]: a string of at most 512 characters", f"metadata.{key}",
                              "invalid_value")
    return dict(value)


def _extras(body: dict[str, Any]) -> dict[str, Any]:
    """loraq's settings from the extra body keys, as a queue file's job sections (checked by its schema)."""
    job: dict[str, Any] = {}
    for key, value in body.items():
        if key in OPENAI_KEYS:
            continue
        if key in FLAT_EXTRAS:
            section, field = FLAT_EXTRAS[key]
            job.setdefault(section, {})[field] = value
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise bad_request(f"{key} must be an object (the queue file's {key} section)", key, "invalid_type")
            for field, item in value.items():
                if job.get(key, {}).get(field, item) != item:
                    raise bad_request(f"{key}.{excerpt(field)} is given twice", f"{key}.{field}", "invalid_value")
                job.setdefault(key, {})[field] = item
        elif key in PLAIN_EXTRAS:
            job[key] = value
        else:
            raise bad_request(f"{excerpt(key)}: unknown parameter (OpenAI's: {', '.join(OPENAI_KEYS)}; loraq's: "
                              f"{', '.join([*FLAT_EXTRAS, *SECTIONS, *PLAIN_EXTRAS])})", str(key)[:100],
                              "unknown_parameter")
    for dotted, hint in REFUSED.items():
        section, field = dotted.split(".")
        if field in (job.get(section) or {}):
            raise bad_request(f"{dotted} is not accepted through the API" + (f": {hint}" if hint else ""), dotted,
                              "unknown_parameter")
    if isinstance(job.get("priority"), int) and abs(job["priority"]) > MAX_PRIORITY:
        raise bad_request("priority is out of range", "priority", "invalid_value")
    return job


def base_models(home: Home) -> dict[str, str]:
    """The bases this home offers (``models:`` in config.yaml): name -> folder or hub id."""
    try:
        named = home.config().models
    except SpecError:
        return {}
    return {name: home.model_folder(value) for name, value in named.items()}


def create(home: Home, state: ApiState, key_id: int, body: Any) -> ApiJob:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: the name of a base model this server offers", "model", "missing")
    bases = base_models(home)
    if model not in bases:
        raise ApiError(404, f"The model `{excerpt(model, 100)}` does not exist or you do not have access to it.",
                       "model", "model_not_found")
    training_id = body.get("training_file")
    if not isinstance(training_id, str) or not training_id:
        raise bad_request("training_file is required: the id of an uploaded file", "training_file", "missing")
    validation_id = body.get("validation_file")
    if validation_id is not None and not isinstance(validation_id, str):
        raise bad_request("validation_file must be a file id", "validation_file", "invalid_type")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix)):
        raise bad_request("suffix must be 1-64 characters of letters, digits, '-' and '_'", "suffix", "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**31 - 1):
        raise bad_request("seed must be an integer from 0 to 2147483647", "seed", "invalid_value")
    metadata = _metadata(body.get("metadata"))
    integrations = body.get("integrations")
    if integrations not in (None, []):
        raise bad_request("integrations are not offered by this server", "integrations", "unsupported")
    method, training, method_doc = _method(body)
    job = _extras(body)
    if method_doc is not None:
        job["method"] = method_doc
    # OpenAI's defaults: every hyperparameter not given is "auto"
    job["training"] = {"epochs": "auto", "batch_size": "auto", "learning_rate": "auto", **training,
                       **(job.get("training") or {})}
    if seed is not None:
        job["training"]["seed"] = seed
    api_id = ID_PREFIX + secrets.token_hex(12)
    base = bases[model]
    job.update({"name": api_id, "base_model": base})
    record = {"api_id": api_id, "key_id": key_id, "model": model, "suffix": suffix, "metadata": metadata,
              "training_file": training_id, "validation_file": validation_id,
              "seed": seed if seed is not None else int(job["training"].get("seed", 42)),
              "request": {"method": method}}
    # the files' content is held from their lookup until the job is recorded: a delete meanwhile leaves it
    try:
        return _submit(home, state, body, job, record)
    finally:
        if state.release(api_id):
            purge(home, state)


def _submit(home: Home, state: ApiState, body: dict[str, Any], job: dict[str, Any], record: dict[str, Any]) -> ApiJob:
    """Enqueue ``job`` on the request's files (held for it), then record it as the API's."""
    api_id, key_id = record["api_id"], record["key_id"]
    try:
        train_file = state.hold_file(api_id, record["training_file"], key_id)
    except NotFoundError:
        raise not_found(f"No such File object: {excerpt(record['training_file'], 100)}", "training_file") from None
    if record["validation_file"] is not None:
        try:
            valid_file = state.hold_file(api_id, record["validation_file"], key_id)
        except NotFoundError:
            raise not_found(f"No such File object: {excerpt(record['validation_file'], 100)}",
                            "validation_file") from None
        job.setdefault("validation", {})["dataset"] = str(blob_path(home, valid_file))
    job["dataset"] = {"path": str(blob_path(home, train_file)), "format": train_file.format}
    base = job["base_model"]
    try:
        result = api.submit_document({"jobs": [job]}, home=home, label="request", queue_path=home.root / "api.yaml",
                                     allow_roots=[base] if base.startswith("/") else [])
    except (SpecError, DataError) as exc:
        # a setting given by its flat name (lora_r) is named so in the refusal
        flat = {".".join(dotted): key for key, dotted in FLAT_EXTRAS.items() if key in body}
        refusal = _refused(exc)
        refusal.param = flat.get(refusal.param or "", refusal.param)
        raise refusal from None
    return state.add_job(job_id=result.job_ids[0], **record)


def _refused(exc: ProblemsError) -> ApiError:
    """A submit's problems as one 400: the field of the first one as ``param``, every message in the text."""
    messages, param = [], None
    for problem in exc.problems[:5]:
        where = problem.where
        field = where.rsplit(": ", 1)[-1] if ": job " in where else None
        if ": line" in where or where.rsplit(":", 1)[-1].isdigit():
            field = "training_file"
        param = param or field
        messages.append(f"{field + ': ' if field else ''}{problem.message}")
    return bad_request("; ".join(messages) or str(exc), param, "invalid_value")


# ---------------------------------------------------------------- the job object


def fine_tuned_model(api_job: ApiJob) -> str:
    return f"ft:{api_job.model}:{api_job.suffix or ''}:{api_job.id}"


def is_published(home: Home, job: Job) -> bool:
    return job.status == COMPLETED and home.adapter_dir(job.name).is_dir()


def status_of(api_job: ApiJob, job: Job) -> str:
    if job.status == CANCELLED and api_job.paused:
        return "paused"
    return STATUS.get(job.status, job.status)


def _settings(job: Job) -> dict[str, Any]:
    """The job's training settings as stored (``auto`` resolved at submit)."""
    return dict(job.spec.settings.training)


def job_json(home: Home, api_job: ApiJob, job: Job, owner: str) -> dict[str, Any]:
    training = _settings(job)
    lr = training.get("learning_rate")
    hyper = {"n_epochs": training.get("epochs"), "batch_size": _examples(training),
             "learning_rate_multiplier": round(lr / auto.BASE_LR, 6) if isinstance(lr, int | float) else lr}
    if isinstance(hyper["n_epochs"], float) and hyper["n_epochs"].is_integer():
        hyper["n_epochs"] = int(hyper["n_epochs"])
    status = status_of(api_job, job)
    error = None
    if job.status == FAILED:
        error = {"code": job.error_kind or "failed", "message": job.error or "the job failed", "param": None}
    published = is_published(home, job)
    method = api_job.request.get("method", "supervised")
    return {
        "object": "fine_tuning.job", "id": api_job.id, "created_at": int(api_job.created_at), "model": api_job.model,
        "fine_tuned_model": fine_tuned_model(api_job) if published else None,
        "finished_at": int(job.finished_at) if job.finished_at and status in ("succeeded", "failed", "cancelled")
        else None,
        "status": status, "error": error, "hyperparameters": hyper,
        "method": {"type": method, method: {"hyperparameters": hyper}},
        "organization_id": owner, "result_files": [], "seed": api_job.seed,
        "training_file": api_job.training_file, "validation_file": api_job.validation_file,
        "trained_tokens": None, "estimated_finish": None, "integrations": [], "metadata": api_job.metadata,
        "user_provided_suffix": api_job.suffix,
    }


def _examples(training: dict[str, Any]) -> Any:
    batch = training.get("batch_size")
    if isinstance(batch, int):
        return batch * int(training.get("grad_accum") or 1)
    return batch


# ---------------------------------------------------------------- events and checkpoints


def events(home: Home, api_job: ApiJob) -> list[dict[str, Any]]:
    """Every event of the job, newest first: state changes (``message``) and training steps (``metrics``)."""
    with api.open_reader(home) as store:
        stored = store.events(api_job.job_id)
        rows = store.metrics(api_job.job_id)
    out: list[dict[str, Any]] = []
    for event in stored:
        level = "error" if event.to_state == FAILED else "warn" if (event.from_state, event.to_state) == (
            RUNNING, PENDING) else "info"
        moved = f"{STATUS.get(event.from_state or '', event.from_state)} -> {STATUS.get(event.to_state or '', event.to_state)}" \
            if event.to_state else None
        text = "; ".join(t for t in (moved, event.reason) if t) or "event"
        if event.from_state is None and event.to_state == PENDING:
            text = f"Created fine-tuning job: {api_job.id}"
        out.append({"object": "fine_tuning.job.event", "id": f"ftevent-m{event.id}", "created_at": int(event.ts),
                    "level": level, "message": text, "type": "message",
                    "data": {"from": event.from_state, "to": event.to_state, "actor": event.actor}, "_ts": event.ts,
                    "_order": (event.ts, 0, event.id)})
    steps: dict[tuple[int, int], dict[str, Any]] = {}
    for row in rows:
        entry = steps.setdefault((row["attempt"], row["step"]), {"step": row["step"], "ts": row["ts"]})
        name = {"loss": "train_loss", "eval_loss": "valid_loss"}.get(row["name"], row["name"])
        entry[name] = row["value"]
        entry["ts"] = max(entry["ts"], row["ts"])
    for (attempt, step), entry in steps.items():
        ts = entry.pop("ts")
        data = {"step": step, **entry}
        losses = ", ".join(f"{k} {v:.4f}" for k, v in data.items() if k.endswith("_loss") and isinstance(v, float))
        out.append({"object": "fine_tuning.job.event", "id": f"ftevent-s{api_job.job_id}-{attempt}-{step}",
                    "created_at": int(ts), "level": "info", "message": f"Step {step}: {losses}".rstrip(": "),
                    "type": "metrics", "data": data, "_order": (ts, 1, attempt * 10**9 + step)})
    out.sort(key=lambda e: e.pop("_order"), reverse=True)
    for item in out:
        item.pop("_ts", None)
    return out


def checkpoints_json(home: Home, api_job: ApiJob) -> list[dict[str, Any]]:
    """The job's checkpoints, newest first, each with its step's metrics.

    While a job trains (or is paused) these are its complete checkpoint folders; a
    succeeded job's are removed by the worker once it is published, and its published
    adapter is its final checkpoint, as OpenAI lists the final step's.
    """
    with api.open_reader(home) as store:
        rows = store.metrics(api_job.job_id)
        job = store.job(api_job.job_id)
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:  # a later attempt's value for a step replaces an earlier one's
        by_step.setdefault(row["step"], {})[row["name"]] = row["value"]
    found: dict[int, float] = {}
    for ckpt in checkpoints.complete_checkpoints(home.job_dir(api_job.job_id)):
        try:
            found[ckpt.step] = Path(ckpt.path).stat().st_mtime
        except OSError:
            continue
    if is_published(home, job) and job.progress_step:
        found.setdefault(job.progress_step, job.finished_at or api_job.created_at)
    out = []
    for step in sorted(found, reverse=True):
        metrics = by_step.get(step, {})
        out.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{api_job.job_id}-{step}",
                    "created_at": int(found[step]), "fine_tuning_job_id": api_job.id, "step_number": step,
                    "fine_tuned_model_checkpoint": f"{fine_tuned_model(api_job)}:{CHECKPOINT_PREFIX}{step}",
                    "metrics": {"step": float(step), "train_loss": metrics.get("loss"),
                                "valid_loss": metrics.get("eval_loss"), "full_valid_loss": metrics.get("eval_loss")}})
    return out


def checkpoint_adapter(home: Home, job: Job, label: str) -> Path | None:
    """The adapter folder of the checkpoint ``label`` (``ckpt-step-<n>``, as :func:`checkpoints_json` names it), or
    ``None``: a complete checkpoint folder of the job's (the newest attempt's at that step), or, for a succeeded job's
    final step, its published adapter."""
    found = CHECKPOINT_LABEL.fullmatch(label)
    if found is None:
        return None
    step = int(found.group(1))
    if is_published(home, job) and step == job.progress_step:
        return home.adapter_dir(job.name)
    folders = [c.path for c in checkpoints.complete_checkpoints(home.job_dir(job.id)) if c.step == step]
    if folders and (folders[-1] / "adapter_config.json").is_file():
        return folders[-1]
    return None


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page over ``items`` (already in order): those after the id ``after``, at most ``limit``."""
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    chosen = items[start:start + limit]
    return list_json(chosen, start + limit < len(items))


def list_json(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


# ---------------------------------------------------------------- pause, resume, cancel


def owned(state: ApiState, api_id: str, key_id: int) -> ApiJob:
    try:
        return state.job(api_id, key_id)
    except NotFoundError:
        raise not_found(f"No such fine-tuning job: {excerpt(api_id, 100)}", "fine_tuning_job_id") from None


def act(home: Home, state: ApiState, api_job: ApiJob, verb: str) -> None:
    """cancel | pause | resume. A pause is a cancel the API remembers; resume retries it from its newest checkpoint."""
    with api.open_reader(home) as store:
        job = store.job(api_job.job_id)
    if verb in ("cancel", "pause"):
        if job.status == CANCELLED and api_job.paused and verb == "cancel":
            state.set_paused(api_job.id, False)  # a paused job, cancelled: it stays cancelled, and says so
            return
        if job.status not in (PENDING, RUNNING):
            raise bad_request(f"Job {api_job.id} is {status_of(api_job, job)}: only a queued or running job can be "
                              f"{'cancelled' if verb == 'cancel' else 'paused'}", None, "invalid_state")
        if verb == "pause":
            state.set_paused(api_job.id, True)
        result = api.cancel(home, [str(api_job.job_id)])
        if result.refused:
            if verb == "pause":
                state.set_paused(api_job.id, False)
            raise bad_request("; ".join(result.refused), None, "invalid_state")
        return
    if not (job.status == CANCELLED and api_job.paused):
        raise bad_request(f"Job {api_job.id} is {status_of(api_job, job)}: only a paused job can be resumed", None,
                          "invalid_state")
    result = api.retry(home, [str(api_job.job_id)])
    if result.refused:
        raise bad_request("; ".join(result.refused), None, "invalid_state")
    state.set_paused(api_job.id, False)


def owner_label(key_id: int) -> str:
    return "operator" if key_id == OPERATOR else f"key-{key_id}"
