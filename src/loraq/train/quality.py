"""What base and adapter answer, and how well: the job's metrics, its judge and its samples.

:func:`answer` generates the answers to a job's eval prompts (the base's before
training, the adapter's after); :func:`quality` scores both with the job's
``validation.metrics`` (exact match, the graders) and its judge, and picks the
samples shown; :func:`stopping_measure` is what early stopping watches when it
watches a grader instead of the eval loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import data
from ..model import graders, judge
from ..model.evaluation import exact_match, generate_answers, samples
from ..queue.spec import JobSpec
from . import controls


def answer(model: Any, tokenizer: Any, spec: JobSpec, prompts: list[data.Prompt]) -> list[str]:
    """What ``model`` answers to each of ``prompts``."""
    return generate_answers(model, tokenizer, prompts, max_seq_len=spec.training.max_seq_len)


def quality(spec: JobSpec, prompts: list[data.Prompt], base: list[str], adapter: list[str],
            log: Callable[[str], None] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """``TrainResult.metrics`` (``<metric>`` and ``base_<metric>`` for each of ``validation.metrics``, and
    ``judge``) and the extras (``samples``, the rows answered, what the judge said)."""
    metrics: dict[str, float] = {}
    extras: dict[str, Any] = {}
    validation = spec.validation
    if validation.metrics and prompts:
        if "exact_match" in validation.metrics:
            metrics = {"exact_match": exact_match(adapter, prompts), "base_exact_match": exact_match(base, prompts)}
        graded = [m for m in validation.metrics if m != "exact_match"]
        checks = graders.Checks(contains=validation.contains, regex=validation.regex)
        references = [p.reference for p in prompts]
        ours, theirs = (graders.grade_all(graded, answers, references, checks) for answers in (adapter, base))
        metrics |= ours | {f"base_{name}": value for name, value in theirs.items()}
        extras["exact_match_rows"] = len(prompts)  # the eval prompts every metric was measured on
        if unmeasured := [m for m in graded if m not in ours]:
            extras["unmeasured"] = unmeasured
    if validation.judge is not None and prompts:
        settings = judge.JudgeSettings(**validation.judge.model_dump())
        texts, references = [p.text for p in prompts], [p.reference for p in prompts]
        ours_j, theirs_j = (judge.judge(settings, texts, references, answers) for answers in (adapter, base))
        if ours_j.score is not None and theirs_j.score is not None:
            metrics |= {"judge": ours_j.score, "base_judge": theirs_j.score}
        extras["judge"] = {"model": settings.model, "rows": ours_j.rows,
                           "errors": (ours_j.errors + theirs_j.errors)[:5]}
        if log is not None and (ours_j.errors or theirs_j.errors):
            log(f"judge {settings.endpoint}: not measured ({(ours_j.errors + theirs_j.errors)[0]})")
    shown = samples(prompts, base, adapter, validation.samples)
    return metrics, extras | ({"samples": shown} if shown else {})


#: Eval prompts answered at each evaluation when early stopping watches a grader (the first ones).
STOPPING_ROWS = 64


def stopping_measure(spec: JobSpec, model: Any, tokenizer: Any,
                     prompts: list[data.Prompt]) -> controls.Measure | None:
    """What early stopping measures at each evaluation when it watches a grader, not the eval loss."""
    early = spec.validation.early_stopping
    if early is None or early.metric == "eval_loss" or not prompts:
        return None
    chosen = prompts[:STOPPING_ROWS]
    checks = graders.Checks(contains=spec.validation.contains, regex=spec.validation.regex)

    def measure() -> float:
        answers = answer(model, tokenizer, spec, chosen)
        if early.metric == "exact_match":
            return exact_match(answers, chosen)
        return graders.grade(early.metric, answers, [p.reference for p in chosen], checks)

    return measure
