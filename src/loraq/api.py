"""The library API: one typed function per command, returning a result object.

The CLI only parses arguments and prints what these return; tests and scripts
call them directly. Nothing here prints. Functions on the supervisor side
(``status``, ``show``, ``cancel`` ...) never import torch; ``run`` starts trainer
processes that do. What the read-only commands return (``status``, ``show``, logs)
is built in :mod:`loraq.views` and exported here with the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import NotFoundError, Problem, SpecError, TransitionError, UsageError
from .queue.records import QueueState
from .queue.store import Store
from .supervisor import publish

# What `run` tells its observer, and what the read-only commands return: importable from the api.
from .supervisor.events import Claimed as Claimed
from .supervisor.events import Completed as Completed
from .supervisor.events import Fault as Fault
from .supervisor.events import FaultCleared as FaultCleared
from .supervisor.events import JobFailed as JobFailed
from .supervisor.events import JobOomAdjusted as JobOomAdjusted
from .supervisor.events import JobProgress as JobProgress
from .supervisor.events import JobStarted as JobStarted
from .supervisor.events import JobStopped as JobStopped
from .supervisor.events import LeaseExpired as LeaseExpired
from .supervisor.events import Lost as Lost
from .supervisor.events import Observer as Observer
from .supervisor.events import Reclaimed as Reclaimed
from .supervisor.events import Recovered as Recovered
from .supervisor.events import Recycled as Recycled
from .supervisor.events import RoundEnded as RoundEnded
from .supervisor.events import RunEvent as RunEvent
from .supervisor.events import RunEventKind as RunEventKind
from .supervisor.events import Stalled as Stalled
from .supervisor.events import Stopping as Stopping
from .supervisor.events import StoppingNow as StoppingNow
from .views import JobRow as JobRow
from .views import QueuePage as QueuePage
from .views import ShowResult as ShowResult
from .views import StatusResult as StatusResult
from .views import adjustment_line as adjustment_line
from .views import control_lines as control_lines
from .views import describe_halving as describe_halving
from .views import follow_log as follow_log
from .views import log_path as log_path
from .views import newest_log as newest_log
from .views import open_reader as open_reader
from .views import queue_page as queue_page
from .views import show as show
from .views import status as status
from .views import store_exists as store_exists
from .workspace import Home

if TYPE_CHECKING:
    from .demo import DemoFiles
    from .executors.base import Executor
    from .inspect import Inspection

#: The version of the CLI's ``--json`` outputs (their ``"version"`` key); see the README.
JSON_VERSION = 1

# ---------------------------------------------------------------- submit


@dataclass(frozen=True)
class SubmitResult:
    queue_file: str
    dry_run: bool
    job_names: list[str]
    job_ids: list[int]
    datasets: dict[str, Any]  # job name -> dataset report (datacheck.DatasetReport)
    sweeps: dict[str, list[str]] = field(default_factory=dict)  # sweep name -> the names of its jobs
    already: list[str] = field(default_factory=list)  # jobs of a sweep already in the home, as submitted: left as they are
    halving: dict[str, dict[str, Any]] = field(default_factory=dict)  # sweep name -> its halving plan
    after: dict[str, str] = field(default_factory=dict)  # job name -> the job it waits on and starts from

    def to_json(self) -> dict[str, Any]:
        from .data import check as datacheck

        return {"queue": self.queue_file, "dry_run": self.dry_run, "ok": True, "jobs": [
            {"name": name, "id": self.job_ids[i] if self.job_ids else None,
             "dataset": datacheck.report_json(self.datasets[name]) if name in self.datasets else None}
            for i, name in enumerate(self.job_names)], "sweeps": self.sweeps, "already": self.already,
            "halving": self.halving}

    def describe(self, name: str) -> list[str]:
        """What the submit-time check found in a job's dataset, a line each (``--dry-run``)."""
        from .data import check as datacheck

        waits = [f"after: {self.after[name]} (waits until it completes; starts from its adapter)"] \
            if name in self.after else []
        return waits + datacheck.describe(self.datasets.get(name))

    def summary(self, name: str) -> str:
        from .data import check as datacheck

        report = self.datasets.get(name)
        return datacheck.summary(report) if report is not None else "enqueued"


def rejected_json(queue_file: str | Path, dry_run: bool, problems: Sequence[Problem]) -> dict[str, Any]:
    """A rejected submit as JSON: every problem with its typed category."""
    from .data import check as datacheck

    return {"queue": str(queue_file), "dry_run": dry_run, "ok": False, "problems": datacheck.problems_to_json(problems)}


def open_store(home: Home, *, create: bool = True, check: bool = False) -> Store:
    return Store.open(home.db_path, create=create, check=check)


def submit(queue_file: str | Path, *, home: Home, allow_roots: Iterable[str | Path] = (), dry_run: bool = False,
           allow_remote_code: bool = False) -> SubmitResult:
    """Validate every job of a queue file and enqueue all of them, or none.

    ``--dry-run`` refuses exactly what a real submit refuses; a refused submit (and a
    dry run) writes nothing into the home. ``allow_remote_code`` (or
    ``allow_remote_code: true`` in the home's config.yaml) lets jobs set
    ``trust_remote_code``. Raises :class:`SpecError` (or :class:`DataError`)
    listing every problem found.
    """
    from .queue import spec

    path = Path(queue_file).expanduser()
    roots = home.roots(queue_dir=path.absolute().parent, extra=allow_roots)
    queue = spec.load_queue(path, roots, allow_remote_code=allow_remote_code or home.config().allow_remote_code)
    return _submit_queue(queue, str(queue_file), path, home=home, roots=roots, dry_run=dry_run)


def submit_document(doc: dict[str, Any], *, home: Home, label: str, queue_path: Path,
                    allow_roots: Iterable[str | Path] = ()) -> SubmitResult:
    """Validate the jobs of a queue document built in memory (the /v1 API's) and enqueue them all, or none.

    Checked exactly as a queue file's jobs are (schema, paths inside the roots, every
    dataset row, the base model's tokenizer); ``queue_path`` is where relative paths
    would start (the document's paths are absolute). The home's queue settings are
    left as they are. Raises :class:`SpecError` or :class:`DataError` listing every problem.
    """
    from .queue import spec

    roots = home.roots(queue_dir=queue_path.parent, extra=allow_roots)
    queue = spec.queue_from_doc(doc, queue_path, roots, where=label, allow_remote_code=False)
    return _submit_queue(queue, label, queue_path, home=home, roots=roots, dry_run=False, queue_settings=False)


def _submit_queue(queue: Any, label: str, path: Path, *, home: Home, roots: Any, dry_run: bool,
                  queue_settings: bool = True) -> SubmitResult:
    """Check a validated queue's data (and warm starts) and enqueue all its jobs, or none."""
    from . import submitting
    from .data import ReadLimits, templates
    from .data import check as datacheck
    from .errors import DataError
    from .queue.records import NewJob

    queue_file = label
    try:
        limits = ReadLimits.of(home.config().limits)
    except DataError as exc:
        raise SpecError([Problem(str(home.config_path), p.message) for p in exc.problems]) from None
    # Dependencies (after) on the queue as validated: every job is in it, whatever a later check finds.
    if store_exists(home):
        with open_reader(home) as store:
            problems = submitting.check_dependencies(queue, home, store.job_named, label)
    else:
        problems = submitting.check_dependencies(queue, home, lambda name: None, label)
    queue, found_warm = submitting.resolve_warm_starts(queue, home, roots, label)
    problems += found_warm
    queue, found_templates = templates.resolve_queue_templates(queue, roots, label)
    problems += found_templates
    # Profiles for the token cache are written only once the submit is accepted (and never by a dry run).
    deferred: list[Any] = []
    reports, found = datacheck.analyze_queue(queue, cache_dir=datacheck.cache_dir_of(home.root), roots=roots,
                                             limits=limits, deferred=deferred)
    problems += list(found) + _serving_problems(queue, str(queue_file))
    queue = submitting.with_auto(queue, reports)
    already: list[str] = []
    if store_exists(home):
        with open_reader(home) as store:
            for job in queue.jobs:
                existing = store.job_named(job.name)
                if existing is None:
                    continue
                if existing.name == job.name and submitting.same_sweep_job(existing.spec, job):
                    already.append(job.name)  # the same sweep submitted again: nothing new
                    continue
                same = "" if existing.name == job.name else f" (as {existing.name!r}: names that differ only in case " \
                                                             "would share one adapter folder)"
                problems.append(Problem(f"{queue_file}: job {job.name!r}: name",
                                        f"a job named {job.name!r} is already in {home.root}{same} ({existing.status}); "
                                        "rename it, or 'loraq retry' the existing one"))
    if problems:
        raise SpecError(problems)
    names = [job.name for job in queue.jobs]
    sweeps = submitting.sweeps_of(queue)
    plans = {job.spec.group: job.halving for job in queue.jobs if job.halving and job.spec.group}
    afters = {job.name: job.spec.after for job in queue.jobs if job.spec.after}
    if dry_run:
        return SubmitResult(str(path), True, names, [], reports, sweeps, already, plans, afters)
    read_roots = [str(root) for root in roots.read]
    new_jobs = [
        NewJob(
            name=job.name,
            # The validated dataset's identity travels with the job: the trainer refuses a file
            # that changed after submit, since its rows were never checked. So do the roots the
            # paths were checked against: the trainer opens every file inside them again.
            spec=job.model_dump(mode="json") | _dataset_identity(reports.get(job.name)) | submitting.identity(job)
            | {"read_roots": read_roots}
            | ({"serving": queue.settings.serving} if queue.settings.serving else {}),
            base_key=job.base_key,
            priority=job.spec.priority,
            max_retries=job.spec.max_retries,
            dataset_sha256=reports[job.name].sha256 if job.name in reports else None,
            queue_file=str(path.absolute()),
            after=job.spec.after,
        )
        for job in queue.jobs if job.name not in already
    ]
    # A clone carries no queue-level settings: the home keeps the ones its queue file gave.
    settings = queue.settings.model_dump(exclude_defaults=False) if queue_settings else None
    with open_store(home) as store:
        try:
            ids = store.enqueue(new_jobs, settings=settings) if new_jobs else []
        except TransitionError as exc:  # a name taken between the check and the insert
            raise SpecError([Problem(str(queue_file), str(exc))]) from exc
    home.ensure()
    datacheck.write_profiles(deferred)
    return SubmitResult(str(path), False, [j.name for j in new_jobs], ids, reports, sweeps, already, plans, afters)


def clone(home: Home, ref: str, new_name: str, sets: Iterable[str] = (), *, allow_roots: Iterable[str | Path] = (),
          dry_run: bool = False, allow_remote_code: bool = False) -> SubmitResult:
    """Enqueue a copy of job ``ref`` named ``new_name``, with ``key=value`` overrides, validated like a submit.

    The copy starts from the job's settings as submitted (an ``auto`` is resolved
    again for the copy, unless a ``--set`` gives it a value), with its paths as they
    were resolved; it belongs to no sweep. Raises :class:`NotFoundError` for an
    unknown job, :class:`SpecError` for a bad override or anything a submit refuses.
    """
    from . import submitting
    from .queue import spec

    with open_reader(home) as store:
        job = store.job(ref)
    label = f"clone of {job.name!r}"
    doc = submitting.clone_doc(job.spec, new_name, list(sets), label)
    queue_path = Path(job.queue_file or job.spec.queue_file or home.root / "queue.yaml")
    roots = home.roots(queue_dir=queue_path.parent, extra=allow_roots)
    # A copy is a new submit: remote code needs the operator again (a --set cannot turn it on).
    queue = spec.queue_from_doc(doc, queue_path, roots, where=label,
                                allow_remote_code=allow_remote_code or home.config().allow_remote_code)
    return _submit_queue(queue, label, queue_path, home=home, roots=roots, dry_run=dry_run, queue_settings=False)


def _serving_problems(queue: Any, where: str) -> list[Problem]:
    """The queue's ``serving`` gate on each job's settings: a job no required engine would serve is refused."""
    from .inspect import serving

    if not queue.settings.serving:
        return []
    problems = []
    for job in queue.jobs:
        facts = serving.facts_from_spec(job.spec.lora, serving.read_base_config(job.base_model))
        for verdict, reason in serving.gate(serving.verdicts(facts), queue.settings.serving):
            why = "will not serve it" if verdict.servable is False else "cannot tell yet"
            problems.append(Problem(f"{where}: job {job.name!r}: {reason.field or 'serving'}",
                                    f"serving: {verdict.label} {why}: {reason.message}"))
    return problems


def _dataset_identity(report: Any) -> dict[str, Any]:
    if report is None:
        return {}
    return {"dataset_sha256": report.sha256, "eval_dataset_sha256": report.eval_sha256, "dataset_rows": report.rows,
            "dataset_bytes": report.bytes, "eval_dataset_bytes": report.eval_bytes,
            # what counted the tokens at submit: the trainer checks a torch-free count against transformers
            "submit_tokenizer": report.tokenizer, "est_steps": report.est_steps}


# ---------------------------------------------------------------- run


@dataclass(frozen=True)
class RunOptions:
    devices: str | None = None
    executor: str = "local"
    ray_address: str | None = None
    lease_s: float = 60.0
    heartbeat_s: float = 2.0
    stall_s: float = 600.0
    idle_exit: bool = True
    max_jobs: int | None = None
    recycle_growth_mb: float = 2048.0


@dataclass(frozen=True)
class RunResult:
    completed: list[str]
    failed: list[str]
    requeued: list[str]
    interrupted: bool
    paused: str | None
    counts: dict[str, int]

    @property
    def ok(self) -> bool:
        return self.counts.get("failed", 0) == 0 and not self.interrupted


def run(home: Home, options: RunOptions | None = None, observer: Observer | None = None) -> RunResult:
    """Work the queue until it is empty or paused; ``observer`` is told each :data:`RunEvent` as it happens."""
    from .supervisor.worker import Worker, WorkerConfig

    options = options or RunOptions()
    config = WorkerConfig(lease_s=options.lease_s, heartbeat_s=options.heartbeat_s, stall_s=options.stall_s,
                          idle_exit=options.idle_exit, max_jobs=options.max_jobs,
                          recycle_growth_mb=options.recycle_growth_mb)
    # The state is checked first: a damaged loraq.db stops the run before anything is created.
    with open_store(home, check=True) as store:
        home.ensure()
        executor = make_executor(home, options)
        summary = Worker(home, store, executor, config=config, observer=observer).run()
        counts = store.counts()
    return RunResult(summary.completed, summary.failed, summary.requeued, summary.interrupted, summary.paused, counts)


def make_executor(home: Home, options: RunOptions) -> Executor:
    from .executors.base import parse_devices
    from .executors.local import LocalExecutor

    if options.executor == "local":
        return LocalExecutor(parse_devices(options.devices), log_dir=home.root / "logs")
    if options.executor == "ray":
        from .executors.ray import RayExecutor

        return RayExecutor(home=home, devices=options.devices, address=options.ray_address)
    from .errors import UsageError

    raise UsageError(f"--executor: {options.executor!r} is not one of local, ray")


# ---------------------------------------------------------------- operator verbs


def _require_store(home: Home) -> Store:
    if not store_exists(home):
        raise NotFoundError(f"{home.root}: no loraq state here (no jobs submitted; see 'loraq submit')")
    return open_store(home, create=False)


@dataclass(frozen=True)
class ChangeResult:
    changed: list[JobRow]
    refused: list[str] = field(default_factory=list)  # one message per job that could not change


def _each(home: Home, refs: Iterable[str], verb: str) -> ChangeResult:
    changed, refused = [], []
    with _require_store(home) as store:
        for ref in refs:
            try:
                job = store.cancel(ref) if verb == "cancel" else store.retry(ref)
                changed.append(JobRow.of(job))
            except (NotFoundError, TransitionError) as exc:
                refused.append(f"{ref}: {exc}")
    return ChangeResult(changed, refused)


def cancel(home: Home, refs: Iterable[str]) -> ChangeResult:
    """Cancel pending or running jobs; a running job's worker stops its trainer within seconds."""
    return _each(home, refs, "cancel")


def retry(home: Home, refs: Iterable[str]) -> ChangeResult:
    return _each(home, refs, "retry")


def pause(home: Home, reason: str = "paused by the operator") -> QueueState:
    with open_store(home) as store:
        store.pause(reason)
        return store.queue_state()


def resume(home: Home) -> QueueState:
    with open_store(home) as store:
        store.resume()
        return store.queue_state()


# ---------------------------------------------------------------- inspect, report, demo


def inspect_adapter(folder: str | Path, *, home: Home, allow_roots: Iterable[str | Path] = (), base: str | None = None,
            data: str | Path | None = None, min_eval_loss_drop: float = 0.0) -> Inspection:
    """Inspect one adapter folder; with ``base`` (and ``data``) against its base model.

    Paths the operator names here (the folder, ``base`` when it is a folder, ``data``)
    are trusted for this call, wherever they are; the working folder is no root. What
    they hold is still checked: a symlink inside the adapter folder that leads out of
    it, or a base model file that leads out of the roots, is refused. Whatever cannot
    be inspected (missing, ``data`` without ``base``) raises
    :class:`~loraq.errors.InspectionError`.
    """
    from . import inspect as inspector
    from .errors import InspectionError
    from .sandbox import path_errors_as

    named: list[str | Path] = [folder, *([data] if data else [])]
    if base is not None and (base.startswith((".", "/", "~")) or _path_exists(base)):
        named.append(base)
    with path_errors_as(InspectionError):
        roots = home.roots(extra=allow_roots).with_read(*named)
    return inspector.inspect_adapter(folder, roots=roots, base=base, data=str(data) if data else None,
                                     min_eval_loss_drop=min_eval_loss_drop)


def _path_exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class ReportResult:
    path: Path | None  # where the report was written (None: a read-only home kept no copy)
    format: str
    text: str
    note: str | None = None  # why no copy was kept


def write_report(home: Home, *, fmt: str = "md", output: str | Path | None = None) -> ReportResult:
    """Write the queue report (``json``, ``md`` or ``html``); default ``<home>/reports/report.<format>``.

    The state is only read (a read-only open). On a home that cannot be written, a
    report to the default place is still built and returned, with a note that no copy
    was kept; one to ``output`` (or an HTML one, which is never printed) is an error.
    """
    from . import report as report_mod

    if fmt not in report_mod.FORMATS:
        raise UsageError(f"--format: {fmt!r} is not one of {', '.join(report_mod.FORMATS)}")
    with open_reader(home) as store:
        text = report_mod.render(report_mod.build(store, home), fmt)
    target = Path(output) if output is not None else home.reports_dir / f"report.{fmt}"
    try:
        report_mod.save(target, text)
    except OSError as exc:
        if output is not None or fmt == "html":
            raise
        return ReportResult(None, fmt, text, note=f"cannot write {target}: {exc.strerror or exc}; printed only")
    return ReportResult(target, fmt, text)


def write_demo(directory: str | Path) -> DemoFiles:
    """A tiny base model, datasets and ``queue.yaml`` in ``directory``, ready to submit (home ``directory/.loraq``)."""
    from . import demo

    return demo.prepare(directory)


# ---------------------------------------------------------------- export

EXPORT_KINDS = ("merged", "gguf")


@dataclass(frozen=True)
class ExportResult:
    kind: str  # merged | gguf
    adapter: str
    base_model: str
    path: str
    bytes: int
    seconds: float
    details: dict[str, Any]  # the exporter's own result: the merged model's check, the GGUF's tensors

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "adapter": self.adapter, "base_model": self.base_model, "path": self.path,
                "bytes": self.bytes, "seconds": self.seconds, **self.details}


def checked_shard_size(value: str) -> str:
    """``value`` as ``export`` takes a shard size (``5GB``); ValueError says why it is not one (100KB-1TB)."""
    from .export.merged import shard_size

    return shard_size(value)


def export(home: Home, adapter: str, *, to: str, dest: str | Path, base: str | None = None, dtype: str | None = None,
           data: str | Path | None = None, shard_size: str | None = None, force: bool = False,
           allow_roots: Iterable[str | Path] = ()) -> ExportResult:
    """Write a published adapter (by job name) or an adapter folder as a merged model or a GGUF LoRA.

    Whatever is written is checked before it is put in place, and appears whole or not at all.
    ``force`` replaces only an earlier export, never the home, the working folder, the
    adapter's or its base's folder, a symlink or a device (:mod:`loraq.export.target`).
    Every file read (the base's, the chat template, the eval rows) is read inside the
    roots: the home's and the working folder's, and, for a published adapter, the roots
    its job was checked against at submit, as the trainer reads them. Nothing is
    fetched from the network.

    Raises:
        UsageError: a bad ``to``, or an option that does not apply to it.
        NotFoundError: no such adapter.
        ExportError: the adapter cannot be exported so (the message says why), or the result failed its check.
    """
    import time

    from .errors import ExportError, UsageError
    from .export import sources
    from .export import target as target_mod
    from .inspect import inspect_adapter, warm_start

    if to not in EXPORT_KINDS:
        raise UsageError(f"--to: {to!r} is not one of {', '.join(EXPORT_KINDS)}")
    if to == "gguf" and (dtype is not None or shard_size is not None or data is not None):
        raise UsageError("--dtype, --shard-size and --data apply to --to merged; a GGUF LoRA is float32 pairs")
    if shard_size is not None:
        try:
            shard_size = checked_shard_size(shard_size)
        except ValueError as exc:
            raise UsageError(f"--shard-size: {exc}") from None
    roots = home.roots(queue_dir=Path.cwd(), extra=allow_roots)
    folder, roots = _adapter_folder(home, adapter, roots)
    keep = [("the home", home.root), ("the working folder", Path.cwd()), ("the adapter's folder", folder)]
    no_inside = [("adapters/", home.adapters_dir), ("the adapter's folder", folder)]
    target_mod.check(dest, to, force=force, keep=keep, no_inside=no_inside)  # before any work
    manifest = _export_manifest(folder, roots)
    with sources.offline():
        base_model = sources.base_model(_export_base(folder, base, manifest, roots), roots)
        keep.append(("the base model's folder", base_model.folder))
        target = target_mod.check(dest, to, force=force, keep=keep, no_inside=no_inside)
        inspection = inspect_adapter(folder, roots=roots, base_config=base_model.config)
        if not inspection.passed:
            raise ExportError(f"{folder} failed inspection; fix it before exporting: "
                              + "; ".join(f"[{f.code}] {f.message}" for f in inspection.errors()))
        started = time.monotonic()
        with target_mod.writing(target):
            target_mod.check(target, to, force=force, keep=keep, no_inside=no_inside)  # again, under the lock
            if to == "gguf":
                from .export import gguf

                written = gguf.export_gguf(folder, base_model.config, target, name=manifest.get("name") or folder.name,
                                           base_shapes=warm_start.base_shapes(base_model.folder, base_model.roots),
                                           roots=roots)
                details: dict[str, Any] = {"architecture": written.architecture, "alpha": written.alpha,
                                           "tensors": written.n_tensors, "modules": written.modules}
                size = written.bytes
            else:
                from .export import merged

                dataset, fmt = _export_data(data, manifest, roots)
                result = merged.export_merged(
                    folder, base_model.folder, target, dtype=dtype or "fp32", dataset=dataset, dataset_format=fmt,
                    shard_size=shard_size or merged.DEFAULT_SHARD_SIZE,
                    source={"job": manifest.get("name"), "job_id": manifest.get("job_id")},
                    chat_template=sources.chat_template(folder, manifest, roots), roots=roots)
                details = {"dtype": result.dtype, "shards": result.shards, "files": result.files,
                           "check": result.to_json()["check"]}
                size = result.bytes
    return ExportResult(to, str(folder), base_model.name, str(target), size, round(time.monotonic() - started, 2),
                        details)


def _adapter_folder(home: Home, ref: str, roots: Any) -> tuple[Path, Any]:
    """The adapter's folder and the roots to read it and its files through.

    ``ref`` is a published job's name (its folder in ``adapters/``, read through these
    roots and the ones the job was checked against at submit: its base and dataset are
    where they were), else a folder inside ``roots``.
    """
    from .queue.spec import NAME_PATTERN

    if NAME_PATTERN.fullmatch(ref) and home.adapter_dir(ref).is_dir():
        folder = home.adapter_dir(ref).resolve()
        return folder, roots.with_read(*_job_roots(home, ref, folder, roots))
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise NotFoundError(f"{ref!r}: no published adapter of that name in {home.adapters_dir}, and no such folder")
    return roots.check_read(path, what="adapter folder"), roots  # PathError outside the roots


def _export_manifest(folder: Path, roots: Any) -> dict[str, Any]:
    from .export import sources

    return sources.optional_json(folder / publish.MANIFEST, roots, what=f"{folder}: {publish.MANIFEST}")


def _job_roots(home: Home, name: str, folder: Path, roots: Any) -> list[str]:
    """The roots the published job ``name`` was checked against at submit (as the worker hands them to the trainer)."""
    manifest = _export_manifest(folder, roots)
    from .errors import StoreError

    if not store_exists(home):
        return []
    try:
        with open_reader(home) as store:
            job = store.job_named(name)
    except StoreError:
        return []  # a damaged state: the folder is read through the command's own roots only
    if job is None or (manifest.get("job_id") is not None and manifest.get("job_id") != job.id):
        return []  # the folder is not this job's adapter: nothing beyond the command's own roots
    if job.spec.read_roots:
        return list(job.spec.read_roots)
    return [str(Path(job.queue_file).parent)] if job.queue_file else []


def _export_base(folder: Path, base: str | None, manifest: dict[str, Any], roots: Any) -> str:
    """The base model's name: ``base``, else the one the loraq manifest or adapter_config.json names."""
    from .errors import ExportError
    from .export import sources

    if base is not None:
        return base
    config = sources.read_json(folder / "adapter_config.json", roots, what=f"{folder}: adapter_config.json")
    named = config.get("base_model_name_or_path")
    candidates = [c for c in (manifest.get("base_model"), named) if isinstance(c, str) and c]
    if not candidates:
        raise ExportError(f"{folder}: names no base model; give --base MODEL")
    # The manifest's base (a folder, as the job resolved it) first; a hub id is looked up in the local cache.
    return next((c for c in candidates if Path(c).expanduser().is_dir()), candidates[0])


def _export_data(data: str | Path | None, manifest: dict[str, Any], roots: Any) -> tuple[Path | None, str | None]:
    """Eval rows for the merged model's check: ``data``, else the adapter's own dataset when it can be read."""
    from .errors import ExportError
    from .sandbox import path_errors_as

    if data is not None:
        path = Path(data).expanduser()
        with path_errors_as(ExportError):
            roots.check_read(path, what="--data")
        if not path.is_file():
            raise ExportError(f"--data {data}: no such file")
        return path, None
    dataset = manifest.get("dataset") or {}
    path = Path(str(dataset.get("path") or "")).expanduser()
    if dataset.get("path") and path.is_file() and roots.contains(path):
        return path, dataset.get("format")
    return None, None
