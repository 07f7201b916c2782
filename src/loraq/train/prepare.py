"""A job's data, made ready to train on: read inside the roots, split, encoded and checked.

:func:`prepare` opens the job's dataset (and its eval dataset, if it has one) on
descriptors checked to be the files submit checked, splits off the eval rows
(the job's ``validation.split``, seeded) unless it has an eval dataset, renders
and tokenises every row in one batch (the chat template, truncation to
``max_seq_len``), checks that a sample of the rows encodes as it did at submit
when submit counted tokens without transformers, and picks the eval prompts that
base and adapter answer for the job's metrics. What it returns
(:class:`Prepared`) is laid out for training by :mod:`.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import data
from ..errors import FailureKind, TemplateBudgetError, TrainingError
from ..model.batching import ListDataset
from ..model.evaluation import EXACT_MATCH_MAX_ROWS
from ..protocol import JobInput, TrainRequest
from ..queue.spec import JobSpec
from ..sandbox import Roots
from . import faults


@dataclass(frozen=True)
class Prepared:
    """A job's rows encoded for training and evaluation, and what was counted on the way."""

    train: ListDataset
    eval: ListDataset
    n_train: int
    n_eval: int
    truncated: int
    train_tokens: int
    fault: faults.Fault | None = None  # tests only: see train/faults.py
    prompts: list[data.Prompt] = field(default_factory=list)  # eval prompts answered for exact_match and samples
    base_answers: list[str] = field(default_factory=list)  # the base's answers to them, before training


def read_roots(request: TrainRequest) -> Roots:
    """The roots the job's files were checked against at submit; the trainer opens each file inside them again.

    A request made by an older worker carries none: the folders of its own files then.
    """
    job = request.job
    roots = list(request.read_roots)
    if not roots:
        roots = [str(Path(p).parent) for p in (job.dataset_path, job.eval_dataset_path) if p]
        roots += [job.base_model] if Path(job.base_model).is_absolute() else []
    return Roots.of(roots)


def _expected(size: int | None, sha256: str | None) -> tuple[int | None, str] | None:
    """``(bytes, sha256)`` of a dataset as submitted: every row was checked then; a changed file was not."""
    return (size, sha256) if sha256 else None


def _same_encoding_as_submit(job: JobInput, spec: JobSpec, rows: list[dict[str, Any]], fmt: str, tokenizer: Any) -> None:
    """Submit counted tokens torch-free (data/tokenizer.py); what trains is transformers' encoding. A sample of
    the rows must encode the same both ways, or the submit-time checks and step estimates do not hold."""
    if job.submit_tokenizer != "tokenizers":
        return
    from ..data import tokenizer as light

    # the checked folder transformers loaded from (sandbox.model_folder), never the name looked up again
    name = getattr(tokenizer, "name_or_path", "")
    folder = Path(name) if name else None
    if light.disabled() or folder is None or not (folder / "tokenizer.json").is_file():
        return  # the base's tokenizer.json is gone from where submit read it: nothing to compare with
    mismatch = light.check_against(tokenizer, light.cached(folder), rows, fmt, spec.training.max_seq_len,
                                   job.chat_template_text)
    if mismatch:
        raise TrainingError(
            f"base model {job.base_model}: the tokenizer encodes otherwise at submit (tokenizer.json through the "
            f"tokenizers library, without transformers) than in training (transformers): {mismatch}. The token "
            f"checks and step estimates of submit do not hold for this tokenizer: submit the job again with "
            f"{light.SUBMIT_TOKENIZER_ENV}=transformers", kind=FailureKind.BASE_MODEL)


def prepare(job: JobInput, tokenizer: Any, roots: Roots | None = None) -> Prepared:
    spec = JobSpec.model_validate(job.spec)
    # Opened on a descriptor checked to be the regular file inside the roots, and refused
    # unread if its size or digest is not what was submitted: nothing of a file swapped in
    # after submit (a symlink to a secret, /dev/zero, a FIFO) is read or quoted.
    dataset = data.load_dataset(job.dataset_path, spec.dataset.format, roots=roots,
                                expect=_expected(job.dataset_bytes, job.dataset_sha256))
    rows = dataset.rows
    fault = faults.injected_bug(rows)
    if job.eval_dataset_path:
        eval_set = data.load_dataset(job.eval_dataset_path, spec.dataset.format or dataset.format, roots=roots,
                                     expect=_expected(job.eval_dataset_bytes, job.eval_dataset_sha256))
        train_rows, eval_rows = rows, eval_set.rows
    else:
        data.check_split(dataset.path, len(rows), spec.validation.split)
        train_idx, eval_idx = data.split_indices(len(rows), spec.validation.split, spec.training.seed)
        train_rows, eval_rows = [rows[i] for i in train_idx], [rows[i] for i in eval_idx]

    def encode_all(subset: list[dict[str, Any]]) -> tuple[list[dict[str, list[int]]], int]:
        try:  # one batched render and tokenise for all rows (the tokenizer's Rust batch path)
            encoded = data.encode_many(subset, dataset.format, tokenizer, spec.training.max_seq_len,
                                       job.chat_template_text)
        except TemplateBudgetError as exc:  # the template ran away (data/budget.py): it, not the data, is named
            named = (f"chat_template {spec.chat_template!r}" if spec.chat_template is not None
                     else f"base model {job.base_model}: its chat template")
            raise TrainingError(str(exc).replace("the chat template", named, 1), kind=FailureKind.SPEC) from exc
        except data.TemplateError as exc:
            raise TrainingError(f"{dataset.path}: {exc}", kind=FailureKind.DATA) from exc
        items = [{"input_ids": enc.input_ids, "labels": enc.labels} for enc in encoded if enc.trainable]
        return items, sum(enc.truncated for enc in encoded)

    train_items, truncated = encode_all(train_rows)
    eval_items, _ = encode_all(eval_rows)
    _same_encoding_as_submit(job, spec, train_rows + eval_rows, dataset.format, tokenizer)
    if not train_items or not eval_items:
        raise TrainingError(f"{dataset.path}: no row keeps a trainable token after truncation to "
                            f"max_seq_len {spec.training.max_seq_len}", kind=FailureKind.DATA)
    return Prepared(
        train=ListDataset(train_items), eval=ListDataset(eval_items), n_train=len(train_items),
        n_eval=len(eval_items), truncated=truncated, fault=fault,
        prompts=_eval_prompts(spec, eval_rows, dataset.format, tokenizer, job.chat_template_text),
        train_tokens=sum(sum(1 for label in item["labels"] if label != data.IGNORE_INDEX) for item in train_items),
    )


def _eval_prompts(spec: JobSpec, rows: list[dict[str, Any]], fmt: str, tokenizer: Any,
                  chat_template: str | None) -> list[data.Prompt]:
    """The eval rows whose prompts base and adapter answer: all (up to a cap) for exact_match, else the samples."""
    wanted = EXACT_MATCH_MAX_ROWS if spec.validation.measured else spec.validation.samples
    if fmt == "text" or not wanted:
        return []
    return [p for p in data.prompts_of(rows[:wanted], fmt, tokenizer, chat_template) if isinstance(p, data.Prompt)]
