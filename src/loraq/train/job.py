"""One job on the trainer: its state, from the base it trains on to the result it reports.

A :class:`JobRun` is made for each :class:`~loraq.protocol.TrainRequest` and keeps
what the job's steps share on ``self`` (as torchtune's recipes do): the spec, the
resident base, the data and its layout, the steps, the base's eval loss, the
experiment trackers, the ``emit`` of events and the log. Its steps read top to
bottom, each taking a handful of arguments at most:

- :meth:`JobRun.load_base`: the base model, resident from an earlier job or loaded now;
- :meth:`JobRun.prepare_data`: the rows read and encoded (:mod:`.prepare`), laid out
  for training (:mod:`.layout`), and the number of steps;
- :meth:`JobRun.measure_base`: the base's eval loss and its answers, before any training;
- :meth:`JobRun.train`: the ``started`` event, the trackers' runs, then a fresh LoRA
  trained with transformers' ``Trainer`` (:meth:`JobRun._attempt`), saved to staging
  and evaluated (:meth:`JobRun._finish`). An out-of-memory error makes the OOM
  back-off (:mod:`.controls`) go on from the newest checkpoint with smaller
  micro-batches; each call of ``Trainer.train`` is a :class:`_Pass`.

Training is transformers' ``Trainer``: checkpoints, resume, gradient accumulation,
precision and logging come from the library. loraq adds callbacks that stream
progress, mark each checkpoint complete only once it is all on disk, inspect each
checkpoint for non-finite weights, and stop gracefully or at once on request (:class:`Flags`);
the training controls (LoRA variants, warm starts, early stopping and the best
checkpoint, the OOM back-off) act at the few places :mod:`.controls` names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoints, fsutil
from ..errors import DataError, FailureKind, TrainingError, describe
from ..model.base import BaseCache, BaseKey, Resident, release_memory, resolve_dtype
from ..model.evaluation import evaluate_loss
from ..protocol import (
    Aborted,
    CheckpointSaved,
    Event,
    Heartbeat,
    OomAdjusted,
    Progress,
    Started,
    Stopped,
    TrainRequest,
    TrainResult,
)
from ..queue.spec import JobSpec
from . import controls, faults, layout, quality, tracking
from .prepare import Prepared, prepare, read_roots

Emit = Callable[[Event], None]
Log = Callable[[str], None]


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


@dataclass
class _Pass:
    """One call of ``Trainer.train`` with one batch setting: a job makes one, and one more after each OOM back-off."""

    batching: controls.Batching
    resume: str | None  # the checkpoint it starts from
    after_oom: bool = False
    problems: list[str] = field(default_factory=list)  # what makes the job fail as diverged
    evaluated: dict[int, float] = field(default_factory=dict)  # step -> the Trainer's eval loss (see sequential_trainer)
    keeper: controls.EarlyStopping | None = None
    initial_lora: Path | None = None  # the LoRA as initialised, for an init that rewrites the base
    t_train: float = 0.0


@dataclass(frozen=True)
class _OutOfMemory:
    """Training ran out of memory at ``step`` (what the back-off needs of the error, not the error and its frames)."""

    step: int
    error: str
    asked: str | None

    @classmethod
    def of(cls, exc: BaseException, trainer: Any) -> _OutOfMemory:
        """The out-of-memory error ``exc`` that ``trainer`` met at its next optimizer step."""
        return cls(step=trainer.state.global_step + 1, error=describe(exc).splitlines()[0][:500],
                   asked=controls.asked(exc))


class JobRun:
    """One job's training, set up step by step; its state lives on ``self``, not in parameter lists."""

    def __init__(self, request: TrainRequest, emit: Emit, log: Log, *, cache: BaseCache, flags: Flags) -> None:
        self.request, self.emit, self.log = request, emit, log
        self.cache, self.flags, self.device = cache, flags, cache.device
        self.spec = JobSpec.model_validate(request.job.spec)
        self.timings: dict[str, float] = {}  # where the job's time went, for benchmarks and the curious
        self.tracking = tracking.Tracking(lambda line: None)  # the job's experiment trackers, once it starts
        # set by the steps, in order
        self.key: BaseKey
        self.reused: bool
        self.load_s: float
        self.prepared: Prepared
        self.batches: layout.Layout
        self.steps: int
        self.base_eval: float

    # ------------------------------------------------------------ setup

    # Each step is handed the resident base rather than keeping it on self: a base the cache
    # drops (changed weights, see TrainerService._check_base) must not stay alive here.

    def load_base(self) -> Resident:
        t0 = time.perf_counter()
        spec = self.spec
        self.key = BaseKey(self.request.job.base_model, spec.revision, spec.training.precision, spec.trust_remote_code,
                           quantization=spec.quantization)
        resident, self.reused = self.cache.get(self.key, roots=read_roots(self.request))
        self.load_s = self.timings["load_s"] = time.perf_counter() - t0
        self.log(f"job {spec.name} attempt {self.request.attempt}: base {self.key} "
                 f"({'resident, reused' if self.reused else f'loaded in {self.load_s:.2f} s'})")
        return resident

    def prepare_data(self, resident: Resident) -> None:
        t0 = time.perf_counter()
        try:
            self.prepared = prepare(self.request.job, resident.tokenizer, roots=read_roots(self.request))
        except DataError as exc:
            raise TrainingError(str(exc), kind=FailureKind.DATA) from exc
        self.batches = layout.Layout.of(self.spec, self.prepared, resident, self.device, self.log)
        self.steps = self.spec.total_steps(self.prepared.n_train, self.batches.steps_per_epoch)
        self.timings["prepare_s"] = time.perf_counter() - t0

    def measure_base(self, resident: Resident) -> None:
        """The base's eval loss (refused if not finite) and its answers to the eval prompts, before any training."""
        t0 = time.perf_counter()
        self.base_eval = evaluate_loss(resident.model, self.batches.eval, self.batches.collator)
        if not math.isfinite(self.base_eval):
            raise TrainingError(
                f"base model {self.key.path} gives a non-finite eval loss ({self.base_eval}) before any training: "
                "its weights are damaged or overflow in this precision; check the base model",
                kind=FailureKind.BASE_MODEL,
            )
        self.timings["base_eval_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.prepared.base_answers[:] = quality.answer(resident.model, resident.tokenizer, self.spec,
                                                       self.prepared.prompts)
        self.timings["base_generate_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------ training

    def train(self) -> Stopped | TrainResult | Aborted:
        """Announce the job, open its trackers' runs, and train; ``aborted`` if cancelled on the way."""
        try:
            return self._train()
        except _Abort:
            self.log("aborted on request")
            return Aborted()

    def _train(self) -> Stopped | TrainResult:
        """:meth:`train`, with the OOM back-off going on as often as it can."""
        request, prepared = self.request, self.prepared
        resume = request.resume_from
        self.emit(Started(max_steps=self.steps, base_reused=self.reused, base_eval_loss=self.base_eval,
                          resume_from=resume, n_train=prepared.n_train, n_eval=prepared.n_eval))
        self.log(f"{prepared.n_train} train / {prepared.n_eval} eval rows, {self.steps} steps, "
                 f"base eval loss {self.base_eval:.4f}")
        job_dir = Path(request.log_path).parent.parent  # jobs/<id>: the runs continue across its attempts
        self.tracking = tracking.open_runs(self.spec, job_dir=job_dir, home=job_dir.parent.parent,
                                           attempt=request.attempt, sweep=request.job.sweep, log=self.log,
                                           resume_step=checkpoints.step_of(resume) if resume else None)
        self.tracking.log({"base_eval_loss": self.base_eval}, 0)
        outcome: Stopped | TrainResult | _OutOfMemory | None = None
        try:
            current = _Pass(controls.Batching.of(self.spec, self.batches.gradient_checkpointing), resume)
            while True:  # once, unless the OOM back-off makes it go on with smaller micro-batches
                outcome = self._attempt(current)
                if not isinstance(outcome, _OutOfMemory):
                    return outcome
                current = self._after_oom(current, outcome)
        finally:
            self.tracking.close(isinstance(outcome, TrainResult))

    def _after_oom(self, last: _Pass, oom: _OutOfMemory) -> _Pass:
        """The pass the back-off goes on with, from the newest checkpoint; or the error that it gives up with."""
        after = controls.after_oom(last.batching)
        if after is None:
            raise controls.exhausted(oom.error, oom.asked, last.batching, self.device)
        newest = controls.newest_own_checkpoint(self.request.checkpoints_dir)
        resume = str(newest) if newest is not None else self.request.resume_from
        event = OomAdjusted(step=oom.step, before=last.batching.to_json(), after=after.to_json(),
                            error=oom.error, asked=oom.asked,
                            resume_step=checkpoints.step_of(resume) if resume else None)
        self.log(f"out of memory at step {oom.step} ({oom.error}); going on with {after} from {resume or 'step 0'}")
        self.emit(event)
        return _Pass(after, resume, after_oom=True)

    def _attempt(self, p: _Pass) -> Stopped | TrainResult | _OutOfMemory:
        """Train with ``p.batching`` from ``p.resume``; an out-of-memory error comes back as :class:`_OutOfMemory`."""
        from peft import get_peft_model
        from transformers import Trainer, set_seed

        spec, request, timings = self.spec, self.request, self.timings
        if p.after_oom:  # a LoRA init that rewrote the base (PiSSA, OLoRA) must start again from the base as loaded
            self.cache.verify()
        resident, _ = self.cache.get(self.key)
        t_setup = time.perf_counter()
        set_seed(spec.training.seed)
        try:
            model = get_peft_model(resident.model, controls.lora_config(spec))
        except ValueError as exc:  # e.g. target modules not found in the base model
            raise TrainingError(f"lora: {exc}", kind=FailureKind.SPEC) from exc
        trainer = None
        oom: _OutOfMemory | None = None
        initial = Path(request.checkpoints_dir).parent / "initial-lora"
        try:
            p.initial_lora = controls.save_initial(model, spec, initial)
            resume = p.resume
            if resume is None and controls.warm_start(model, request.job):
                self.log(f"warm start: LoRA weights loaded from {request.job.init_from_path}")
            args = self._arguments(p.batching)
            early = spec.validation.early_stopping
            p.keeper = (controls.EarlyStopping(early, model, resume, self.log,
                                               quality.stopping_measure(spec, model, resident.tokenizer,
                                                                        self.prepared.prompts))
                        if early is not None else None)
            if resume is not None:  # loraq's batch settings win over the ones the checkpoint was saved with
                resume = controls.settle_resume(resume, Path(request.checkpoints_dir).parent / "resume", p.batching,
                                                args)
            extra = [p.keeper.callback()] if p.keeper is not None else []
            if self.prepared.fault is not None:
                extra.append(faults.FaultCallback(self.prepared.fault, p.batching).callback())
            trainer = layout.trainer_class(Trainer)(
                model=model, args=args, train_dataset=self.batches.train(self.prepared, p.batching, spec.training.seed),
                eval_dataset=self.batches.eval, data_collator=self.batches.collator,
                callbacks=extra + self._callbacks(p),
            )
            trainer.add_callback(controls.BatchGuard(trainer, p.batching, per_device=1).callback())
            p.t_train = time.perf_counter()
            timings["setup_s"] = p.t_train - t_setup
            try:
                output = trainer.train(resume_from_checkpoint=resume)
            except BaseException as exc:  # an out-of-memory error goes back to the back-off, once cleaned up
                if not controls.is_oom(exc):
                    raise
                oom = _OutOfMemory.of(exc, trainer)
            if oom is None:
                result = self._finish(p, model, trainer, output)
        finally:
            t_cleanup = time.perf_counter()
            del trainer
            p.keeper = None  # it holds the model, and the best weights so far
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

    def _arguments(self, batching: controls.Batching) -> Any:
        """transformers' ``TrainingArguments`` for this job with ``batching``."""
        import torch
        from transformers import TrainingArguments

        training, steps = self.spec.training, self.steps
        precision = resolve_dtype(training.precision, self.device)
        return TrainingArguments(
            output_dir=self.request.checkpoints_dir,
            per_device_train_batch_size=1,  # one planned micro-batch at a time (train/layout.py)
            per_device_eval_batch_size=1,
            gradient_accumulation_steps=batching.grad_accum,
            **controls.checkpointing_args(batching, TrainingArguments),
            **self.batches.liger_args,
            learning_rate=training.learning_rate,
            max_steps=steps,
            lr_scheduler_type=training.lr_scheduler,
            warmup_steps=math.ceil(training.warmup_ratio * steps),
            weight_decay=training.weight_decay,
            logging_steps=training.logging_steps,
            save_strategy="steps",
            save_steps=training.save_steps,
            save_total_limit=2,
            eval_strategy="steps",
            eval_steps=training.eval_steps or training.save_steps,
            seed=training.seed,
            data_seed=training.seed,
            bf16=precision == torch.bfloat16 and self.device != "cpu",
            fp16=precision == torch.float16,
            use_cpu=self.device == "cpu",
            report_to=[],
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )

    def _finish(self, p: _Pass, model: Any, trainer: Any, output: Any) -> Stopped | TrainResult:
        """After training: the divergence and graceful-stop checks, the best checkpoint, the save and the eval loss.

        The published eval loss is the one of the weights published, evaluated once: ``Trainer``
        evaluates the last step (transformers does at the end of a ``steps`` eval strategy), and
        its eval loss is loraq's per-token measure (:func:`~loraq.model.batching.sequential_trainer`),
        so it is not evaluated again; with early stopping it is the best step's. Only weights no
        evaluation of this attempt saw (a resume from a checkpoint at the last step) are evaluated here.
        """
        spec, prepared, batches, timings, log = self.spec, self.prepared, self.batches, self.timings, self.log
        train_s = timings["train_s"] = time.perf_counter() - p.t_train
        if p.problems:
            raise TrainingError("; ".join(p.problems), kind=FailureKind.DIVERGED)
        step = trainer.state.global_step
        if self.flags.graceful.is_set() and step < self.steps:
            log(f"stopped gracefully at step {step}")
            return Stopped(step=step)
        extras: dict[str, Any] = batches.extras(p.batching, spec.training.seed, prepared)
        extras["packing"]["epochs_trained"] = round(float(trainer.state.epoch or 0.0), 4)
        if p.keeper is not None:  # the adapter published is the best evaluated, the last step's included
            extras["stopping"] = p.keeper.publish_after(trainer, self.steps)
        t0 = time.perf_counter()
        staging = Path(self.request.staging_dir)
        if staging.exists():
            fsutil.remove_tree(staging)
        controls.save_adapter(model, staging, p.initial_lora)
        eval_loss = _published_eval_loss(extras.get("stopping"), p.evaluated, step)
        if eval_loss is None:
            eval_loss = evaluate_loss(model, batches.eval, batches.collator)
        timings["save_eval_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert self.cache.resident is not None  # the base this job trained on
        answers = quality.answer(model, self.cache.resident.tokenizer, spec, prepared.prompts)
        metrics, shown = quality.quality(spec, prepared.prompts, prepared.base_answers, answers, log)
        extras |= shown
        timings["generate_s"] = time.perf_counter() - t0
        self.tracking.log({"eval_loss": eval_loss, "base_eval_loss": self.base_eval, **metrics}, step)
        if self.tracking.trackers or self.tracking.warnings:
            extras["tracking"] = self.tracking.summary()
        for name in [m for m in metrics if not m.startswith("base_")]:
            label = "exact match" if name == "exact_match" else name
            log(f"{label}: base {metrics.get(f'base_{name}', float('nan')):.3f} -> adapter {metrics[name]:.3f} "
                f"on {len(prepared.prompts)} eval prompts")
        return TrainResult(
            staging=str(staging),
            steps=step,
            max_steps=self.steps,
            train_loss=_last_train_loss(trainer, output),
            eval_loss=eval_loss,
            base_eval_loss=self.base_eval,
            n_train=prepared.n_train,
            n_eval=prepared.n_eval,
            truncated_rows=prepared.truncated,
            train_tokens=prepared.train_tokens,
            base_reused=self.reused,
            base_load_s=round(self.load_s, 3),
            train_s=round(train_s, 3),
            resumed_from=self.request.resume_from,
            device=self.device,
            metrics=metrics,
            extras=extras,
        )

    def _callbacks(self, p: _Pass) -> list[Any]:
        """loraq's callbacks; ``p.evaluated`` collects each evaluation's eval loss by step (this pass's only);
        the loss curve goes on to the job's experiment trackers too."""
        from transformers import TrainerCallback

        emit, flags, log, track = self.emit, self.flags, self.log, self.tracking
        problems, evaluated = p.problems, p.evaluated

        class LoraqCallback(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.total = state.max_steps

            def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                       **kw: Any) -> None:
                logs = logs or {}
                # Per-step values only: the run average transformers logs at the end ("train_loss")
                # would sit on the loss curve as if it were the last step's loss.
                metrics = {k: float(v) for k, v in logs.items()
                           if k in {"loss", "eval_loss", "learning_rate", "grad_norm"} and isinstance(v, (int, float))}
                if not metrics:
                    return
                emit(Progress(step=state.global_step, max_steps=state.max_steps, metrics=metrics))
                track.log(metrics, state.global_step)
                log(f"step {state.global_step}/{state.max_steps} "
                    + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
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


def _published_eval_loss(stopping: dict[str, Any] | None, evaluated: dict[int, float], step: int) -> float | None:
    """The eval loss of the weights published, if an evaluation already measured them; else ``None``."""
    if stopping is not None and "best_eval_loss" in stopping:  # the best step's weights were put back in
        return float(stopping["best_eval_loss"])
    if stopping is not None:
        return evaluated.get(int(stopping.get("published_step", step)))
    return evaluated.get(step)


def _last_train_loss(trainer: Any, output: Any) -> float | None:
    for entry in reversed(trainer.state.log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return float(output.training_loss) if output is not None else None
