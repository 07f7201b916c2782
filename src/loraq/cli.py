"""The command line: parses arguments, calls :mod:`loraq.api`, prints the result.

Errors are mapped to exit codes in one place (:func:`main`): every
:class:`~loraq.errors.LoraqError` prints one line per problem to stderr and exits
with its code (1 by default, 2 for usage and "cannot inspect").
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from . import api, notices
from .errors import LoraqError, ProblemsError
from .escape import printable, printable_lines
from .workspace import Home

app = typer.Typer(
    name="loraq",
    help="Train many LoRA adapters unattended and safely.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Context:
    def __init__(self, home: str | None, allow_roots: list[str]) -> None:
        self.home = Home.locate(home)
        self.allow_roots = allow_roots


def _ctx(ctx: typer.Context) -> Context:
    obj: Context = ctx.obj
    return obj


@app.callback()
def _global(
    ctx: typer.Context,
    home: Optional[str] = typer.Option(None, "--home", envvar="LORAQ_HOME", help="loraq's home (default ./.loraq)."),
    allow_root: list[str] = typer.Option([], "--allow-root", help="Also allow reading inside DIR (repeatable)."),
) -> None:
    ctx.obj = Context(home, allow_root)


def _print_json(obj: dict[str, Any]) -> None:
    """A ``--json`` output: ``obj`` with the output's ``"version"`` (README: what a version change means)."""
    obj = {**obj, "version": api.JSON_VERSION}
    notices.out().write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _print_json_listing(obj: dict[str, Any], key: str) -> None:
    """A ``--json`` output, with the list under ``key`` one item a line (and the ``"version"``).

    ``indent`` makes ``json`` use its pure-Python encoder, 10x slower: 1.2 s for
    10,000 jobs. Each item is encoded compactly by the C encoder instead, and the
    output stays readable, and greppable a job a line.
    """
    obj = {**obj, "version": api.JSON_VERSION}
    dumps = json.JSONEncoder(sort_keys=True, default=str).encode
    parts = []
    for name in sorted(obj):
        if name == key:
            items = ",\n".join(f"    {dumps(item)}" for item in obj[key])
            parts.append(f'  {dumps(name)}: [\n{items}\n  ]' if items else f"  {dumps(name)}: []")
        else:
            parts.append(f"  {dumps(name)}: {dumps(obj[name])}")
    notices.out().write("{\n" + ",\n".join(parts) + "\n}\n")


def _plain_table(columns: list[str], rows: list[list[str]]) -> None:
    """Columns padded with spaces, one line a row, written at once (``docker ps``-like).

    For listings that can be long: rich lays out 10,000 rows in ~15 s, this in ~0.1 s;
    the last column is not padded or wrapped, so a long reason stays on its line.
    """
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max([len(column)] + [len(row[i]) for row in rows]) for i, column in enumerate(columns[:-1])]

    def line(cells: list[str]) -> str:
        return "  ".join([cell.ljust(width) for cell, width in zip(cells, widths)] + [cells[-1]]).rstrip()

    notices.out().write("\n".join([line(columns), line(["-" * w for w in widths] + ["-" * len(columns[-1])])]
                               + [line(row) for row in rows]) + "\n")


def _err(line: str) -> None:
    # One line, whatever the message holds: names and reasons can come from hostile files.
    notices.err().write(printable(line.rstrip("\n")) + "\n")


def _say(line: str = "", *, flush: bool = False) -> None:
    """One line on stdout with its control characters escaped (see :mod:`loraq.escape`)."""
    out = notices.out()
    out.write(printable(line) + "\n")
    if flush:
        out.flush()


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(title: str | None, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(printable(cell)) for cell in row))
    Console(file=notices.out(), width=max(100, int(os.environ.get("COLUMNS", "0") or 0))).print(table)


# ---------------------------------------------------------------- submit


@app.command()
def submit(
    ctx: typer.Context,
    queue_file: Path = typer.Argument(..., help="The queue file (YAML)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and show what would run; enqueue nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code",
                                           help="Let jobs set trust_remote_code (runs the model's own Python)."),
) -> int:
    """Validate every job of QUEUE_FILE and enqueue all of them, or none."""
    c = _ctx(ctx)
    try:
        result = api.submit(queue_file, home=c.home, allow_roots=c.allow_roots, dry_run=dry_run,
                            allow_remote_code=allow_remote_code)
    except ProblemsError as exc:
        if not as_json:
            raise
        # Scripts get every problem with its typed category; people still get the lines on stderr.
        _print_json(api.rejected_json(queue_file, dry_run, exc.problems))
        for problem in exc.problems:
            _err(str(problem))
        return exc.exit_code

    if as_json:
        _print_json(result.to_json())
        return 0
    _print_submitted(result, c.home)
    return 0


def _print_submitted(result: api.SubmitResult, home: Home) -> None:
    dry_run = result.dry_run
    for group, members in result.sweeps.items():
        plan = result.halving.get(group)
        _say(f"sweep {group}: {len(members)} job(s)" + (f"; {api.describe_halving(plan)}" if plan else ""))
    for name in result.job_names:
        if dry_run:
            _say(f"{name}:")
            for line in result.describe(name):
                _say(f"  {line}")
        else:
            _say(f"{name}: {result.summary(name)}")
    if result.already:
        _say(f"{len(result.already)} job(s) of a sweep already in {home.root}, as submitted: left as they are")
    if dry_run:
        _say(f"dry run: {len(result.job_names)} job(s) valid; nothing enqueued")
    else:
        _say(f"enqueued {len(result.job_ids)} job(s) into {home.root}")


@app.command()
def clone(
    ctx: typer.Context,
    job: str = typer.Argument(..., help="The job to copy (name or id)."),
    new_name: str = typer.Argument(..., help="The copy's name."),
    sets: list[str] = typer.Option([], "--set", help="Override a setting: KEY=VALUE, e.g. training.learning_rate=1e-4 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and show; enqueue nothing."),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code",
                                           help="Let the copy set trust_remote_code (runs the model's own Python)."),
) -> int:
    """Enqueue a copy of JOB named NEW_NAME with overrides, validated like a submit. Exit 0 enqueued, 1 rejected."""
    c = _ctx(ctx)
    _print_submitted(api.clone(c.home, job, new_name, sets, allow_roots=c.allow_roots, dry_run=dry_run,
                               allow_remote_code=allow_remote_code), c.home)
    return 0


# ---------------------------------------------------------------- run


class _Progress:
    """Shows a running queue: rich bars on a terminal, one line per event elsewhere."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = notices.out().isatty()
        self.bars: Any = None
        self.tasks: dict[str, Any] = {}
        if self.tty and not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bars = Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 console=Console(file=notices.out()))
            self.bars.start()

    def close(self) -> None:
        if self.bars is not None:
            self.bars.stop()

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bars is not None:
            self.bars.console.print(printable(text), markup=False, highlight=False)
        else:
            _say(text, flush=True)

    def __call__(self, event: api.RunEvent) -> None:
        match event:
            case api.JobProgress(name=name, event=progress):
                text = " ".join(f"{k}={v:.3f}" for k, v in progress.metrics.items() if k in ("loss", "eval_loss"))
                if self.bars is not None:
                    task = self.tasks.get(name)
                    if task is None:
                        task = self.tasks[name] = self.bars.add_task(printable(name), total=progress.max_steps, info="")
                    self.bars.update(task, completed=progress.step, total=progress.max_steps, info=text)
                elif text and not self.quiet:
                    _say(f"[{name}] step {progress.step}/{progress.max_steps} {text}", flush=True)
            case api.Claimed(name=name, attempt=attempt, slot=slot, resume_step=resume_step):
                resume = f", resuming from step {resume_step}" if resume_step else ""
                self._line(f"[{name}] attempt {attempt} on {slot}{resume}")
            case api.JobStarted(name=name, event=started):
                reused = "base reused" if started.base_reused else "base loaded"
                self._line(f"[{name}] {started.n_train} train / {started.n_eval} eval rows, {started.max_steps} steps, "
                           f"{reused}, base eval loss {_num(started.base_eval_loss)}")
            case api.Completed(name=name, adapter=adapter, result=result):
                if self.bars is not None and name in self.tasks:
                    self.bars.update(self.tasks[name], completed=result.steps)
                self._line(f"[{name}] completed: eval loss {_num(result.base_eval_loss)} -> {_num(result.eval_loss)}, "
                           f"published to {adapter}")
            case api.JobFailed(name=name, failure=failure, reason=reason, final=final):
                outcome = "failed" if final else "attempt failed (will retry)"
                self._line(f"[{name}] {outcome}: {failure}: {reason}")
            case api.RoundEnded(name=name, round=round_, steps=steps, eval_loss=eval_loss):
                self._line(f"[{name}] halving: round {round_} done at step {steps}, eval loss "
                           f"{_num(eval_loss)}; waiting for the round's decision")
            case api.Stopping(signal=signal):
                self._line(f"{signal}: asking trainers to checkpoint and stop (again to stop at once)")
            case api.StoppingNow(signal=signal):
                self._line(f"{signal}: stopping at once")
            case api.JobStopped(name=name, step=step):
                self._line(f"[{name}] stopped at step {step}; back in the queue (no attempt used)")
            case api.JobOomAdjusted(name=name, line=line):
                self._line(f"[{name}] oom_adjusted: {line}")
            # The rest, as a word and its details (the same lines as before the events were typed).
            case api.Recovered(name=name, job_id=job_id):
                self._line(f"[{name}] recovered: {dict(job_id=job_id)}")
            case api.Lost(name=name, why=why):
                self._line(f"[{name}] lost: {dict(why=why)}")
            case api.Stalled(name=name):
                self._line(f"[{name}] stalled: {{}}")
            case api.Reclaimed(job_id=job_id) | api.LeaseExpired(job_id=job_id):
                self._line(f"[queue] {event.kind.value}: {dict(job_id=job_id)}")
            case api.Recycled(slot=slot, rss_mb=rss_mb, baseline_mb=baseline_mb):
                self._line(f"[queue] recycled: {dict(slot=slot, rss_mb=rss_mb, baseline_mb=baseline_mb)}")
            case api.Fault(reason=reason):
                self._line(f"[queue] fault: {dict(reason=reason)}")
            case api.FaultCleared(done=done):
                self._line(f"[queue] fault_cleared: {dict(done=done)}")
            case _:
                _unknown(event)


def _unknown(event: NoReturn) -> NoReturn:
    """mypy proves every kind of run event handled above (Python 3.10 has no ``typing.assert_never``)."""
    raise AssertionError(f"unknown run event {event!r}")


@app.command()
def run(
    ctx: typer.Context,
    devices: Optional[str] = typer.Option(None, "--devices", help="GPUs to use, e.g. 0,1; or cpu,cpu. Default: every GPU, else the CPU."),
    executor: str = typer.Option("local", "--executor", help="local | ray"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster: auto or ADDRESS (with --executor ray)."),
    lease: float = typer.Option(60.0, "--lease", min=1.0, max=86_400.0,
                                help="Seconds a job's lease lasts without a heartbeat (1-86400)."),
    stall: float = typer.Option(600.0, "--stall-timeout", min=1.0, max=604_800.0,
                                help="Kill and retry a trainer silent this long (seconds, 1-604800)."),
    wait: bool = typer.Option(False, "--wait", help="Keep waiting for new jobs instead of returning when the queue is empty."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> int:
    """Work the queue until it is empty or paused. Exit 0 if every job completed, 1 if any failed."""
    c = _ctx(ctx)
    options = api.RunOptions(devices=devices, executor=executor, ray_address=ray_address, lease_s=lease,
                             stall_s=stall, idle_exit=not wait)
    progress = _Progress(quiet=quiet)
    try:
        result = api.run(c.home, options, observer=progress)
    finally:
        progress.close()
    counts = result.counts
    if not quiet:
        _say(" · ".join(f"{counts[k]} {k}" for k in ("completed", "failed", "pending", "running", "cancelled")))
        if result.paused:
            _say(f"queue paused: {result.paused}  (loraq resume to continue)")
        if result.interrupted:
            _say("interrupted: unfinished jobs are back in the queue; run again to continue")
    if result.interrupted:
        return 130
    return 0 if result.ok and not result.paused else 1


# ---------------------------------------------------------------- status, show, logs


@app.command()
def status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> int:
    """One row per job: name, status, attempts, progress, losses, verdict."""
    result = api.status(_ctx(ctx).home)
    if as_json:
        _print_json_listing(result.to_json(), "jobs")
        return 0
    if result.queue is not None and result.queue.paused:
        _say(f"queue paused: {result.queue.pause_reason}  (loraq resume to continue)")
    if not result.jobs:
        _say("no jobs (loraq submit QUEUE.yaml to add some)")
        return 0
    rows = []
    measured = any(job.exact_match is not None for job in result.jobs)  # a column only where a job asked for it
    preferred = any(job.preference_accuracy is not None for job in result.jobs)  # preference jobs (issue 23)
    graders = sorted({name for job in result.jobs for name in job.graded})  # validation.metrics' graders (issue 24)
    grouped: dict[str | None, list[api.JobRow]] = {}
    for job in result.jobs:  # a sweep's jobs together, under a line naming it, where its first job was
        grouped.setdefault(job.group, []).append(job)
    for group, members in grouped.items():
        if group is not None:
            states = ", ".join(f"{sum(1 for m in members if m.status == s)} {s}" for s in
                               dict.fromkeys(m.status for m in members))
            rows.append([f"sweep {group}", f"{len(members)} jobs", "", "", "", "", states] + ([""] if measured else [])
                        + ([""] if preferred else []) + [""] * len(graders))
        for job in members:
            progress = f"{job.step or 0}/{job.total_steps}" if job.total_steps else "-"
            note = job.verdict or ""
            if job.round_note:  # the round it is in, or why it was pruned
                note = job.round_note[:120]
            elif job.waiting_on:
                note = f"waiting on {job.waiting_on} ({job.after_status})"
            elif job.status in ("failed", "pending") and job.error:
                note = f"{job.error_kind}: {job.error}"[:100]
            rows.append([("  " if group is not None else "") + job.name, job.status, f"{job.attempts}/{job.max_attempts}",
                         progress, _num(job.train_loss), f"{_num(job.base_eval_loss)} -> {_num(job.eval_loss)}", note]
                        + ([_exact(job.base_exact_match, job.exact_match)] if measured else [])
                        + ([_exact(job.base_preference_accuracy, job.preference_accuracy)] if preferred else [])
                        + [_exact(*job.graded.get(name, (None, None))) for name in graders])
    _plain_table(["job", "status", "attempts", "progress", "train loss", "eval loss base -> adapter", "verdict / why"]
                 + (["exact match base -> adapter"] if measured else [])
                 + (["preference accuracy base -> adapter"] if preferred else [])
                 + [f"{name} base -> adapter" for name in graders], rows)
    return 0


def _exact(base: float | None, adapter: float | None) -> str:
    return "" if adapter is None and base is None else f"{_num(base)} -> {_num(adapter)}"


@app.command()
def show(ctx: typer.Context, job: str = typer.Argument(..., help="Job name or id."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> int:
    """Spec, attempts, events, metrics and inspection of one job."""
    result = api.show(_ctx(ctx).home, job)
    if as_json:
        _print_json(result.to_json())
        return 0
    j = result.job
    _say(f"{j.name} (id {j.id}): {j.status}, attempts {j.attempts}/{j.max_retries + 1}, priority {j.priority}")
    _say(f"  base model: {j.spec.base_model}")
    _say(f"  dataset:    {j.spec.dataset_path} (sha256 {str(j.dataset_sha256)[:16]})")
    _say(f"  eval loss:  base {_num(j.base_eval_loss)} -> adapter {_num(j.eval_loss)}; train loss {_num(j.train_loss)}")
    result_doc = j.result or {}
    metrics = result_doc.get("metrics") or {}
    if "exact_match" in metrics:
        rows_used = (result_doc.get("extras") or {}).get("exact_match_rows")
        _say(f"  exact match: base {_num(metrics.get('base_exact_match'))} -> adapter {_num(metrics['exact_match'])}"
             + (f" (greedy answers to {rows_used} eval prompts)" if rows_used else ""))
    for name in [k for k in metrics if not k.startswith("base_") and k != "exact_match"]:  # graders, the judge
        _say(f"  {name}: base {_num(metrics.get(f'base_{name}'))} -> adapter {_num(metrics[name])}")
    if j.error:
        _say(f"  why:        {j.error_kind}: {j.error}")
    if adapter := (j.result or {}).get("adapter"):
        _say(f"  adapter:    {adapter}")
    for dep in result.dependencies:
        waiting = ": waiting on it" if j.status == "pending" and dep.status != "completed" else ""
        _say(f"  after:      {dep.name} ({dep.status}){waiting}; starts from its adapter")
    for line in api.control_lines(j):
        _say(f"  {line}")
    _say("attempts:")
    for a in result.attempts:
        resumed = f", resumed from step {a.resumed_from_step}" if a.resumed_from_step else ""
        saved = f", checkpoint at step {a.checkpoint_step}" if a.checkpoint_step else ""
        kind = "" if a.retryable is None else (" (retryable)" if a.retryable else " (permanent)")
        reason = ": " + ": ".join(x for x in (a.error_kind, a.reason) if x) + kind if a.reason or a.error_kind else ""
        counted = "" if a.counted else " (not counted)"
        _say(f"  #{a.n} {a.outcome or 'running'}{counted}, last step {a.last_step}{resumed}{saved}{reason}")
    _say("events:")
    for e in result.events:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.ts))
        _say(f"  {stamp} {e.from_state or '-'} -> {e.to_state or '-'}: {e.reason} ({e.actor})")
    if result.inspection:
        verdict = "pass" if result.inspection.get("passed") else "fail"
        _say(f"inspection: {verdict}")
        for f in result.inspection.get("findings", []):
            _say(f"  {f.get('severity')} [{f.get('code')}] {f.get('message')}")
    _print_samples((result_doc.get("extras") or {}).get("samples"))
    if result.log_path:
        _say(f"log: {result.log_path}")
    return 0


def _print_samples(samples: Any) -> None:
    """A few eval prompts with the reference, the base's answer and the adapter's, one under the other."""
    if not isinstance(samples, list) or not samples:
        return
    _say("samples (eval prompts; base and adapter answers, greedy):")
    for n, sample in enumerate(s for s in samples if isinstance(s, dict)):
        prompt = str(sample.get("prompt", ""))
        tail = prompt if len(prompt) <= 160 else "…" + prompt[-159:]
        _say(f"  #{n + 1} prompt:    {tail!r}")
        for key in ("reference", "base", "adapter"):
            _say(f"     {key + ':':<10} {str(sample.get(key, ''))!r}")


@app.command()
def logs(
    ctx: typer.Context,
    job: str = typer.Argument(..., help="Job name or id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing while the job runs."),
    attempt: Optional[int] = typer.Option(None, "--attempt", min=1, max=1_000_000, help="An earlier attempt's log."),
) -> int:
    """The training log of the job's newest attempt."""
    # The log holds what libraries printed, which can quote a dataset: control characters
    # are escaped (newlines and tabs kept), as everywhere loraq prints.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = notices.out()
    for chunk in api.follow_log(_ctx(ctx).home, job, attempt, follow=follow):
        out.write(printable_lines(decoder.decode(chunk)))
        out.flush()
    out.write(printable_lines(decoder.decode(b"", final=True)))
    return 0


# ---------------------------------------------------------------- operator verbs


def _change(result: api.ChangeResult, verb: str) -> int:
    for row in result.changed:
        _say(f"{row.name}: {row.status}")
    for line in result.refused:
        _err(f"loraq {verb}: {line}")
    return 1 if result.refused else 0


@app.command()
def cancel(ctx: typer.Context, jobs: list[str] = typer.Argument(..., help="Job names or ids.")) -> int:
    """Cancel pending or running jobs (a running trainer stops within seconds)."""
    return _change(api.cancel(_ctx(ctx).home, jobs), "cancel")


@app.command()
def retry(ctx: typer.Context, jobs: list[str] = typer.Argument(..., help="Job names or ids.")) -> int:
    """Put failed or cancelled jobs back in the queue with fresh attempts."""
    return _change(api.retry(_ctx(ctx).home, jobs), "retry")


@app.command()
def pause(ctx: typer.Context, reason: str = typer.Option("paused by the operator", "--reason")) -> int:
    """Stop claiming new jobs (running ones finish)."""
    api.pause(_ctx(ctx).home, reason)
    _say(f"queue paused: {reason}")
    return 0


@app.command()
def resume(ctx: typer.Context) -> int:
    """Continue a paused queue (and reset the failure count)."""
    api.resume(_ctx(ctx).home)
    _say("queue resumed")
    return 0


# ---------------------------------------------------------------- inspect, report, demo


@app.command()
def inspect(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="An adapter folder."),
    base: Optional[str] = typer.Option(None, "--base", help="Check against this base model (folder or hub id)."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --base: eval loss base vs adapter on this dataset."),
    min_drop: float = typer.Option(0.0, "--min-eval-loss-drop", min=-1000.0, max=1000.0,
                                   help="Quality gate with --data (-1000 to 1000)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> int:
    """Inspect one adapter folder. Exit 0 pass, 1 fail, 2 cannot inspect."""
    c = _ctx(ctx)
    result = api.inspect_adapter(folder, home=c.home, allow_roots=c.allow_roots, base=base, data=data,
                                 min_eval_loss_drop=min_drop)
    if as_json:
        _print_json(result.to_json())
    else:
        _say(f"{result.path}: {'PASS' if result.passed else 'FAIL'}")
        for f in result.findings:
            _say(f"  {f.severity:<7} [{f.code}] {f.message}")
        _print_serving(result.serving)
    return 0 if result.passed else 1


def _print_serving(verdicts: dict[str, Any]) -> None:
    """One line per engine ("vLLM  yes (--max-lora-rank 8)"), then its notes."""
    if not verdicts:
        return
    _say("serving:")
    width = max(len(v.label) for v in verdicts.values())
    for verdict in verdicts.values():
        _say(f"  {verdict.label:<{width}}  {verdict.summary()}")
        for note in verdict.notes:
            _say(f"  {'':<{width}}  note: {note}")


def _shard_size(value: str | None) -> str | None:
    """``--shard-size`` checked before any work: a usage error (exit 2) unless it is a size export takes."""
    try:
        return None if value is None else api.checked_shard_size(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def export(
    ctx: typer.Context,
    adapter: str = typer.Argument(..., help="A published job name, or an adapter folder."),
    to: tuple[str, str] = typer.Option(..., "--to", help="merged DIR | gguf FILE", metavar="KIND PATH"),
    base: Optional[str] = typer.Option(None, "--base", help="The base model (default: the one the adapter names)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="merged: bf16 | fp16 | fp32 (default fp32)."),
    data: Optional[Path] = typer.Option(None, "--data",
                                        help="merged: eval rows for the check (default: the adapter's dataset)."),
    shard_size: Optional[str] = typer.Option(None, "--shard-size", callback=lambda v: _shard_size(v),
                                             help="merged: largest safetensors shard, 100KB-1TB "
                                                  "(KB, MB, GB, TB; default 5GB)."),
    force: bool = typer.Option(False, "--force", help="Replace DIR or FILE if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> int:
    """Write an adapter as a merged model or a GGUF LoRA (llama.cpp, Ollama), checked. Exit 0 written, 1 refused."""
    from .errors import UsageError

    kind, dest = to
    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"--dtype: {dtype!r} is not one of bf16, fp16, fp32")
    c = _ctx(ctx)
    result = api.export(c.home, adapter, to=kind, dest=dest, base=base, dtype=dtype, data=data, shard_size=shard_size,
                        force=force, allow_roots=c.allow_roots)
    if as_json:
        _print_json(result.to_json())
        return 0
    mb = result.bytes / 1e6
    if result.kind == "merged":
        check = result.details["check"]
        _say(f"wrote {result.path}: {result.details['dtype']} model merged from {result.adapter} into "
             f"{result.base_model}, {result.details['shards']} shard(s), {mb:.1f} MB in {result.seconds:.1f} s")
        _say(f"  checked: logits vs base + adapter on {check['rows']} rows ({check['source']}): max |diff| "
             f"{check['max_abs_diff']:.2e} <= tolerance {check['tolerance']:.2e}; top-1 agreement "
             f"{check['top1_agreement']:.1%}")
    else:
        _say(f"wrote {result.path}: GGUF LoRA for {result.details['architecture']} ({result.details['modules']} "
             f"modules, alpha {result.details['alpha']:g}), {mb:.1f} MB in {result.seconds:.1f} s; read back and checked")
        _say(f"  llama.cpp: llama-server -m BASE.gguf --lora {result.path}")
        _say(f"  Ollama:    a Modelfile with 'FROM BASE.gguf' and 'ADAPTER {result.path}'")
        _say("  (BASE.gguf: the base model's weights as GGUF, the ones the adapter was trained on)")
    return 0


@app.command()
def report(
    ctx: typer.Context,
    fmt: str = typer.Option("md", "--format", help="json | md | html"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write here (default <home>/reports/report.<format>)."),
) -> int:
    """The queue report: per job status, attempts and why, losses, curves, findings."""
    result = api.write_report(_ctx(ctx).home, fmt=fmt, output=output)
    if output is None and fmt != "html":
        notices.out().write(result.text)
    if result.note:
        _err(f"loraq: report: {result.note}")
    else:
        _err(f"wrote {result.path}")
    return 0


@app.command()
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless --allow-remote)."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port to listen on (0-65535; 0: any free port)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a non-loopback --host (prints a warning)."),
    max_connections: int = typer.Option(64, "--max-connections", min=1, max=100_000,
                                        help="Open connections at most (idle ones are closed first)."),
    max_body_bytes: int = typer.Option(1024 * 1024, "--max-body-bytes", min=0, max=2**40,
                                       help="Largest request body; a larger one gets 413 before it is read."),
) -> int:
    """The live web dashboard over the home. Prints the link (with its token) to open; Ctrl-C stops it."""
    from .errors import UsageError

    try:
        from . import serve as dashboard
    except ImportError as exc:
        raise UsageError(f"loraq serve needs the serve extra: pip install 'loraq[serve]' (missing {exc.name})") from exc
    home = _ctx(ctx).home
    warning = dashboard.check_host(host, allow_remote)
    if warning:
        _err(f"loraq serve: warning: {warning}")

    def ready(listening: Any) -> None:
        _say(f"loraq serve: the dashboard of {home.root}", flush=True)
        _say(f"  open {listening.url}", flush=True)
        _say("  (the token in the link is needed for every page and action; Ctrl-C to stop)", flush=True)

    try:
        dashboard.serve(home, host, port, allow_remote=allow_remote, ready=ready, max_connections=max_connections,
                        max_body_bytes=max_body_bytes)
    except KeyboardInterrupt:
        pass
    return 0


keys_app = typer.Typer(name="keys", help="API keys for the /v1 fine-tuning API of 'loraq serve'.", no_args_is_help=True,
                       add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
app.add_typer(keys_app)


def _key_state(ctx: typer.Context) -> Any:
    from .service.state import ApiState

    home = _ctx(ctx).home
    home.ensure()
    return ApiState.of_home(home.root)


@keys_app.command("create")
def keys_create(ctx: typer.Context, name: str = typer.Argument(..., help="A name for the key (who or what uses it).")) -> int:
    """Make a key; it is printed once, alone on stdout (KEY=$(loraq keys create ci)), and stored only as a hash."""
    with _key_state(ctx) as state:
        key = state.create_key(name)
    out = notices.out()
    out.write(key + "\n")
    out.flush()
    _err(f"loraq keys: created {name!r}; it is shown only this once (send it as 'Authorization: Bearer <key>')")
    return 0


@keys_app.command("list")
def keys_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> int:
    """The keys: name, when made, whether revoked (never the keys themselves)."""
    with _key_state(ctx) as state:
        keys = state.keys()
    if as_json:
        _print_json({"keys": [k.to_json() for k in keys]})
        return 0
    _table("API keys", ["name", "created", "revoked"],
           [[k.name, time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created_at)),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(k.revoked_at)) if k.revoked_at else "-"] for k in keys])
    return 0


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, name: str = typer.Argument(..., help="The key's name.")) -> int:
    """Revoke a key: requests with it are refused from now on (its jobs and files stay)."""
    with _key_state(ctx) as state:
        state.revoke_key(name)
    _say(f"revoked {name}")
    return 0


@app.command()
def demo(
    directory: Path = typer.Argument(Path("loraq-demo"), help="Where to write the demo (default ./loraq-demo)."),
    no_run: bool = typer.Option(False, "--no-run", help="Only write the files."),
) -> int:
    """Write a tiny base model, datasets and queue.yaml into DIRECTORY, then submit and run it."""
    started = time.time()
    files = api.write_demo(directory)
    home = Home(files.root / ".loraq")
    notices.log_into(home.root)
    _say(f"wrote the demo into {files.root}: model {files.model.relative_to(files.root)}, "
         f"{len(files.datasets)} datasets, queue.yaml (home {home.root})")
    if no_run:
        _say(f"run it: loraq --home {home.root} submit {files.queue} && loraq --home {home.root} run")
        return 0
    submitted = api.submit(files.queue, home=home)
    _say(f"submitted {len(submitted.job_ids)} jobs")
    progress = _Progress()
    try:
        result = api.run(home, api.RunOptions(devices="cpu"), observer=progress)
    finally:
        progress.close()
    rows = []
    for job in api.status(home).jobs:
        details = api.show(home, job.name)
        adapter = Path(job.adapter) if job.adapter else None
        size = sum(p.stat().st_size for p in adapter.iterdir()) / 1024 if adapter and adapter.is_dir() else None
        took = (details.job.finished_at - details.job.started_at) if details.job.finished_at and details.job.started_at else None
        rows.append([job.name, job.status, str(job.step or "-"), _num(job.train_loss),
                     f"{_num(job.base_eval_loss)} -> {_num(job.eval_loss)}", f"{size:.0f} KB" if size else "-",
                     f"{took:.1f} s" if took else "-"])
    _table("loraq demo", ["adapter", "status", "steps", "train loss", "eval loss base -> adapter", "size", "time"], rows)
    _say(f"adapters in {home.adapters_dir}; total {time.time() - started:.0f} s. "
         f"Try: loraq --home {home.root} status | show support-bot | report --format html")
    return 0 if result.ok else 1


# ---------------------------------------------------------------- entry point


#: Commands whose output is theirs to manage: the dashboard logs its own requests, for as long as it runs.
_UNROUTED = {"serve"}


def _route_library_output(command: Any) -> None:
    """Run each (sub)command with what libraries print routed to the home's log (:mod:`loraq.notices`).

    Around the command's body only: usage errors and ``--help`` are printed before it runs.
    """
    for name, sub in getattr(command, "commands", {}).items():
        if name in _UNROUTED:
            continue
        if getattr(sub, "commands", None):
            _route_library_output(sub)
            continue
        invoke = sub.invoke

        def routed(ctx: Any, invoke: Any = invoke) -> Any:
            obj = ctx.find_object(Context)
            with notices.routed(obj.home.root if obj is not None else None):
                return invoke(ctx)

        sub.invoke = routed


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; map errors to exit codes (0 ok, 1 failed/rejected, 2 usage or cannot inspect)."""
    try:
        command = typer.main.get_command(app)
        _route_library_output(command)
        code = command.main(args=argv, prog_name="loraq", standalone_mode=False)
    except ProblemsError as exc:
        for problem in exc.problems:
            _err(str(problem))
        if exc.summary:
            _err(exc.summary)
        code = exc.exit_code
    except LoraqError as exc:
        _err(f"loraq: {exc}")
        code = exc.exit_code
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        _err("loraq: aborted")
        code = 130
    except KeyboardInterrupt:
        _err("loraq: interrupted")
        code = 130
    except BrokenPipeError:
        code = 0
    except OSError as exc:
        # A file loraq was not told about can still fail (a full disk, a home that is a
        # file or read-only): one line naming it, as for every other error.
        where = f"{exc.filename}: " if exc.filename else ""
        _err(f"loraq: {where}{exc.strerror or exc}")
        code = 1
    except Exception as exc:
        # Typer's (vendored) click usage errors: a bad option, a missing argument.
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            if type(exc).__name__ == "NoArgsIsHelpError":
                _err(exc.format_message())
            else:
                _err(f"loraq: {exc.format_message()}")
            code = exc.exit_code
        else:
            # A bug of loraq's: the user still gets one line, with where it happened;
            # LORAQ_DEBUG=1 shows the traceback.
            if os.environ.get("LORAQ_DEBUG"):
                raise
            _err(f"loraq: internal error (a bug; please report it): {type(exc).__name__}: {exc} "
                 f"(at {_innermost(exc)}; LORAQ_DEBUG=1 shows the traceback)")
            code = 1
    sys.exit(code if isinstance(code, int) else 0)


def _innermost(exc: BaseException) -> str:
    """``file:line`` of the innermost frame inside loraq where ``exc`` was raised."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}loraq{os.sep}" in f.filename]
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


if __name__ == "__main__":
    main()
