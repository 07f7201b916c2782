"""Submit-time analysis of a preference job's pairs (issue 23): :func:`loraq.data.check._analyze` for pairs.

Every pair is read and checked (:mod:`.pairs`), split into train and eval as the trainer
will, and each side (chosen, rejected) rendered and tokenised with the base model's
tokenizer as a supervised row. Errors: a pair whose chosen and rejected answers are the
same, and a pair where either side keeps no answer token at ``max_seq_len`` (the prompt
leaves no room), named by file:line and side. Warnings: truncated sides. The report
holds the pair counts and both sides' token statistics and truncation
(``DatasetReport.pairs``), which ``--dry-run`` prints.

Steps are counted padded (preference jobs do not pack): ``ceil(pairs / batch_size /
grad_accum)`` an epoch. Profiles are not kept in the token cache (a side is not a file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import data
from ..errors import DataError, Problem
from ..queue.spec import ResolvedJob
from . import pairs
from .rows import Dataset, ProblemList

#: Renders and tokenises a dataset of supervised rows: data.check.profile_dataset with the job's tokenizer.
Profiler = Callable[[Dataset], Any]


def _side_problems(dataset: Dataset, side: str, profile: Any, max_seq_len: int, out: ProblemList) -> int:
    """Add the pairs whose ``side`` cannot train to ``out``; return how many sides are cut at ``max_seq_len``."""
    for index, first in enumerate(profile.first_label):
        if 0 <= first < max_seq_len:
            continue
        line, record = dataset.locate(index)
        if index in profile.template_errors:
            out.add("template_error", f"{side}: {profile.template_errors[index]}", line=line, row=record)
        elif first < 0:
            out.add("untrainable", f"{side}: the answer renders to no token", line=line, row=record)
        else:
            out.add("untrainable", f"{side}: the prompt leaves no room for the answer at max_seq_len {max_seq_len}: "
                    f"the {side} row has {profile.lengths[index]} tokens and its answer starts at token {first + 1}; "
                    "raise training.max_seq_len or shorten the prompt", line=line, row=record)
    return sum(1 for n in profile.lengths if n > max_seq_len)


@dataclass
class PairAnalysis:
    """What :func:`analyze_pairs` found; data.check makes the job's report of it."""

    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # DatasetReport.pairs
    n_train: int = 0
    n_eval: int = 0
    truncated: int = 0
    untrainable: int = 0
    p95: int = 0  # the longer side's 95th-percentile tokens, cut at max_seq_len
    chosen_profile: Any = None
    ok: bool = False  # the sides were rendered (a report can be made)


def analyze_pairs(job: ResolvedJob, train: Dataset, eval_set: Dataset | None, profile: Profiler) -> PairAnalysis:
    """Check a job whose data are pairs (or that asks for a preference method); ``profile`` renders one side."""
    spec, max_seq_len = job.spec, job.spec.training.max_seq_len
    method = spec.preference
    found = PairAnalysis()
    if method is None:
        found.problems.append(Problem("method", f"the dataset holds preference pairs ({train.format}): set method: "
                                      "{type: dpo} (or orpo, simpo) to train on them"))
        return found
    if train.format not in pairs.PREFERENCE_FORMATS:
        found.problems.append(Problem("dataset", f"method {method.type} trains on preference pairs, and {train.path} is "
                                      f"{train.format}: give {{prompt, chosen, rejected}} rows (TRL) or {{input, "
                                      "preferred_output, non_preferred_output}} rows (OpenAI)"))
        return found
    if eval_set is not None and eval_set.format not in pairs.PREFERENCE_FORMATS:
        found.problems.append(Problem("validation.dataset", f"{eval_set.path} is {eval_set.format}, not pairs"))
        return found
    out = ProblemList(train.path, train.kind)
    sides = pairs.split_sides(train, out)
    eval_out = ProblemList(eval_set.path, eval_set.kind) if eval_set is not None else None
    eval_sides = pairs.split_sides(eval_set, eval_out) if eval_set is not None and eval_out is not None else None
    if sides is None:
        found.problems += out.problems()
        return found
    n = len(sides.chosen)
    if job.eval_dataset_path:
        found.n_train, found.n_eval = n, (len(eval_sides.chosen) if eval_sides else 0)
    else:
        try:
            data.check_split(train.path, n, spec.validation.split)
        except DataError as exc:
            found.problems += exc.problems
        train_idx, eval_idx = data.split_indices(n, spec.validation.split, spec.training.seed)
        found.n_train, found.n_eval = len(train_idx), len(eval_idx)
    found.stats = {"pairs": n, "format": sides.format, "method": method.model_dump()}
    for label, which, problems in (("", sides, out), ("eval file: ", eval_sides, eval_out)):
        if which is None or problems is None:
            continue
        for side, dataset in (("chosen", which.chosen), ("rejected", which.rejected)):
            side_profile = profile(dataset)  # TemplateError, TemplateBudgetError: the caller names the template
            before = problems.count
            cut = _side_problems(dataset, side, side_profile, max_seq_len, problems)
            found.untrainable += problems.count - before
            found.truncated += cut
            if not label:
                lengths = sorted(side_profile.lengths)
                p95 = lengths[max(0, -(-95 * len(lengths) // 100) - 1)] if lengths else 0
                found.stats[side] = {"mean": round(sum(lengths) / max(1, len(lengths)), 1), "p95": p95,
                                     "max": lengths[-1] if lengths else 0, "total": sum(lengths), "truncated": cut}
                found.p95 = max(found.p95, min(p95, max_seq_len))
                if side == "chosen":
                    found.chosen_profile = side_profile
            if cut:
                found.warnings.append(f"{label}{cut} of {len(dataset)} {side} answers are cut at max_seq_len "
                                      f"{max_seq_len} tokens")
    found.problems += out.problems() + (eval_out.problems() if eval_out is not None else [])
    found.ok = True
    return found


def describe_pairs(stats: dict[str, Any]) -> list[str]:
    """The ``--dry-run`` lines of a preference job's pairs."""
    method = stats["method"]
    lines = [f"pairs: {stats['pairs']} ({stats['format']} sides), method {method['type']} "
             + ", ".join(f"{k} {v}" for k, v in method.items()
                         if k != "type" and v is not None and (k != "loss" or method["type"] == "dpo"))]
    for side in ("chosen", "rejected"):
        if side in stats:
            s = stats[side]
            lines.append(f"{side} tokens: mean {s['mean']:g}, p95 {s['p95']}, max {s['max']} ({s['total']} in all); "
                         f"truncated {s['truncated']}")
    return lines
