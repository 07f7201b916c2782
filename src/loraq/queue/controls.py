"""How a job's training controls read to people: ``show``, the report and the dashboard (issue 12).

From the job as the store hands it out (:class:`~.records.Job`): the sweep it
belongs to and its settings there, the warm start, what each ``auto`` resolved
to, each out-of-memory adjustment, the step that was published and why training
stopped. Standard library only.
"""

from __future__ import annotations

from typing import Any

from . import auto, halving, sweep
from .records import Job


def control_lines(job: Job) -> list[str]:
    """``show`` and the report: the sweep, ``auto → value``, each OOM adjustment, the published step and why it stopped."""
    stored, settings = job.spec, job.spec.settings
    out = []
    if settings.group:
        out.append(f"sweep:      {settings.group} ({sweep.describe(stored.sweep or {})})")
    if member := job.halving:
        out.append(f"halving:    round {member.round} of {member.plan.rounds} "
                   f"({member.state}); {halving.describe(member.plan.as_json())}")
        out += [f"halving:    round {h.get('round')}: eval loss {_loss(h.get('eval_loss'))}, ranked {h.get('rank')} "
                f"of {h.get('of')}" for h in member.history]
        if member.why and member.is_out:
            out.append(f"halving:    {member.why}")
    if stored.init_from_path:
        started = settings.init_from or f"after {settings.after}"
        out.append(f"warm start: {started} ({stored.init_from_path})")
    out += [f"auto:       {line}" for line in auto.lines(stored.auto)]
    out += [f"oom:        {adjustment_line(a)}" for a in stored.oom_adjustments]
    stopping = ((job.result or {}).get("extras") or {}).get("stopping")
    if stopping:
        out.append(f"published:  step {stopping.get('published_step')} ({stopping.get('published_because')})")
        out.append(f"stopped:    step {stopping.get('stopped_at')} ({stopping.get('stopped_because')})")
    return out


def adjustment_line(adjustment: dict[str, Any]) -> str:
    """``micro-batch 8 → 4, grad_accum 1 → 2 at step 3 (asked for 1.5 GiB); resumed from step 2``."""
    before, after = adjustment.get("before") or {}, adjustment.get("after") or {}
    changes = [f"{label} {before.get(key)} → {after.get(key)}" for key, label in
               (("batch_size", "micro-batch"), ("grad_accum", "grad_accum"),
                ("gradient_checkpointing", "gradient checkpointing")) if before.get(key) != after.get(key)]
    asked = f" (asked for {adjustment['asked']})" if adjustment.get("asked") else ""
    resumed = adjustment.get("resume_step")
    return (", ".join(changes) + f" after out of memory at step {adjustment.get('step')}{asked}; "
            + (f"resumed from checkpoint step {resumed}" if resumed else "restarted from step 0"))


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "unknown"
