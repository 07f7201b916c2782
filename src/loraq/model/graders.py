"""Graders: how close the greedy answers to the eval prompts are to their references.

Computed like ``exact_match`` (:mod:`.evaluation`): once on the base's answers, once on
the adapter's, over the same eval prompts; the trainer reports ``<name>`` for the adapter
and ``base_<name>`` for the base. Every grader gives a number from 0 to 1, higher better,
so any of them can gate (``validation.min``), rank a sweep and pick a checkpoint.

=============  ===========================================================================
grader         what it measures (library)
=============  ===========================================================================
exact_match    answer == reference, whitespace-trimmed; the share of rows
rouge_1        ROUGE-1 F1 (unigrams), the mean over rows (``rouge-score``, its tokenizer:
               lowercased, alphanumeric tokens, no stemming)
rouge_2        ROUGE-2 F1 (bigrams), the mean over rows (``rouge-score``)
rouge_l        ROUGE-L F1 (longest common subsequence), the mean over rows (``rouge-score``)
bleu           corpus BLEU / 100 (``sacrebleu``, its defaults: 13a tokenizer, 4-grams)
chrf           corpus chrF / 100 (``sacrebleu``, its defaults: character 6-grams, beta 2)
fuzzy_match    ``rapidfuzz.fuzz.ratio`` / 100 (normalised Indel similarity), the mean over rows
json_valid     the answer parses as JSON; the share of rows
json_match     the answer and the reference parse as JSON and are equal; the share of rows
contains       the answer contains ``validation.contains`` (plain text); the share of rows
regex          ``validation.regex`` is found in the answer (``regex.search``); the share of rows
=============  ===========================================================================

The ``regex`` grader runs a pattern from the queue file on model output: it runs on the
``regex`` engine with a time limit per answer and for all answers together; a pattern that
runs past it leaves the metric unmeasured (``nan``), never a trainer stuck on a backtrack.

Torch-free; each library is imported when its grader runs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Every grader by name (``exact_match`` included); the queue schema lists the same names.
GRADERS = ("exact_match", "rouge_1", "rouge_2", "rouge_l", "bleu", "chrf", "fuzzy_match", "json_valid", "json_match",
           "contains", "regex")
#: Seconds the ``regex`` grader may spend on one answer, and on all the answers of one model.
REGEX_TIMEOUT_S = 0.5
REGEX_BUDGET_S = 5.0
#: Characters of an answer parsed as JSON (answers are bounded by the generation budget; this bounds the parse).
MAX_JSON_CHARS = 1 << 20


@dataclass(frozen=True)
class Checks:
    """The patterns the string graders need, from the job's ``validation`` settings."""

    contains: str | None = None
    regex: str | None = None


def grade(name: str, answers: Sequence[str], references: Sequence[str], checks: Checks = Checks()) -> float:
    """Grader ``name`` of ``answers`` against ``references`` (one each, in order): 0 to 1, or ``nan`` when unmeasured.

    Raises:
        ValueError: ``name`` is not a grader, the lengths differ, or ``contains`` / ``regex``
            has no pattern in ``checks``.
    """
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    if name not in _GRADERS:
        raise ValueError(f"unknown grader {name!r} (one of: {', '.join(GRADERS)})")
    if not answers:
        return float("nan")
    answers = [a.strip() for a in answers]
    references = [r.strip() for r in references]
    return _GRADERS[name](answers, references, checks)


def grade_all(names: Sequence[str], answers: Sequence[str], references: Sequence[str],
              checks: Checks = Checks()) -> dict[str, float]:
    """Every grader of ``names`` that measured something (``nan`` results are left out)."""
    out = {}
    for name in names:
        value = grade(name, answers, references, checks)
        if math.isfinite(value):
            out[name] = value
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _exact(answers: Sequence[str], references: Sequence[str], _: Checks) -> float:
    return _mean([float(a == r) for a, r in zip(answers, references, strict=True)])


def _rouge(kind: str) -> Callable[[Sequence[str], Sequence[str], Checks], float]:
    def score(answers: Sequence[str], references: Sequence[str], _: Checks) -> float:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([kind], use_stemmer=False)
        return _mean([scorer.score(r, a)[kind].fmeasure for a, r in zip(answers, references, strict=True)])

    return score


def _bleu(answers: Sequence[str], references: Sequence[str], _: Checks) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(answers), [list(references)]).score) / 100.0


def _chrf(answers: Sequence[str], references: Sequence[str], _: Checks) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(answers), [list(references)]).score) / 100.0


def _fuzzy(answers: Sequence[str], references: Sequence[str], _: Checks) -> float:
    from rapidfuzz import fuzz

    return _mean([fuzz.ratio(a, r) / 100.0 for a, r in zip(answers, references, strict=True)])


_NOT_JSON = object()


def _parse(text: str) -> object:
    if len(text) > MAX_JSON_CHARS:
        return _NOT_JSON
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _json_valid(answers: Sequence[str], references: Sequence[str], _: Checks) -> float:
    return _mean([float(_parse(a) is not _NOT_JSON) for a in answers])


def _json_match(answers: Sequence[str], references: Sequence[str], _: Checks) -> float:
    def same(answer: str, reference: str) -> bool:
        parsed, expected = _parse(answer), _parse(reference)
        return parsed is not _NOT_JSON and expected is not _NOT_JSON and parsed == expected

    return _mean([float(same(a, r)) for a, r in zip(answers, references, strict=True)])


def _contains(answers: Sequence[str], references: Sequence[str], checks: Checks) -> float:
    if not checks.contains:
        raise ValueError("the contains grader needs validation.contains: the text each answer should contain")
    return _mean([float(checks.contains in a) for a in answers])


def _regex(answers: Sequence[str], references: Sequence[str], checks: Checks) -> float:
    import regex

    if not checks.regex:
        raise ValueError("the regex grader needs validation.regex: the pattern each answer should match")
    pattern = regex.compile(checks.regex, flags=regex.V0)
    deadline = time.monotonic() + REGEX_BUDGET_S
    hits = 0
    for answer in answers:
        left = deadline - time.monotonic()
        if left <= 0:
            return float("nan")
        try:
            hits += pattern.search(answer, timeout=min(REGEX_TIMEOUT_S, left)) is not None
        except TimeoutError:
            return float("nan")
    return hits / len(answers)


_GRADERS: dict[str, Callable[[Sequence[str], Sequence[str], Checks], float]] = {
    "exact_match": _exact, "rouge_1": _rouge("rouge1"), "rouge_2": _rouge("rouge2"), "rouge_l": _rouge("rougeL"),
    "bleu": _bleu, "chrf": _chrf, "fuzzy_match": _fuzzy, "json_valid": _json_valid, "json_match": _json_match,
    "contains": _contains, "regex": _regex,
}
