"""Publishing: a staged adapter becomes ``adapters/<name>/`` in one rename, under the lease.

The worker writes the manifest, model card and inspection report into the staging
folder, fsyncs it, and renames it into ``adapters/`` inside a store transaction
that first checks its fencing epoch still owns the job. A worker killed between
the rename and the commit leaves a published adapter whose manifest names the job
and attempt: the next worker recognises it and completes the job exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .. import fsutil
from ..errors import PathError, PublishConflict
from ..queue.records import Claim, Job, StoredJob
from ..queue.store import Store
from ..sandbox import open_regular, read_fd
from ..workspace import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Home

MANIFEST = "loraq-manifest.json"
#: The job's own chat template (``chat_template``), as transformers names a tokenizer's template file.
CHAT_TEMPLATE = "chat_template.jinja"
#: Where a folder found under a job's name in adapters/, but not made by it, is moved.
SET_ASIDE = "set-aside"
INSPECTION = "inspection.json"
MODEL_CARD = "README.md"
WEIGHTS, CONFIG = ADAPTER_WEIGHTS, ADAPTER_CONFIG


#: A manifest or inspection report is a few KB; a bigger file is not one of ours.
MAX_METADATA_BYTES = 16 << 20


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a regular file (never a FIFO or a device planted under the name), or ``None``."""
    try:
        fd = open_regular(path, what="metadata")
    except (PathError, OSError, ValueError):
        return None
    try:
        raw = read_fd(fd, MAX_METADATA_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > MAX_METADATA_BYTES:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    return _read_json(folder / MANIFEST)


def spec_sha256(job: Job) -> str:
    """A digest of everything the job was submitted with (spec, paths, dataset identity)."""
    return hashlib.sha256(json.dumps(job.spec.doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_manifest(claim: Claim, result: dict[str, Any], staging: Path, home_id: str | None = None) -> dict[str, Any]:
    job = claim.job
    files = {}
    for name in (CONFIG, WEIGHTS):
        path = staging / name
        files[name] = {"bytes": path.stat().st_size, "sha256": fsutil.sha256_file(path)}
    return {
        "loraq_manifest": 1,
        # Which home, job, attempt and inputs made this folder: a restart adopts a published
        # folder only when every one of them is this home's job's (see ``foreign``).
        "home_id": home_id,
        "spec_sha256": spec_sha256(job),
        "job_id": job.id,
        "name": job.name,
        "attempt": claim.attempt,
        "epoch": claim.epoch,
        "created_at": time.time(),
        "base_model": job.spec.base_model,
        "revision": job.spec.settings.revision,
        "dataset": {"path": job.spec.dataset_path, "sha256": job.dataset_sha256,
                    "format": result.get("dataset_format") or job.spec.settings.dataset_format,
                    "n_train": result.get("n_train"), "n_eval": result.get("n_eval")},
        "spec": job.spec.settings.doc,
        "versions": result.get("versions", {}),
        "train_loss": result.get("train_loss"),
        "eval_loss": result.get("eval_loss"),
        "base_eval_loss": result.get("base_eval_loss"),
        "metrics": result.get("metrics") or {},  # exact_match and base_exact_match, when the job asked for them
        "steps": result.get("steps"),
        "resumed_from": result.get("resumed_from"),
        "files": files,
        # the training controls (issue 12): what was resolved, adjusted and chosen
        "auto": job.spec.auto,
        "sweep": {"group": job.spec.settings.group, "settings": job.spec.sweep} if job.spec.sweep else None,
        "init_from": {"path": job.spec.init_from_path, "sha256": job.spec.init_from_sha256}
        if job.spec.init_from_path else None,
        "oom_adjustments": list(job.spec.oom_adjustments),
        # preference tuning (issue 23): the method, its settings, and the adapter it started from
        "method": _method_entry(job.spec, result),
        "stopping": (result.get("extras") or {}).get("stopping"),
        # a job's own chat template, written beside the adapter: a server renders prompts as training did
        "chat_template": _template_entry(job.spec),
    }


def _method_entry(stored: StoredJob, result: dict[str, Any]) -> dict[str, Any]:
    method = stored.settings.method
    if method is None:
        return {"type": "sft"}
    preference = (result.get("extras") or {}).get("preference") or {}
    return {**method, "reference": preference.get("reference"), "started_from": stored.init_from_path,
            "after": stored.settings.after}


def _template_entry(stored: StoredJob) -> dict[str, Any] | None:
    text = stored.chat_template_text
    if text is None:
        return None
    return {"name": stored.settings.chat_template, "file": CHAT_TEMPLATE, "source": stored.chat_template_path,
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def model_card(manifest: dict[str, Any], inspection: dict[str, Any]) -> str:
    settings = manifest["spec"]
    lora, training = settings.get("lora", {}), settings.get("training", {})

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        "---",
        "library_name: peft",
        f"base_model: {manifest['base_model']}",
        "tags: [lora, loraq]",
        "---",
        "",
        f"# {manifest['name']}",
        "",
        f"A LoRA adapter for `{manifest['base_model']}`, trained by loraq (job {manifest['job_id']}, attempt {manifest['attempt']}).",
        "",
        "| | |",
        "| --- | --- |",
        f"| dataset | `{Path(manifest['dataset']['path']).name}` ({manifest['dataset'].get('format')}), sha256 `{str(manifest['dataset'].get('sha256'))[:16]}…` |",
        f"| rows | {manifest['dataset'].get('n_train')} train / {manifest['dataset'].get('n_eval')} eval |",
        f"| LoRA | r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, targets={lora.get('target_modules')} |",
        *([f"| method | {_method_line(manifest['method'])} |"] if (manifest.get("method") or {}).get("type", "sft") != "sft"
          else []),
        f"| training | {manifest.get('steps')} steps, lr={training.get('learning_rate')}, batch={training.get('batch_size')}×{training.get('grad_accum')}, seed={training.get('seed')} |",
        f"| eval loss | base {fmt(manifest.get('base_eval_loss'))} → adapter {fmt(manifest.get('eval_loss'))} |",
        *([f"| exact match | base {fmt(manifest['metrics'].get('base_exact_match'))} → adapter "
           f"{fmt(manifest['metrics'].get('exact_match'))} (greedy answers to the eval prompts) |"]
          if "exact_match" in (manifest.get("metrics") or {}) else []),
        *[f"| {name} | base {fmt((manifest.get('metrics') or {}).get(f'base_{name}'))} → adapter {fmt(value)} |"
          for name, value in (manifest.get("metrics") or {}).items()
          if not name.startswith("base_") and name != "exact_match"],
        f"| inspection | {'pass' if inspection.get('passed') else 'fail'} ({len(inspection.get('findings', []))} finding(s)) |",
        *([f"| chat template | `{manifest['chat_template']['name']}`, in `{CHAT_TEMPLATE}` beside the adapter: render "
           "prompts with it |"] if manifest.get("chat_template") else []),
        "| versions | " + ", ".join(f"{k} {v}" for k, v in sorted(manifest.get("versions", {}).items())) + " |",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({manifest['base_model']!r})",
        "model = PeftModel.from_pretrained(base, 'path/to/this/folder')",
        "```",
        "",
    ]
    return "\n".join(lines)


def _method_line(method: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in method.items()
                         if k not in ("type", "reference", "started_from", "after", "loss") and v is not None)
    started = (f"; started from `{method['started_from']}`" + (f" (job {method['after']})" if method.get("after") else "")
               if method.get("started_from") else "; started from the base")
    reference = f"; reference: {method['reference']}" if method.get("reference") else ""
    return f"{method['type'].upper()} ({settings}){started}{reference}"


def stage_metadata(staging: Path, manifest: dict[str, Any], inspection: dict[str, Any],
                   chat_template: str | None = None) -> None:
    if chat_template is not None:
        fsutil.atomic_write_text(staging / CHAT_TEMPLATE, chat_template)
    fsutil.atomic_write_json(staging / INSPECTION, inspection)
    fsutil.atomic_write_text(staging / MODEL_CARD, model_card(manifest, inspection))
    # The manifest is written last: its presence says the folder is complete.
    fsutil.atomic_write_json(staging / MANIFEST, manifest)


def publish(store: Store, home: Home, claim: Claim, staging: Path, result: dict[str, Any]) -> Path:
    """Rename ``staging`` to ``adapters/<name>`` and complete the job, both under the lease.

    If the commit fails after the rename (a full disk), the folder is renamed back, so
    the store and ``adapters/`` agree and the publish can be tried again whole.

    Raises :class:`~loraq.errors.LeaseLost` if the lease is gone (nothing is published),
    :class:`PublishConflict` if another job's adapter holds the name.
    """
    target = home.adapter_dir(claim.job.name)
    # The slow part (an fsync of every file) before the store's write lock, which every
    # other worker and 'loraq submit' wait on; only the rename and the commit inside it.
    fsutil.fsync_tree(staging)
    renamed = False
    try:
        with store.fenced(claim.job.id, claim.epoch) as conn:
            try:
                fsutil.publish_dir(staging, target, synced=True)
                renamed = True
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) or (target.exists() and any(target.iterdir())):
                    existing = read_manifest(target)
                    if existing and foreign(store, claim.job, existing) is None:
                        fsutil.remove_tree(staging)  # already published by an earlier attempt: keep that one
                    else:
                        raise PublishConflict(
                            f"{target} already holds an adapter"
                            + (f" of job {existing.get('job_id')}" if existing else "")
                            + " that this job did not make; move it away, then 'loraq retry' this job"
                        ) from exc
                else:
                    raise
            store.complete(claim.job.id, claim.epoch, result=result | {"adapter": str(target)}, conn=conn)
    except BaseException:
        if renamed:
            with contextlib.suppress(OSError):  # else reconcile finds it by its manifest
                os.rename(target, staging)
        raise
    return target


def read_inspection(folder: Path) -> dict[str, Any] | None:
    """The ``inspection.json`` of a published adapter, or ``None`` if it is missing or unreadable."""
    return _read_json(folder / INSPECTION)


def job_inspection(home: Home, job: Job) -> dict[str, Any] | None:
    """A job's inspection: the one recorded with its result, else the published adapter's."""
    recorded: dict[str, Any] | None = (job.result or {}).get("inspection")
    if recorded is not None:
        return recorded
    folder = home.adapter_dir(job.name)
    # A name is checked at submit, but a reader of the store (``loraq serve``) never follows
    # one that leads out of adapters/ (``../..``, a symlink).
    if not folder.resolve().is_relative_to(home.adapters_dir.resolve()) or folder.resolve() == home.adapters_dir.resolve():
        return None
    return read_inspection(folder)


def recovered_result(target: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The result to record for an adapter an earlier, killed attempt published (from its manifest)."""
    result = {k: manifest.get(k) for k in ("train_loss", "eval_loss", "base_eval_loss", "steps")}
    return result | {"adapter": str(target), "recovered": True, "published_by_attempt": manifest.get("attempt"),
                     "inspection": read_inspection(target) or {}}


def foreign(store: Store, job: Job, manifest: dict[str, Any]) -> str | None:
    """Why a published folder's manifest was not made by ``job`` of this home (``None``: it was).

    Job ids restart at 1 in every home, so an id alone proves nothing: the home's id
    (written into its database when it was made), the job's id and name, an attempt of
    this job with the manifest's epoch, and the digests of the job's spec and dataset
    must all be this job's.
    """
    if manifest.get("home_id") is None or manifest.get("home_id") != store.home_id():
        return "it was made in another home (or by a loraq that did not record its home)"
    if manifest.get("job_id") != job.id or manifest.get("name") != job.name:
        return f"it names job {manifest.get('job_id')} ({str(manifest.get('name'))[:40]!r})"
    epochs = {(a.n, a.epoch) for a in store.attempts(job.id)}
    if (manifest.get("attempt"), manifest.get("epoch")) not in epochs:
        return f"no attempt of this job has epoch {manifest.get('epoch')}"
    if manifest.get("spec_sha256") != spec_sha256(job):
        return "it was trained from another spec"
    if (manifest.get("dataset") or {}).get("sha256") != job.dataset_sha256:
        return "it was trained on another dataset"
    return None


def set_aside(home: Home, store: Store, job: Job, why: str) -> Path | None:
    """Move ``adapters/<name>`` (not this job's) to ``<home>/set-aside/``, kept for a person to look at."""
    source = home.adapter_dir(job.name)
    target = home.root / SET_ASIDE / f"{job.name}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:6]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return None
    store.note(job.id, f"{source} held an adapter this job did not make ({why}); moved to {target}; training it")
    return target


def adopt_published(store: Store, home: Home, claim: Claim) -> dict[str, Any] | None:
    """Complete a freshly claimed job whose adapter an earlier, killed attempt published.

    Returns the manifest if the job was completed this way, ``None`` if there is nothing
    to adopt. The claim's fresh epoch makes the completion exactly-once. A folder that
    this job did not make (:func:`foreign`) is moved aside, and the job trains.
    """
    target = home.adapter_dir(claim.job.name)
    if not target.exists() and not target.is_symlink():
        return None
    manifest = read_manifest(target)
    why = foreign(store, claim.job, manifest) if manifest else "it has no readable manifest"
    if manifest is None or why is not None:
        set_aside(home, store, claim.job, why or "it has no readable manifest")
        return None
    store.complete(claim.job.id, claim.epoch, result=recovered_result(target, manifest))
    return manifest
