"""The queue report: what ran, how it went, and why anything failed.

Built from the store alone (torch-free). One :class:`Report` (``build``; a ``TypedDict``, so
its JSON is the object itself) rendered three ways:
JSON for scripts, Markdown for a pull request or a chat, and a self-contained HTML
page with the train/eval loss curves drawn as inline SVG. Written atomically.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, TypedDict

from . import fsutil
from .escape import md_cell, printable
from .queue import controls
from .queue.records import PRUNED, Job
from .queue.store import Store
from .supervisor import publish
from .workspace import Home

FORMATS = ("json", "md", "html")
REPORT_VERSION = 1


class AttemptEntry(TypedDict):
    n: int
    outcome: str | None  # "running" while it has not ended
    error_kind: str | None
    reason: str | None
    resumed_from_step: int | None
    last_step: int | None
    counted: bool
    duration_s: float | None


class Sample(TypedDict):
    """One eval prompt answered greedily by the base and by the adapter, as text."""

    prompt: str
    reference: str
    base: str
    adapter: str


class JobEntry(TypedDict):
    """One job of the report (its ``"jobs"``)."""

    id: int
    name: str
    status: str
    base_model: str | None
    dataset: str | None
    dataset_sha256: str | None
    dataset_rows: int | None
    n_train: int | None
    n_eval: int | None
    attempts: list[AttemptEntry]
    attempts_used: int
    max_attempts: int
    duration_s: float | None
    steps: int | None
    train_loss: float | None
    eval_loss: float | None
    base_eval_loss: float | None
    verdict: str | None
    error_kind: str | None
    error: str | None
    adapter: str | None
    adapter_bytes: int | None
    findings: list[dict[str, Any]]  # the inspection's findings, as JSON
    serving: dict[str, Any]  # engine -> the inspection's serving verdict, as JSON
    curves: dict[str, list[list[float]]]
    group: str | None  # the sweep it belongs to
    gate_metric: str | None
    sweep: dict[str, Any] | None  # the sweep's settings for this job
    halving: dict[str, Any] | None
    after: str | None  # the job it waited on (after:), if any
    auto: dict[str, Any] | None
    oom_adjustments: list[dict[str, Any]]
    stopping: dict[str, Any] | None
    controls: list[str]
    metrics: dict[str, Any]
    samples: list[Sample]


class _Ranked(TypedDict):
    name: str
    status: str
    eval_loss: float | None
    base_eval_loss: float | None
    settings: dict[str, Any]
    best: bool


class RankingEntry(_Ranked, total=False):
    """A job's place in its sweep; ``value``/``base_value`` where a grader gated it, ``round``/``pruned`` under halving."""

    value: float | None
    base_value: float | None
    round: int | None
    pruned: str | None


class SweepGroup(TypedDict):
    metric: str
    ranking: list[RankingEntry]
    higher_is_better: bool
    best: str | None  # the best job that passed, by ``metric``


class QueueEntry(TypedDict):
    paused: bool
    pause_reason: str | None


class Report(TypedDict):
    """The queue report, as ``report.json`` holds it (``loraq_report``: its version)."""

    loraq_report: int
    generated_at: float
    home: str
    counts: dict[str, int]
    queue: QueueEntry
    jobs: list[JobEntry]
    sweeps: dict[str, SweepGroup]


def build(store: Store, home: Home, jobs_of: list[Job] | None = None) -> Report:
    """The report of every job, or of ``jobs_of`` only (a page of them: the dashboard's report page)."""
    jobs: list[JobEntry] = []
    for job in store.jobs() if jobs_of is None else jobs_of:
        attempts = store.attempts(job.id)
        curves = curves_of(store.metrics(job.id))
        inspection = publish.job_inspection(home, job)
        adapter = (job.result or {}).get("adapter")
        size = _folder_size(Path(adapter)) if adapter and Path(adapter).is_dir() else None
        jobs.append({
            "id": job.id,
            "name": job.name,
            "status": job.status,
            "base_model": job.spec.base_model,
            "dataset": job.spec.dataset_path,
            "dataset_sha256": job.dataset_sha256,
            "dataset_rows": job.spec.dataset_rows,
            "n_train": (job.result or {}).get("n_train"),
            "n_eval": (job.result or {}).get("n_eval"),
            "attempts": [
                {"n": a.n, "outcome": a.outcome or ("running" if a.ended_at is None else None),
                 "error_kind": a.error_kind, "reason": a.reason, "resumed_from_step": a.resumed_from_step,
                 "last_step": a.last_step, "counted": bool(a.counted),
                 "duration_s": round(a.ended_at - a.started_at, 3) if a.ended_at else None}
                for a in attempts
            ],
            "attempts_used": job.attempts,
            "max_attempts": job.max_retries + 1,
            "duration_s": round(job.finished_at - job.started_at, 3) if job.finished_at and job.started_at else None,
            "steps": job.progress_step,
            "train_loss": job.train_loss,
            "eval_loss": job.eval_loss,
            "base_eval_loss": job.base_eval_loss,
            "verdict": job.verdict,
            "error_kind": job.error_kind,
            "error": job.error,
            "adapter": adapter,
            "adapter_bytes": size,
            "findings": (inspection or {}).get("findings", []),
            "serving": (inspection or {}).get("serving") or {},
            "curves": curves,
            "group": job.spec.settings.group,
            "gate_metric": gate_metric(job.spec.settings.validation),
            "sweep": job.spec.sweep,
            "halving": job.halving.as_json() if job.halving else None,
            "after": job.spec.settings.after,  # the job it waited on (after:), if any
            "auto": job.spec.auto,
            "oom_adjustments": list(job.spec.oom_adjustments),
            "stopping": ((job.result or {}).get("extras") or {}).get("stopping"),
            "controls": controls.control_lines(job),
            # quality you can see: exact match base -> adapter, and a few answers side by side
            "metrics": _dict((job.result or {}).get("metrics")),
            "samples": _samples(job.result),
        })
    state = store.queue_state()
    return {
        "loraq_report": REPORT_VERSION,
        "generated_at": time.time(),
        "home": str(home.root),
        "counts": store.counts(),
        "queue": {"paused": state.paused, "pause_reason": state.pause_reason},
        "jobs": jobs,
        "sweeps": sweeps_of(jobs),
    }


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _samples(result: dict[str, Any] | None) -> list[Sample]:
    """``extras["samples"]`` of a result: ``[{prompt, reference, base, adapter}, ...]``, as text."""
    raw = _dict(_dict(result).get("extras")).get("samples")
    if not isinstance(raw, list):
        return []
    return [Sample(prompt=_text(s.get("prompt")), reference=_text(s.get("reference")), base=_text(s.get("base")),
                   adapter=_text(s.get("adapter"))) for s in raw if isinstance(s, dict)]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def exact_match_line(metrics: dict[str, Any]) -> str | None:
    """``exact match 0.000 → 0.938; rouge_l 0.412 → 0.733`` (base → adapter, each metric the job measured),
    or ``None`` when it measured none."""
    names = [k for k in metrics if not k.startswith("base_") and k != "rss_mb"]
    if not names:
        return None
    return "; ".join(f"{'exact match' if k == 'exact_match' else k} {_num(metrics.get(f'base_{k}'), 3)} → "
                     f"{_num(metrics.get(k), 3)}" for k in names)


def _md_cell(text: str, limit: int = 200, *, tail: bool = False) -> str:
    """``text`` as one Markdown table cell: code, one line, at most ``limit`` characters (its end if ``tail``)."""
    if len(text) > limit:
        text = "…" + text[-(limit - 1):] if tail else text[:limit - 1] + "…"
    flat = printable(text.replace("\n", "⏎"))  # a model's answer may hold control characters too
    return "`" + flat.replace("`", "'").replace("|", "\\|") + "`" if flat else ""


def gate_metric(validation: dict[str, Any]) -> str | None:
    """The metric that gates a job besides the eval loss: the first of ``validation.min`` (or ``min_exact_match``)."""
    minimums = validation.get("min") or {}
    if minimums:
        return str(next(iter(minimums)))
    return "exact_match" if validation.get("min_exact_match") is not None else None


def _value(job: JobEntry, metric: str, base: bool = False) -> float | None:
    if metric == "eval_loss":
        return job["base_eval_loss"] if base else job["eval_loss"]
    value = (job.get("metrics") or {}).get(f"base_{metric}" if base else metric)
    return float(value) if isinstance(value, (int, float)) else None


def sweeps_of(jobs: list[JobEntry]) -> dict[str, SweepGroup]:
    """Each sweep's jobs ranked by the metric that gated it, the best marked: a grader of ``validation.min``
    (higher first), else the eval loss (lower first); jobs without one last.

    Only a job that passed (completed) can be the best: a lower eval loss on an adapter
    that failed inspection is not a result.
    """
    members: dict[str, list[JobEntry]] = {}
    for job in jobs:
        if group := job.get("group"):
            members.setdefault(group, []).append(job)
    out: dict[str, SweepGroup] = {}
    for name, group_jobs in members.items():
        metric = group_jobs[0].get("gate_metric") or "eval_loss"
        sign = 1.0 if metric == "eval_loss" else -1.0  # graders: higher is better

        def key(j: JobEntry, metric: str = metric, sign: float = sign) -> tuple[Any, ...]:
            value = _value(j, metric)
            # A halving sweep: the rounds a job reached first (an eval loss of an earlier round is of fewer steps).
            return (-((j.get("halving") or {}).get("round") or 0), value is None, j["status"] != "completed",
                    sign * value if value is not None else 0.0, j["id"])

        ranked = sorted(group_jobs, key=key)
        best = next((j for j in ranked if j["status"] == "completed" and _value(j, metric) is not None), None)
        out[name] = SweepGroup(metric=metric, higher_is_better=sign < 0, best=best["name"] if best else None,
                               ranking=[_ranking_entry(j, metric, best is not None and j["name"] == best["name"])
                                        for j in ranked])
    return out


def _ranking_entry(j: JobEntry, metric: str, best: bool) -> RankingEntry:
    entry = RankingEntry(name=j["name"], status=j["status"], eval_loss=j["eval_loss"],
                         base_eval_loss=j["base_eval_loss"], settings=j.get("sweep") or {}, best=best)
    if metric != "eval_loss":
        entry["value"], entry["base_value"] = _value(j, metric), _value(j, metric, base=True)
    if halving := j.get("halving"):
        entry["round"] = halving.get("round")
        entry["pruned"] = halving.get("why") if halving.get("state") == PRUNED else None
    return entry


def _status_cell(entry: RankingEntry) -> str:
    """A sweep ranking's status, with why halving pruned the job."""
    return entry["status"] + (f" ({entry['pruned']})" if entry.get("pruned") else "")


def curves_of(metrics: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """The train and eval loss curves (``name -> [[step, value], ...]``) of a job's metric rows."""
    curves: dict[str, list[list[float]]] = {}
    for row in metrics:
        if row["name"] in ("loss", "eval_loss"):
            curves.setdefault(row["name"], []).append([row["step"], row["value"]])
    return curves


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


#: Engine names in the report, in order (the keys of an inspection's "serving").
SERVING_LABELS = {"vllm": "vLLM", "lorax": "LoRAX", "llamacpp": "llama.cpp"}


def serving_cell(serving: dict[str, Any]) -> str:
    """``vLLM yes (--max-lora-rank 8) · LoRAX yes · llama.cpp no``: one word per engine."""
    words = {True: "yes", False: "no", None: "?"}
    parts = []
    for engine, label in SERVING_LABELS.items():
        verdict = serving.get(engine)
        if verdict is not None:
            flags = f" ({verdict['flags']})" if verdict.get("servable") and verdict.get("flags") else ""
            parts.append(f"{label} {words.get(verdict.get('servable'), '?')}{flags}")
    return " · ".join(parts) or "—"


def serving_reasons(serving: dict[str, Any]) -> list[str]:
    """Each engine's "no" (or "cannot tell") with its reasons, one line an engine."""
    return [f"{SERVING_LABELS.get(engine, engine)}: {'no' if v.get('servable') is False else 'cannot tell'}: "
            + "; ".join(v.get("why") or []) for engine, v in serving.items() if not v.get("servable")]


def to_markdown(report: Report) -> str:
    # Every value from the store goes through md_cell: a name or a reason is text, never
    # HTML (<script>, <img onerror>) or a table break (a newline, a pipe).
    m = md_cell
    counts = report["counts"]
    lines = [
        "# loraq queue report",
        "",
        f"Home {m(report['home'])}, generated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(report['generated_at']))}.",
        "",
        " · ".join(f"{counts[k]} {k}" for k in ("completed", "failed", "running", "pending", "cancelled")),
        "",
    ]
    if report["queue"]["paused"]:
        lines += [f"**Queue paused:** {m(report['queue']['pause_reason'])}", ""]
    lines += [
        "| job | status | attempts | steps | train loss | eval loss base → adapter | adapter | time | serving |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for job in report["jobs"]:
        lines.append(
            f"| {m(job['name'])} | {m(job['status'])} | {job['attempts_used']}/{job['max_attempts']} | {_num(job['steps'])} "
            f"| {_num(job['train_loss'])} | {_num(job['base_eval_loss'])} → {_num(job['eval_loss'])} "
            f"| {_bytes(job['adapter_bytes'])} | {_num(job['duration_s'], 1)} s | {serving_cell(job['serving'])} |"
        )
    for name, group in report.get("sweeps", {}).items():
        better = "higher" if group.get("higher_is_better") else "lower"
        graded = bool(group["ranking"]) and "value" in group["ranking"][0]
        lines += ["", f"## sweep {name}", "", f"Ranked by {group['metric']} ({better} is better).", "",
                  "| rank | job | settings | status | eval loss base → adapter | "
                  + (f"{group['metric']} base → adapter | " if graded else "") + "|",
                  "| --- | --- | --- | --- | --- | --- |" + (" --- |" if graded else "")]
        for rank, entry in enumerate(group["ranking"], 1):
            settings = ", ".join(f"{k}={v}" for k, v in entry["settings"].items())
            lines.append(f"| {rank} | {entry['name']} | {settings} | {_status_cell(entry)} | {_num(entry['base_eval_loss'])}"
                         f" → {_num(entry['eval_loss'])} | "
                         + (f"{_num(entry['base_value'], 3)} → {_num(entry['value'], 3)} | " if graded else "")
                         + f"{'**best**' if entry['best'] else ''} |")
    for job in report["jobs"]:
        problems = [a for a in job["attempts"] if a["reason"]]
        findings = [f for f in job["findings"] if f.get("severity") in ("error", "warning")]
        not_served = serving_reasons(job["serving"])
        quality = exact_match_line(job.get("metrics") or {})
        samples = job.get("samples") or []
        if not problems and not findings and not not_served and not job.get("controls") and not quality and not samples:
            continue
        lines += ["", f"## {m(job['name'])}", ""]
        lines += [f"- {m(quality)} (greedy answers to the eval prompts)"] if quality else []
        lines += [f"- {m(line)}" for line in job.get("controls") or []]
        for attempt in job["attempts"]:
            resumed = f", resumed from step {attempt['resumed_from_step']}" if attempt["resumed_from_step"] else ""
            reason = f": {m(attempt['error_kind'])}: {m(attempt['reason'])}" if attempt["reason"] else ""
            lines.append(f"- attempt {attempt['n']}: {m(attempt['outcome'])}{resumed}{reason}")
        for finding in findings:
            lines.append(f"- {m(finding['severity'])} `{m(finding['code'])}`: {m(finding['message'])}")
        for line in not_served:
            lines.append(f"- serving: {m(line)}")
        if samples:
            lines += ["", "| prompt (its end) | reference | base | adapter |", "| --- | --- | --- | --- |"]
            lines += [f"| {_md_cell(x['prompt'], 80, tail=True)} | {_md_cell(x['reference'])} | {_md_cell(x['base'])} "
                      f"| {_md_cell(x['adapter'])} |" for x in samples]
    return "\n".join(lines) + "\n"


#: Colours of the curves, in the SVG and in the legends (CSS classes ``key loss`` / ``key eval_loss``).
CURVE_COLORS = {"loss": "#2563eb", "eval_loss": "#dc2626"}
REFERENCE_COLOR = "#6b7280"


def loss_svg(curves: dict[str, list[list[float]]], *, reference: float | None = None, width: int = 360,
             height: int = 140) -> str:
    """Loss curves (``name -> [[step, value], ...]``) as inline SVG, with ``reference`` dashed across.

    The report and the dashboard (``loraq serve``) both draw with this. It holds no
    script and no ``style`` attribute, so it renders under a strict Content-Security-Policy;
    ``data-points`` counts the points drawn (the dashboard's tests watch it grow).
    """
    points = [p for series in curves.values() for p in series if math.isfinite(p[1])]
    if not points:
        return "<span class=muted>no metrics yet</span>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if reference is not None and math.isfinite(reference):
        ys.append(reference)
    else:
        reference = None
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    pad = 28

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - pad - 8)

    def sy(y: float) -> float:
        return 8 + (y1 - y) / (y1 - y0) * (height - pad - 8)

    parts = [(f'<svg class="curves" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
              f'aria-label="loss curves" data-points="{len(points)}">'),
             f'<line x1="{pad}" y1="{height - pad + 8}" x2="{width - 8}" y2="{height - pad + 8}" stroke="#999"/>',
             f'<line x1="{pad}" y1="8" x2="{pad}" y2="{height - pad + 8}" stroke="#999"/>',
             f'<text x="2" y="14" font-size="10">{y1:.2f}</text><text x="2" y="{height - pad + 8}" font-size="10">{y0:.2f}</text>',
             f'<text x="{width - 40}" y="{height - 6}" font-size="10">step {int(x1)}</text>']
    if reference is not None:
        parts.append(f'<line x1="{pad}" y1="{sy(reference):.1f}" x2="{width - 8}" y2="{sy(reference):.1f}" '
                     f'stroke="{REFERENCE_COLOR}" stroke-dasharray="4 3"><title>base eval loss {reference:.4f}</title></line>')
    for name, series in curves.items():
        finite = [p for p in series if math.isfinite(p[1])]
        if not finite:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
        color = CURVE_COLORS.get(name, "#555")
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}">'
                     f'<title>{html.escape(name)}</title></polyline>')
        if len(finite) == 1:
            x, y = finite[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>')
    parts.append("</svg>")
    return "".join(parts)


def legend_html(reference: bool = True) -> str:
    return ("<div class=legend><span class='key loss'>■ train</span> <span class='key eval_loss'>■ eval</span>"
            + (" <span class='key reference'>┄ base eval</span>" if reference else "") + "</div>")


#: The report's style sheet: inline in the report file, served as a file by the dashboard.
REPORT_CSS = f"""
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 6px 8px; vertical-align: top; text-align: left; }}
tr.failed td:nth-child(2) {{ color: #b91c1c; font-weight: bold; }}
tr.completed td:nth-child(2) {{ color: #15803d; font-weight: bold; }}
.muted {{ color: #777; font-size: 12px; }} .warn {{ color: #b45309; font-weight: bold; }}
ul {{ margin: 0; padding-left: 1.2em; }} .legend {{ font-size: 11px; }}
.key.loss {{ color: {CURVE_COLORS["loss"]}; }} .key.eval_loss {{ color: {CURVE_COLORS["eval_loss"]}; }}
.key.reference {{ color: {REFERENCE_COLOR}; }}
"""


def body_html(report: Report) -> str:
    """The report's content (heading, counts, one row a job), every value escaped."""
    e = html.escape
    rows = []
    for job in report["jobs"]:
        findings = "".join(
            f"<li><b>{e(str(f.get('severity')))}</b> <code>{e(str(f.get('code')))}</code> {e(str(f.get('message')))}</li>"
            for f in job["findings"] if f.get("severity") in ("error", "warning"))
        attempts = "".join(f"<li>{e(line)}</li>" for line in job.get("controls") or []) + "".join(
            f"<li>attempt {a['n']}: {e(str(a['outcome']))}"
            + (f", resumed from step {a['resumed_from_step']}" if a["resumed_from_step"] else "")
            + (f": {e(str(a['error_kind']))}: {e(str(a['reason']))}" if a["reason"] else "") + "</li>"
            for a in job["attempts"])
        serving = ""
        if job["serving"]:
            serving = (f"<p class=serving>serving: {e(serving_cell(job['serving']))}</p>"
                       + "<ul>" + "".join(f"<li>{e(line)}</li>" for line in serving_reasons(job["serving"])) + "</ul>")
        rows.append(
            f"<tr class='{e(job['status'])}'><td><b>{e(job['name'])}</b><br><span class=muted>{e(str(job['base_model']))}</span>"
            f"<br><span class=muted>{e(Path(str(job['dataset'])).name)}: {job['dataset_rows'] or '?'} rows"
            + (f", {job['n_train']} train / {job['n_eval']} eval" if job["n_train"] else "") + "</span></td>"
            f"<td>{e(job['status'])}</td><td>{job['attempts_used']}/{job['max_attempts']}</td>"
            f"<td>{_num(job['base_eval_loss'])} → <b>{_num(job['eval_loss'])}</b>{_quality_html(job)}</td>"
            f"<td>{loss_svg(job['curves'], reference=job['base_eval_loss'])}{legend_html(job['base_eval_loss'] is not None)}</td>"
            f"<td>{_bytes(job['adapter_bytes'])}<br>{_num(job['duration_s'], 1)} s</td>"
            f"<td><ul>{attempts}</ul><ul>{findings}</ul>{serving}</td></tr>"
        )
    counts = " · ".join(f"{report['counts'][k]} {k}" for k in ("completed", "failed", "running", "pending", "cancelled"))
    sweeps = "".join(
        f"<h2>sweep {e(name)}</h2><p>ranked by {e(group['metric'])} "
        f"({'higher' if group.get('higher_is_better') else 'lower'} is better)</p><table><thead><tr><th>rank</th>"
        "<th>job</th><th>settings</th><th>status</th><th>eval loss base → adapter</th><th></th></tr></thead><tbody>"
        + "".join(f"<tr><td>{rank}</td><td>{e(entry['name'])}</td><td>"
                  f"{e(', '.join(f'{k}={v}' for k, v in entry['settings'].items()))}</td><td>{e(_status_cell(entry))}</td>"
                  f"<td>{_num(entry['base_eval_loss'])} → {_num(entry['eval_loss'])}</td>"
                  f"<td>{'<b>best</b>' if entry['best'] else ''}</td></tr>"
                  for rank, entry in enumerate(group["ranking"], 1)) + "</tbody></table>"
        for name, group in report.get("sweeps", {}).items())
    paused = f"<p class=warn>Queue paused: {e(str(report['queue']['pause_reason']))}</p>" if report["queue"]["paused"] else ""
    return f"""<h1>loraq queue report</h1>
<p>Home <code>{e(report['home'])}</code> · {counts}</p>{paused}
<table><thead><tr><th>job</th><th>status</th><th>attempts</th><th>eval loss base → adapter</th><th>loss curves</th><th>size / time</th><th>attempts and findings</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
{sweeps}"""


def _quality_html(job: JobEntry) -> str:
    """Exact match base → adapter, and the samples base beside adapter, under the eval loss."""
    e = html.escape
    line = exact_match_line(job.get("metrics") or {})
    out = f"<br><span class=quality>{e(line)}</span>" if line else ""
    samples = job.get("samples") or []
    if samples:
        out += ("<details class=samples><summary>samples</summary><table><thead><tr><th>prompt</th><th>reference</th>"
                "<th>base</th><th>adapter</th></tr></thead><tbody>"
                + "".join(f"<tr><td><pre>{e(x['prompt'][-300:])}</pre></td><td><pre>{e(x['reference'])}</pre></td>"
                          f"<td><pre>{e(x['base'])}</pre></td><td><pre>{e(x['adapter'])}</pre></td></tr>"
                          for x in samples) + "</tbody></table></details>")
    return out


def to_html(report: Report) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loraq report</title>
<style>body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}{REPORT_CSS}</style></head><body>
{body_html(report)}</body></html>
"""


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    if fmt == "md":
        return to_markdown(report)
    if fmt == "html":
        return to_html(report)
    raise ValueError(f"unknown report format {fmt!r}")


def write(home: Home, store: Store, fmt: str, output: Path | None = None) -> tuple[Path, str]:
    """Build the report, write it atomically (default ``<home>/reports/report.<ext>``)."""
    text = render(build(store, home), fmt)
    target = output or home.reports_dir / f"report.{fmt}"
    save(target, text)
    return target, text


def save(target: Path, text: str) -> Path:
    """Write a rendered report atomically; ``target`` is the operator's (``-o``) or the home's."""
    return fsutil.atomic_write_text(target, text)
