"""The trainer: torch, transformers and PEFT live here and nowhere on the supervisor side.

A :class:`TrainerService` runs one job at a time and stays alive across jobs,
keeping the last base model resident (:class:`BaseCache`). Each job gets a fresh
LoRA on that base; afterwards the LoRA is removed and a fingerprint of every base
weight proves the base unchanged (on mismatch it is dropped and reloaded).

Memory hygiene: after each job the LoRA, the ``Trainer`` and its optimizer are
dropped, garbage is collected and the CUDA cache emptied; the job's result carries
the process's RSS (and CUDA allocated/reserved/peak). The objects that live as long
as the process (the imported libraries, the resident base) are moved out of the
collector's sight with ``gc.freeze()``, so the collections of each job (ours, and
the ones accelerate makes inside ``Trainer``) look only at what the job made.

Training is transformers' ``Trainer``: checkpoints, resume, gradient
accumulation, precision and logging come from the library. loraq adds callbacks
that stream progress, mark each checkpoint complete only once it is all on disk,
inspect each checkpoint for non-finite weights, and stop gracefully on request.

The service takes a :class:`~loraq.protocol.TrainRequest` and reports through an
``emit`` callback, one :mod:`loraq.protocol` event at a time. ``python -m
loraq.train`` serves it over two pipes as JSON lines (:mod:`.pipe`, the local
executor); a Ray actor wraps the same service (the Ray executor).

Tests only: with ``LORAQ_TEST_BUG_TRIGGER`` set, a job whose dataset holds that
text raises an exception loraq does not recognise while preparing its data, as a
bug of ours would (:func:`_injected_bug`); the error-classification tests use it
to drive a real trainer into an ``internal`` failure. With ``LORAQ_TEST_FAULT``
set as well, such a job raises that fault instead, during training at the step it
names (the real out-of-memory errors of CUDA and of the CPU allocator: see
:class:`.controls.Fault`); the OOM back-off tests use it.

The training controls (LoRA variants, warm starts, early stopping and the best
checkpoint, the OOM back-off, QLoRA's quantised base) live in :mod:`.controls`;
``_train`` calls them at the few places they act.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoints, data, fsutil
from ..errors import DataError, FailureKind, TemplateBudgetError, TrainingError, classify, describe, raised_at
from ..model import graders, judge
from ..model.base import (
    BaseCache,
    BaseKey,
    device_memory,
    quiet_libraries,
    release_memory,
    reset_peak_memory,
    resolve_dtype,
)
from ..model.batching import ListDataset
from ..model.evaluation import EXACT_MATCH_MAX_ROWS, evaluate_loss, exact_match, generate_answers, samples
from ..protocol import (
    Aborted,
    CheckpointSaved,
    Done,
    Event,
    Failed,
    Final,
    Heartbeat,
    JobInput,
    Memory,
    OomAdjusted,
    Progress,
    Started,
    Stopped,
    TrainRequest,
    TrainResult,
)
from ..queue.spec import JobSpec
from ..sandbox import Roots
from . import controls, layout, tracking

Emit = Callable[[Event], None]

#: Tests only (see the module docstring): the text that makes a job's data trigger a bug.
BUG_TRIGGER_ENV = "LORAQ_TEST_BUG_TRIGGER"


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": sys.version.split()[0]}


@dataclass(frozen=True)
class Prepared:
    train: ListDataset
    eval: ListDataset
    n_train: int
    n_eval: int
    truncated: int
    train_tokens: int
    fault: controls.Fault | None = None  # tests only: see the module docstring
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


def _injected_bug(rows: list[dict[str, Any]]) -> controls.Fault | None:
    """Tests only: raise what a bug would, for a job whose data holds ``$LORAQ_TEST_BUG_TRIGGER``;
    with ``$LORAQ_TEST_FAULT``, return the fault that job meets in training instead."""
    trigger = os.environ.get(BUG_TRIGGER_ENV)
    if trigger and any(trigger in json.dumps(row) for row in rows):
        fault = controls.Fault.from_env()
        if fault is not None:
            return fault
        raise RuntimeError(f"injected bug: a row holds {trigger!r}")
    return None


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
    fault = _injected_bug(rows)
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


def _answers(model: Any, tokenizer: Any, spec: JobSpec, prompts: list[data.Prompt]) -> list[str]:
    return generate_answers(model, tokenizer, prompts, max_seq_len=spec.training.max_seq_len)


def _quality(spec: JobSpec, prompts: list[data.Prompt], base: list[str], adapter: list[str],
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


# ---------------------------------------------------------------- training


class _Abort(Exception):  # noqa: N818 - control flow, not an error: it never leaves this module
    """Raised inside training when the job must end at once (cancel)."""


@dataclass
class Flags:
    """What the controller asked of the running job; set from another thread."""

    graceful: threading.Event = field(default_factory=threading.Event)
    abort: threading.Event = field(default_factory=threading.Event)

    def clear(self) -> None:
        self.graceful.clear()
        self.abort.clear()


def _callbacks(emit: Emit, flags: Flags, log: Callable[[str], None], problems: list[str],
               evaluated: dict[int, float], track: tracking.Tracking) -> list[Any]:
    """loraq's callbacks; ``evaluated`` collects each evaluation's eval loss by step (this attempt's only);
    ``track`` passes the loss curve on to the job's experiment trackers."""
    from transformers import TrainerCallback

    class LoraqCallback(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.total = state.max_steps

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            logs = logs or {}
            # Per-step values only: the run average transformers logs at the end ("train_loss")
            # would sit on the loss curve as if it were the last step's loss.
            metrics = {k: float(v) for k, v in logs.items()
                       if k in {"loss", "eval_loss", "learning_rate", "grad_norm"} and isinstance(v, (int, float))}
            if not metrics:
                return
            emit(Progress(step=state.global_step, max_steps=state.max_steps, metrics=metrics))
            track.log(metrics, state.global_step)
            log(f"step {state.global_step}/{state.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
            loss = metrics.get("loss")
            if loss is not None and not math.isfinite(loss):
                problems.append(f"training loss became {loss} at step {state.global_step}; lower the learning_rate")
                control.should_training_stop = True

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                        **kw: Any) -> None:
            value = (metrics or {}).get("eval_loss")
            if isinstance(value, (int, float)):
                evaluated[state.global_step] = float(value)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if flags.abort.is_set():
                raise _Abort("aborted")
            if flags.graceful.is_set() and not control.should_training_stop:
                control.should_save = True
                control.should_training_stop = True
            else:
                emit(Heartbeat(step=state.global_step, max_steps=state.max_steps))

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            folder = Path(args.output_dir) / checkpoints.checkpoint_name(state.global_step)
            finding = checkpoints.check_weights(folder)
            if finding:
                problems.append(f"checkpoint at step {state.global_step}: {finding}")
                control.should_training_stop = True
                return
            checkpoints.mark_complete(folder, step=state.global_step)
            emit(CheckpointSaved(step=state.global_step, path=str(folder)))
            log(f"checkpoint saved at step {state.global_step}: {folder}")

    return [LoraqCallback()]


@dataclass
class TrainerService:
    """Runs jobs one after another in this process, keeping the base model hot."""

    device: str = "cpu"
    cache: BaseCache = field(init=False)
    flags: Flags = field(default_factory=Flags)
    tracking: tracking.Tracking = field(init=False)  # the running job's experiment trackers

    def __post_init__(self) -> None:
        self.cache = BaseCache(device=self.device)
        self.tracking = tracking.Tracking(lambda line: None)
        quiet_libraries()

    def run_job(self, request: TrainRequest, emit: Emit, *, clear_flags: bool = True) -> Final:
        """Train one job; emit events; return its final event (``done``, ``stopped``, ``failed``, ``aborted``).

        Whatever the outcome, the base is verified afterwards (dropped if it changed),
        and the final event carries the memory measured after the job's cleanup and the
        number of base loads so far. A ``done`` result carries them too, with this
        process's pid, ``cuda_visible_devices`` and ``torch_threads``; the RSS also goes
        out as the job's last ``progress`` metric (``rss_mb``), so it lands in the metrics table.
        """
        if clear_flags:  # serve() clears them when the job arrives, so an early stop is kept
            self.flags.clear()
        reset_peak_memory()
        started = time.perf_counter()
        log_path = Path(request.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with _redirect_output(log_path) as log:
            outcome: Final | TrainResult
            try:
                outcome = self._train(request, emit, log)
            except _Abort:
                log("aborted on request")
                outcome = Aborted()
            except TrainingError as exc:
                log(f"FAILED ({exc.kind}): {exc}")
                outcome = Failed(failure=exc.kind, message=str(exc), traceback=traceback.format_exc())
            except BaseException as exc:  # the one catch-all: the traceback goes into the attempt
                kind = classify(exc)
                log(f"FAILED ({kind}): {exc!r}\n{traceback.format_exc()}")
                outcome = Failed(failure=kind, message=describe(exc), traceback=traceback.format_exc(),
                                 where=raised_at(exc) if kind is FailureKind.INTERNAL else None)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
            finally:
                self._check_base(log)
            memory = Memory(**device_memory())
            if not isinstance(outcome, TrainResult):
                return dataclasses.replace(outcome, memory=memory, base_loads=self.cache.loads)
            result = dataclasses.replace(
                outcome, memory=memory, base_loads=self.cache.loads, pid=os.getpid(),
                cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), torch_threads=_torch_threads(),
                job_s=round(time.perf_counter() - started, 3))
            emit(Progress(step=result.steps, max_steps=result.max_steps, metrics={"rss_mb": memory.rss_mb}))
            log(f"done: eval loss {result.base_eval_loss:.4f} -> {result.eval_loss:.4f}, "
                f"{result.train_s:.1f} s training in {result.job_s:.1f} s; memory {memory}")
        return Done(result=result, memory=memory, base_loads=self.cache.loads)

    def _check_base(self, log: Callable[[str], None]) -> None:
        """Drop the resident base unless its weights are exactly as loaded (a LoRA left in, a merge)."""
        try:
            if self.cache.verify():
                return
            log("base model weights changed during the job: dropped; the next job reloads it")
        except Exception as exc:  # a broken device: start the next job from a fresh load
            log(f"cannot verify the base model ({exc!r}): dropped; the next job reloads it")
            self.cache.resident = None
            gc.unfreeze()

    def _train(self, request: TrainRequest, emit: Emit, log: Callable[[str], None]) -> Stopped | TrainResult:
        spec = JobSpec.model_validate(request.job.spec)
        if spec.preference is not None:  # DPO, ORPO, SimPO (issue 23): their own loop, with this module's parts
            from .preference import PreferenceRun, Shared

            shared = Shared(read_roots, _callbacks, _answers, _quality, _last_train_loss, versions)
            return PreferenceRun(self, shared, request, emit, log).train()
        timings: dict[str, float] = {}  # where the job's time went, for benchmarks and the curious
        t0 = time.perf_counter()
        key = BaseKey(request.job.base_model, spec.revision, spec.training.precision, spec.trust_remote_code,
                      quantization=spec.quantization)
        resident, reused = self.cache.get(key, roots=read_roots(request))
        load_s = timings["load_s"] = time.perf_counter() - t0
        log(f"job {spec.name} attempt {request.attempt}: base {key} ({'resident, reused' if reused else f'loaded in {load_s:.2f} s'})")
        t0 = time.perf_counter()
        try:
            prepared = prepare(request.job, resident.tokenizer, roots=read_roots(request))
        except DataError as exc:
            raise TrainingError(str(exc), kind=FailureKind.DATA) from exc
        batches = layout.Layout.of(spec, prepared, resident, self.device, log)
        steps = spec.total_steps(prepared.n_train, batches.steps_per_epoch)
        timings["prepare_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        base_eval = evaluate_loss(resident.model, batches.eval, batches.collator)
        if not math.isfinite(base_eval):
            raise TrainingError(
                f"base model {key.path} gives a non-finite eval loss ({base_eval}) before any training: its weights "
                "are damaged or overflow in this precision; check the base model",
                kind=FailureKind.BASE_MODEL,
            )
        timings["base_eval_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepared.base_answers[:] = _answers(resident.model, resident.tokenizer, spec, prepared.prompts)
        timings["base_generate_s"] = time.perf_counter() - t0
        resume = request.resume_from
        emit(Started(max_steps=steps, base_reused=reused, base_eval_loss=base_eval, resume_from=resume,
                     n_train=prepared.n_train, n_eval=prepared.n_eval))
        log(f"{prepared.n_train} train / {prepared.n_eval} eval rows, {steps} steps, base eval loss {base_eval:.4f}")

        job_dir = Path(request.log_path).parent.parent  # jobs/<id>: the runs continue across its attempts
        self.tracking = tracking.open_runs(spec, job_dir=job_dir, home=job_dir.parent.parent, attempt=request.attempt,
                                           sweep=request.job.sweep, log=log,
                                           resume_step=checkpoints.step_of(resume) if resume else None)
        self.tracking.log({"base_eval_loss": base_eval}, 0)
        outcome: Stopped | TrainResult | _OutOfMemory | None = None
        try:
            batching = controls.Batching.of(spec, batches.gradient_checkpointing)
            retry = False
            while True:  # once, unless the OOM back-off makes it go on with smaller micro-batches
                outcome = self._attempt(request, spec, key, prepared, batches, steps, base_eval, reused, load_s,
                                        batching, resume, retry, emit, log, timings)
                if not isinstance(outcome, _OutOfMemory):
                    return outcome
                after = controls.after_oom(batching)
                if after is None:
                    raise controls.exhausted(outcome.error, outcome.asked, batching, self.device)
                newest = controls.newest_own_checkpoint(request.checkpoints_dir)
                resume = str(newest) if newest is not None else request.resume_from
                event = OomAdjusted(step=outcome.step, before=batching.to_json(), after=after.to_json(),
                                    error=outcome.error, asked=outcome.asked,
                                    resume_step=checkpoints.step_of(resume) if resume else None)
                log(f"out of memory at step {outcome.step} ({outcome.error}); going on with {after} from "
                    f"{resume or 'step 0'}")
                emit(event)
                batching, retry = after, True
        finally:
            self.tracking.close(isinstance(outcome, TrainResult))

    def _attempt(self, request: TrainRequest, spec: JobSpec, key: BaseKey, prepared: Prepared, batches: layout.Layout,
                 steps: int, base_eval: float, reused: bool, load_s: float, batching: controls.Batching,
                 resume: str | None, retry: bool, emit: Emit, log: Callable[[str], None],
                 timings: dict[str, float]) -> Stopped | TrainResult | _OutOfMemory:
        """Train with ``batching`` from ``resume``; an out-of-memory error comes back as :class:`_OutOfMemory`."""
        import torch
        from peft import get_peft_model
        from transformers import Trainer, TrainingArguments, set_seed

        if retry:  # a LoRA init that rewrote the base (PiSSA, OLoRA) must start again from the base as loaded
            self.cache.verify()
        resident, _ = self.cache.get(key)
        t_setup = time.perf_counter()
        set_seed(spec.training.seed)
        try:
            model = get_peft_model(resident.model, controls.lora_config(spec))
        except ValueError as exc:  # e.g. target modules not found in the base model
            raise TrainingError(f"lora: {exc}", kind=FailureKind.SPEC) from exc
        trainer = None
        problems: list[str] = []
        evaluated: dict[int, float] = {}  # step -> the Trainer's eval loss (loraq's measure: see sequential_trainer)
        oom: _OutOfMemory | None = None
        initial = Path(request.checkpoints_dir).parent / "initial-lora"
        try:
            initial_lora = controls.save_initial(model, spec, initial)
            if resume is None and controls.warm_start(model, request.job):
                log(f"warm start: LoRA weights loaded from {request.job.init_from_path}")
            precision = resolve_dtype(spec.training.precision, self.device)
            args = TrainingArguments(
                output_dir=request.checkpoints_dir,
                per_device_train_batch_size=1,  # one planned micro-batch at a time (train/layout.py)
                per_device_eval_batch_size=1,
                gradient_accumulation_steps=batching.grad_accum,
                **controls.checkpointing_args(batching, TrainingArguments),
                **batches.liger_args,
                learning_rate=spec.training.learning_rate,
                max_steps=steps,
                lr_scheduler_type=spec.training.lr_scheduler,
                warmup_steps=math.ceil(spec.training.warmup_ratio * steps),
                weight_decay=spec.training.weight_decay,
                logging_steps=spec.training.logging_steps,
                save_strategy="steps",
                save_steps=spec.training.save_steps,
                save_total_limit=2,
                eval_strategy="steps",
                eval_steps=spec.training.eval_steps or spec.training.save_steps,
                seed=spec.training.seed,
                data_seed=spec.training.seed,
                bf16=precision == torch.bfloat16 and self.device != "cpu",
                fp16=precision == torch.float16,
                use_cpu=self.device == "cpu",
                report_to=[],
                disable_tqdm=True,
                remove_unused_columns=False,
                dataloader_num_workers=0,
                dataloader_pin_memory=False,
            )
            early = spec.validation.early_stopping
            keeper = (controls.EarlyStopping(early, model, resume, log, _stopping_measure(spec, model, resident.tokenizer,
                                                                                            prepared.prompts))
                      if early is not None else None)
            if resume is not None:  # loraq's batch settings win over the ones the checkpoint was saved with
                resume = controls.settle_resume(resume, Path(request.checkpoints_dir).parent / "resume", batching, args)
            extra = [keeper.callback()] if keeper is not None else []
            if prepared.fault is not None:
                extra.append(controls.FaultCallback(prepared.fault, batching).callback())
            trainer = layout.trainer_class(Trainer)(
                model=model, args=args, train_dataset=batches.train(prepared, batching, spec.training.seed),
                eval_dataset=batches.eval, data_collator=batches.collator,
                callbacks=extra + _callbacks(emit, self.flags, log, problems, evaluated, self.tracking),
            )
            trainer.add_callback(controls.BatchGuard(trainer, batching, per_device=1).callback())
            t_train = time.perf_counter()
            timings["setup_s"] = t_train - t_setup
            try:
                output = trainer.train(resume_from_checkpoint=resume)
            except BaseException as exc:  # an out-of-memory error goes back to the back-off, once cleaned up
                if not controls.is_oom(exc):
                    raise
                oom = _OutOfMemory(step=trainer.state.global_step + 1, error=describe(exc).splitlines()[0][:500],
                                   asked=controls.asked(exc))
            if oom is None:
                result = self._finish(request, spec, model, trainer, output, prepared, batches, steps, base_eval,
                                      reused, load_s, batching, resume, keeper, initial_lora, problems, evaluated,
                                      t_train, log, timings)
        finally:
            t_cleanup = time.perf_counter()
            del trainer
            controls.end_gradient_checkpointing(resident.model)
            controls.drop_saved_copies(model)
            base = model.unload()
            base.eval()
            del model
            release_memory()
            with contextlib.suppress(OSError):
                fsutil.remove_tree(initial)
            timings["cleanup_s"] = time.perf_counter() - t_cleanup
        if oom is not None:
            return oom
        if isinstance(result, Stopped):
            return result
        return dataclasses.replace(result, timings={k: round(v, 3) for k, v in timings.items()})

    def _finish(self, request: TrainRequest, spec: JobSpec, model: Any, trainer: Any, output: Any, prepared: Prepared,
                batches: layout.Layout, steps: int, base_eval: float, reused: bool, load_s: float,
                batching: controls.Batching, resume: str | None, keeper: controls.EarlyStopping | None,
                initial_lora: Path | None, problems: list[str], evaluated: dict[int, float], t_train: float,
                log: Callable[[str], None], timings: dict[str, float]) -> Stopped | TrainResult:
        """After training: the divergence and graceful-stop checks, the best checkpoint, the save and the eval loss.

        The published eval loss is the one of the weights published, evaluated once: ``Trainer``
        evaluates the last step (transformers does at the end of a ``steps`` eval strategy), and
        its eval loss is loraq's per-token measure (:func:`~loraq.model.batching.sequential_trainer`),
        so it is not evaluated again; with early stopping it is the best step's. Only weights no
        evaluation of this attempt saw (a resume from a checkpoint at the last step) are evaluated here.
        """
        train_s = timings["train_s"] = time.perf_counter() - t_train
        if problems:
            raise TrainingError("; ".join(problems), kind=FailureKind.DIVERGED)
        step = trainer.state.global_step
        if self.flags.graceful.is_set() and step < steps:
            log(f"stopped gracefully at step {step}")
            return Stopped(step=step)
        extras: dict[str, Any] = batches.extras(batching, spec.training.seed, prepared)
        extras["packing"]["epochs_trained"] = round(float(trainer.state.epoch or 0.0), 4)
        if keeper is not None:  # the adapter published is the best evaluated, the last step's included
            if not controls.evaluated_at(trainer.state, step):
                trainer.evaluate()
            extras["stopping"] = keeper.publish_best(step, steps)
            log(f"publishing step {extras['stopping']['published_step']} "
                f"({extras['stopping']['published_because']}); {extras['stopping']['stopped_because']}")
        t0 = time.perf_counter()
        staging = Path(request.staging_dir)
        if staging.exists():
            fsutil.remove_tree(staging)
        controls.save_adapter(model, staging, initial_lora)
        eval_loss = _published_eval_loss(extras.get("stopping"), evaluated, step)
        if eval_loss is None:
            eval_loss = evaluate_loss(model, batches.eval, batches.collator)
        timings["save_eval_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert self.cache.resident is not None  # the base this job trained on
        answers = _answers(model, self.cache.resident.tokenizer, spec, prepared.prompts)
        metrics, shown = _quality(spec, prepared.prompts, prepared.base_answers, answers, log)
        extras |= shown
        timings["generate_s"] = time.perf_counter() - t0
        self.tracking.log({"eval_loss": eval_loss, "base_eval_loss": base_eval, **metrics}, step)
        if self.tracking.trackers or self.tracking.warnings:
            extras["tracking"] = self.tracking.summary()
        for name in [m for m in metrics if not m.startswith("base_")]:
            label = "exact match" if name == "exact_match" else name
            log(f"{label}: base {metrics.get(f'base_{name}', float('nan')):.3f} -> adapter {metrics[name]:.3f} "
                f"on {len(prepared.prompts)} eval prompts")
        return TrainResult(
            staging=str(staging),
            steps=step,
            max_steps=steps,
            train_loss=_last_train_loss(trainer, output),
            eval_loss=eval_loss,
            base_eval_loss=base_eval,
            n_train=prepared.n_train,
            n_eval=prepared.n_eval,
            truncated_rows=prepared.truncated,
            train_tokens=prepared.train_tokens,
            base_reused=reused,
            base_load_s=round(load_s, 3),
            train_s=round(train_s, 3),
            resumed_from=request.resume_from,
            versions=versions(),
            device=self.device,
            metrics=metrics,
            extras=extras,
        )


@dataclass(frozen=True)
class _OutOfMemory:
    """Training ran out of memory at ``step`` (what the back-off needs of the error, not the error and its frames)."""

    step: int
    error: str
    asked: str | None


def _published_eval_loss(stopping: dict[str, Any] | None, evaluated: dict[int, float], step: int) -> float | None:
    """The eval loss of the weights published, if an evaluation already measured them; else ``None``."""
    if stopping is not None and "best_eval_loss" in stopping:  # the best step's weights were put back in
        return float(stopping["best_eval_loss"])
    if stopping is not None:
        return evaluated.get(int(stopping.get("published_step", step)))
    return evaluated.get(step)


#: Eval prompts answered at each evaluation when early stopping watches a grader (the first ones).
STOPPING_ROWS = 64


def _stopping_measure(spec: JobSpec, model: Any, tokenizer: Any,
                      prompts: list[data.Prompt]) -> controls.Measure | None:
    """What early stopping measures at each evaluation when it watches a grader, not the eval loss."""
    early = spec.validation.early_stopping
    if early is None or early.metric == "eval_loss" or not prompts:
        return None
    chosen = prompts[:STOPPING_ROWS]
    checks = graders.Checks(contains=spec.validation.contains, regex=spec.validation.regex)

    def measure() -> float:
        answers = _answers(model, tokenizer, spec, chosen)
        if early.metric == "exact_match":
            return exact_match(answers, chosen)
        return graders.grade(early.metric, answers, [p.reference for p in chosen], checks)

    return measure


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _last_train_loss(trainer: Any, output: Any) -> float | None:
    for entry in reversed(trainer.state.log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return float(output.training_loss) if output is not None else None


@contextlib.contextmanager
def _redirect_output(path: Path) -> Iterator[Callable[[str], None]]:
    """Send this process's stdout and stderr (and loraq's own lines) to ``path``.

    fd-level, so output from C extensions lands in the log too. Each attempt has
    its own log file, so a failed attempt's log survives the retry.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)

    def log(line: str) -> None:
        sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
        sys.stdout.flush()

    try:
        yield log
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
