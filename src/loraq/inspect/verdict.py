"""The verdict on a trained adapter: the inspector's report plus the queue's gates, as one :class:`Inspection`.

The worker inspects the staged folder (:func:`~.adapter.inspect_adapter`) and hands
the report here with what the trainer measured and the job's validation settings;
this module alone decides which gates apply and whether the adapter passes:

* the serving gate: the engines the queue requires (``serving: [...]``) on the adapter itself;
* the quality gate: the eval loss at least ``validation.min_eval_loss_drop`` below the base's;
* the metric gates: ``validation.min: {metric: value}`` (and ``validation.min_exact_match``,
  the older spelling of ``min: {exact_match: ...}``) on the adapter's measured metrics.

Torch-free, and free of the queue and the protocol: what it reads of the trainer's
result and the job's settings is described by the protocols below.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from . import serving as serving_verdicts
from .structure import Finding, Inspection, Severity

#: Metrics whose measurement may be missing without failing a gate on them: a model judge that did not
#: answer (a server down, a timeout) never fails the job, it leaves a warning.
OPTIONAL_METRICS = ("judge",)


class Trained(Protocol):
    """What the verdict reads of a finished training attempt (:class:`loraq.protocol.TrainResult`)."""

    @property
    def base_eval_loss(self) -> float | None: ...
    @property
    def eval_loss(self) -> float | None: ...
    @property
    def metrics(self) -> Mapping[str, float]: ...


class Validation(Protocol):
    """The job's validation settings the gates read (:class:`loraq.queue.spec.ValidationSpec`)."""

    @property
    def min_eval_loss_drop(self) -> float: ...
    @property
    def min_exact_match(self) -> float | None: ...
    @property
    def min(self) -> Mapping[str, float]: ...


def minimums(validation: Validation) -> dict[str, float]:
    """Every metric gate of ``validation``: ``min`` with ``min_exact_match`` folded in."""
    gates = dict(validation.min)
    if validation.min_exact_match is not None:
        gates.setdefault("exact_match", validation.min_exact_match)
    return gates


def verdict(report: Inspection, trained: Trained, validation: Validation, serving: Iterable[str] = ()) -> Inspection:
    """``report`` with the gates of ``validation`` and ``serving`` applied to what ``trained`` measured.

    The returned inspection passes when no finding is an error; its ``quality`` holds the
    eval losses, each measured metric for base and adapter, and the gates that judged them.
    """
    findings = list(report.findings)
    # The queue's serving gate, again on the adapter itself: submit judged only the settings.
    for judged, why in serving_verdicts.gate(report.serving, serving):
        word = "will not serve it" if judged.servable is False else "cannot be judged"
        findings.append(Finding("serving", "error", f"{judged.label} {word}: {why.message}"))
    if (gate := quality_gate(trained.base_eval_loss, trained.eval_loss, validation.min_eval_loss_drop)) is not None:
        findings.append(gate)
    metrics = trained.metrics
    gates = minimums(validation)
    for name, minimum in gates.items():
        if name == "exact_match" and validation.min_exact_match is not None and "exact_match" not in validation.min:
            found = exact_match_gate(metrics.get(name), minimum, metrics.get(f"base_{name}"))
        else:
            found = metric_gate(name, metrics.get(name), minimum, metrics.get(f"base_{name}"))
        if found is not None:
            findings.append(found)
    quality: dict[str, Any] = {"base_eval_loss": finite_or_none(trained.base_eval_loss),
                               "eval_loss": finite_or_none(trained.eval_loss),
                               "min_eval_loss_drop": validation.min_eval_loss_drop}
    if "exact_match" in metrics:
        quality |= {"exact_match": finite_or_none(metrics.get("exact_match")),
                    "base_exact_match": finite_or_none(metrics.get("base_exact_match")),
                    "min_exact_match": validation.min_exact_match}
    graded = {name: {"base": finite_or_none(metrics.get(f"base_{name}")), "adapter": finite_or_none(value)}
              for name, value in metrics.items() if not name.startswith("base_") and name != "exact_match"}
    if graded:
        quality["metrics"] = graded
    if gates:
        quality["min"] = gates
    return dataclasses.replace(report, findings=findings, quality=quality)


def quality_gate(base_eval_loss: float | None, eval_loss: float | None, min_drop: float) -> Finding | None:
    """The queue's quality gate: the adapter's eval loss must be at most ``base_eval_loss - min_drop``.

    With ``min_drop`` 0 the adapter must simply not be worse than the base.
    Returns ``None`` when it passes, or when a loss is missing (nothing to judge);
    a non-finite loss is an error.
    """
    if base_eval_loss is None or eval_loss is None:
        return None
    if not all(math.isfinite(x) for x in (base_eval_loss, eval_loss, min_drop)):
        return Finding("quality_gate", "error", f"eval loss {eval_loss} vs base {base_eval_loss} (min drop "
                                                f"{min_drop}) is not finite; the adapter or the eval data is broken")
    if eval_loss <= base_eval_loss - min_drop:
        return None
    drop = base_eval_loss - eval_loss
    verdict = f"a drop of only {drop:.4f}" if drop > 0 else "no better"
    return Finding("quality_gate", "error",
                   f"eval loss {eval_loss:.4f} vs the base's {base_eval_loss:.4f} is {verdict}; the gate asks for a "
                   f"drop of at least {min_drop:.4f} (train longer, raise the learning rate, or lower "
                   "validation.min_eval_loss_drop)")


def exact_match_gate(exact_match: float | None, minimum: float | None, base: float | None = None) -> Finding | None:
    """``validation.min_exact_match``: the adapter's exact match on the eval prompts must reach ``minimum``."""
    if minimum is None:
        return None
    if exact_match is None or not math.isfinite(exact_match):
        return Finding("exact_match_gate", "error", f"no exact match was measured (got {exact_match}) but "
                                                    f"validation.min_exact_match asks for {minimum:.3f}")
    if exact_match >= minimum:
        return None
    versus = f" (the base's: {base:.3f})" if base is not None else ""
    return Finding("exact_match_gate", "error",
                   f"exact match {exact_match:.3f}{versus} on the eval prompts is below validation.min_exact_match "
                   f"{minimum:.3f} (train longer, raise the learning rate, or lower the gate)")


def metric_gate(name: str, value: float | None, minimum: float, base: float | None = None) -> Finding | None:
    """``validation.min: {name: minimum}``: the adapter's ``name`` on the eval prompts must reach ``minimum``.

    Every metric loraq measures is higher-is-better. A metric that was not measured fails the
    gate, except a model judge's (:data:`OPTIONAL_METRICS`): a judge that did not answer warns.
    """
    if value is None or not math.isfinite(value):
        severity: Severity = "warning" if name in OPTIONAL_METRICS else "error"
        return Finding("metric_gate", severity, f"no {name} was measured (got {value}) but validation.min.{name} "
                                                f"asks for {minimum:.3f}"
                       + ("; the judge did not answer, so the gate was not applied" if severity == "warning" else ""))
    if value >= minimum:
        return None
    versus = f" (the base's: {base:.3f})" if base is not None and math.isfinite(base) else ""
    return Finding("metric_gate", "error",
                   f"{name} {value:.3f}{versus} on the eval prompts is below validation.min.{name} {minimum:.3f} "
                   "(train longer, raise the learning rate, or lower the gate)")


def finite_or_none(value: Any) -> float | None:
    """JSON has no NaN: a number that is not finite is recorded as unknown."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
