"""Pages and the fragments that live updates swap in, from one set of Jinja templates.

Autoescaping is on for every template: a job name, a path, an error, a log line or
a generation is text, whatever characters it holds. Every such text also goes
through :func:`loraq.escape.printable_lines` first, as the command line's does: a
bidirectional override or another control character shows as ``\u202e``, never
reorders what a person reads. The only markup that is not
escaped is the loss-curve SVG, which :func:`loraq.report.loss_svg` builds from
numbers (its one text, the metric name, escaped there).

A page and a live update of it render the same macros, so the two cannot disagree.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from .. import report
from ..api import JobRow, ShowResult
from ..escape import printable_lines
from ..queue.records import STATES, QueueState, StoredJob

TEMPLATES = Path(__file__).with_name("templates")
STATIC = Path(__file__).with_name("static")

#: Most generations and log bytes a page shows (the whole log is a link away).
MAX_GENERATIONS = 50
LOG_TAIL = 64 * 1024


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _when(ts: float | None) -> str:
    return "—" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _visible(value: Any) -> Any:
    """Text for a page: control and bidi characters escaped (markup we built, such as a macro's, is left)."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return printable_lines(value)
    return value


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(default=True,
                      default_for_string=True), undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      finalize=_visible)
    env.globals.update(num=_num, when=_when, duration=_duration, STATES=STATES)
    return env


@dataclass(frozen=True)
class JobView:
    """What the job page shows of :class:`loraq.api.ShowResult`, taken apart for the templates."""

    row: JobRow
    show: ShowResult
    curves: Markup
    has_reference: bool
    spec: dict[str, Any]
    metrics: list[tuple[str, Any, Any]]  # name, base, adapter
    generations: list[dict[str, str]]
    findings: list[dict[str, Any]]
    inspection_passed: bool | None

    @classmethod
    def of(cls, show: ShowResult) -> JobView:
        job = show.job
        result = job.result if isinstance(job.result, dict) else {}
        reference = job.base_eval_loss
        svg = report.loss_svg(report.curves_of(show.metrics), reference=reference, width=760, height=240)
        inspection = show.inspection if isinstance(show.inspection, dict) else None
        return cls(
            row=JobRow.of(job), show=show, curves=Markup(svg), has_reference=reference is not None,
            spec=_spec_summary(job.spec), metrics=_metrics(result.get("metrics")),
            generations=_generations(result),
            findings=[f for f in (inspection or {}).get("findings", []) if isinstance(f, dict)],
            inspection_passed=None if inspection is None else bool(inspection.get("passed")),
        )


def _spec_summary(stored: StoredJob) -> dict[str, Any]:
    settings = stored.settings
    lora, training = settings.lora, settings.training
    return {
        "base model": stored.base_model,
        "dataset": stored.dataset_path,
        "dataset rows": stored.dataset_rows,
        "sweep": settings.group,
        # preference tuning (issue 23): dpo beta 0.1, after sft
        "method": " ".join([str(settings.method.get("type")), *(
            f"{k} {v}" for k, v in sorted(settings.method.items()) if v is not None and k not in ("type", "loss"))])
        + (f", after {settings.after}" if settings.after else "") if settings.method is not None else None,
        "LoRA": ", ".join(f"{k} {lora[k]}" for k in ("r", "alpha", "dropout", "target_modules") if k in lora) or None,
        "training": ", ".join(f"{k} {training[k]}" for k in ("max_steps", "epochs", "learning_rate", "batch_size",
                                                            "max_seq_len") if training.get(k) is not None) or None,
    }


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _metrics(raw: Any) -> list[tuple[str, Any, Any]]:
    """A result's metrics as (name, base, adapter) rows, in either shape a result carries them:

    ``{"exact_match": {"base": 0.0, "adapter": 0.9}}``, or the protocol's flat
    ``{"exact_match": 0.9, "base_exact_match": 0.0}``. Anything else is left out.
    """
    if not isinstance(raw, dict):
        return []
    rows = []
    for name, value in raw.items():
        name = str(name)
        if isinstance(value, dict):
            rows.append((name, value.get("base"), value.get("adapter")))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if name.startswith("base_") and name[5:] in raw:
                continue  # shown beside the adapter's value
            if name.startswith("base_"):
                rows.append((name[5:], value, None))
            else:
                rows.append((name, raw.get(f"base_{name}"), value))
    return rows


def _generations(result: dict[str, Any]) -> list[dict[str, str]]:
    """Sample generations, base beside adapter: ``result["generations"]``, or ``extras["samples"]``."""
    extras = _mapping(result.get("extras"))
    raw = next((r for r in (result.get("generations"), extras.get("generations"), extras.get("samples"))
                if isinstance(r, list)), None)
    if raw is None:
        return []
    keys = ("prompt", "reference", "base", "adapter")
    return [{k: "" if g.get(k) is None else str(g.get(k)) for k in keys} for g in raw[:MAX_GENERATIONS]
            if isinstance(g, dict)]


class Renderer:
    """The templates, with the token the action forms carry."""

    def __init__(self, token: str, home: Path) -> None:
        self.env = environment()
        self.env.globals.update(token=token, home=str(home))
        self._rows = self.env.get_template("_queue.html").module
        self._job = self.env.get_template("_job.html").module

    def page(self, name: str, **context: Any) -> str:
        return self.env.get_template(name).render(**context)

    # ---------------------------------------------------------------- queue fragments

    def row(self, job: JobRow) -> str:
        return str(self._rows.job_row(job))  # type: ignore[attr-defined]

    def totals(self, counts: dict[str, int], groups: dict[str, dict[str, int]], queue: QueueState | None) -> dict[str, str]:
        return {
            "counts": str(self._rows.counts(counts)),  # type: ignore[attr-defined]
            "groups": str(self._rows.groups(groups)),  # type: ignore[attr-defined]
            "queue-state": str(self._rows.queue_state(queue)),  # type: ignore[attr-defined]
        }

    def queue_update(self, seq: int, rows: list[dict[str, Any]], counts: dict[str, int],
                     groups: dict[str, dict[str, int]], queue: QueueState | None) -> dict[str, Any]:
        """The queue page's live update: each changed row as HTML, and the totals above the table."""
        jobs = [JobRow.of_listing(row) for row in rows]
        return {"seq": seq,
                "rows": [{"id": job.id, "seq": job.seq, "status": job.status, "group": job.group, "html": self.row(job)}
                         for job in jobs],
                "sections": self.totals(counts, groups, queue)}

    # ---------------------------------------------------------------- job fragments

    def job_sections(self, view: JobView) -> dict[str, str]:
        return {f"job-{name}": str(getattr(self._job, name)(view))
                for name in ("header", "curves", "outputs", "inspection", "attempts", "events")}
