"""The training controls inside the trainer (issue 12): torch, transformers and PEFT are imported in functions.

- :func:`lora_config`: the job's LoRA with its variants (DoRA, rsLoRA,
  ``modules_to_save``, PEFT's ``init_lora_weights``);
- :func:`warm_start`: a job's LoRA started from a published adapter's weights
  (``init_from``), checked again against what submit saw;
- :class:`EarlyStopping`: the eval loss watched at every evaluation, training
  stopped after ``patience`` evaluations without an improvement of more than
  ``min_delta``, and the best weights kept, in memory and in every checkpoint
  (``checkpoint-N/loraq-best/``), so a resumed attempt still knows them and the
  adapter published is the best one, not the last;
- the OOM back-off: :class:`Batching` and :func:`after_oom` (the micro-batch
  halved and ``grad_accum`` doubled, the same examples per optimizer step; at
  micro-batch 1 gradient checkpointing; then nothing), :func:`settle_resume` (a
  checkpoint's ``trainer_state.json`` made to say loraq's batch settings, not the
  ones it was saved with) and :class:`BatchGuard` (training does not start with
  any other batch size).

The tests' fault hooks (an injected bug, an injected out-of-memory error) are in :mod:`.faults`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import checkpoints, fsutil
from ..errors import FailureKind, TrainingError, classify
from ..protocol import JobInput
from ..queue.spec import EarlyStoppingSpec, JobSpec, peft_init, rewrites_base

BEST_DIR = "loraq-best"  # inside a checkpoint: the best weights so far and best.json
BEST_WEIGHTS = "adapter_model.safetensors"
BEST_META = "best.json"


# ---------------------------------------------------------------- LoRA variants and warm starts


def lora_config(spec: JobSpec) -> Any:
    from peft import LoraConfig

    lora = spec.lora
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM", use_dora=lora.use_dora, use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save, init_lora_weights=peft_init(lora.init),
    )


def save_initial(model: Any, spec: JobSpec, folder: Path) -> Path | None:
    """For an ``init`` that rewrites the base (PiSSA, OLoRA): the LoRA as initialised, which PEFT needs to turn
    the trained adapter into a plain LoRA that loads on the unchanged base. ``None`` for any other init."""
    if not rewrites_base(spec.lora.init):
        return None
    config = model.peft_config["default"]
    chosen = config.init_lora_weights
    config.init_lora_weights = True  # saved as a plain LoRA's config, as PEFT's conversion asks
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        config.init_lora_weights = chosen
    return folder


def save_adapter(model: Any, staging: Path, initial: Path | None) -> None:
    """The adapter into ``staging``; one that rewrote the base is converted so that it loads on the unchanged base.

    ``save_embedding_layers=False``: with an embedding among the targets, PEFT would also
    save the base's whole embedding matrix "in case the vocabulary was resized". loraq
    never resizes it, and on a real base that copy is most of the file (SmolLM2: 28 M
    values; Llama 3 8B: 525 M, 2 GB in float32) in every adapter.
    """
    if initial is None:
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
    else:
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False,
                              path_initial_model_for_weight_conversion=str(initial))


def warm_start(model: Any, job: JobInput) -> int:
    """Load the ``init_from`` adapter's weights into the fresh LoRA; return how many tensors were loaded."""
    if not job.init_from_path:
        return 0
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(job.init_from_path) / BEST_WEIGHTS
    if job.init_from_sha256 and (not weights.is_file() or fsutil.sha256_file(weights) != job.init_from_sha256):
        raise TrainingError(f"init_from: {weights} changed since the job was submitted (or is gone); the warm start "
                            "was checked as it was. Submit the job again", kind=FailureKind.SPEC)
    state = load_file(str(weights))
    result = set_peft_model_state_dict(model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        raise TrainingError(f"init_from: {weights} does not fit this job's LoRA ({len(missing)} LoRA tensors missing, "
                            f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]!r})", kind=FailureKind.SPEC)
    return len(state)


def lora_state(model: Any) -> dict[str, Any]:
    """The adapter's weights (as ``save_pretrained`` writes them), copied to the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state(model: Any, state: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)


# ---------------------------------------------------------------- early stopping and the best checkpoint


@dataclass
class Best:
    step: int
    value: float  # of the metric watched: the eval loss, or a grader's score
    evaluations: int  # how many evaluations it was chosen from
    eval_loss: float | None = None  # the eval loss at that step (the value itself when the eval loss is watched)


#: Measures a grader on the model as it is now (the eval prompts' greedy answers); ``nan``: not measured.
Measure = Callable[[], float]


class EarlyStopping:
    """Watches a metric; stops after ``patience`` evaluations without an improvement of more than ``min_delta``.

    The metric is the eval loss (lower is better), or a grader of ``validation.metrics``
    (higher is better), measured by ``measure`` at each evaluation on the eval prompts'
    greedy answers and written into that evaluation's ``log_history`` entry as
    ``eval_<metric>``. The patience count is recomputed from ``state.log_history`` (which a
    resumed Trainer restores), so it survives a resume. The best weights are kept in memory
    and written into every checkpoint.
    """

    def __init__(self, settings: EarlyStoppingSpec, model: Any, resume_from: str | None, log: Callable[[str], None],
                 measure: Measure | None = None):
        self.settings = settings
        self.model = model
        self.log = log
        self.measure = measure
        self.best: Best | None = None
        self.weights: dict[str, Any] | None = None
        self.stopped: tuple[int, str] | None = None  # (step, why) when it stopped training
        if resume_from:
            self._restore(Path(resume_from) / BEST_DIR)

    def _restore(self, folder: Path) -> None:
        if not (folder / BEST_META).is_file():
            return
        from safetensors.torch import load_file

        meta = json.loads((folder / BEST_META).read_text(encoding="utf-8"))
        value = float(meta.get("value", meta.get("eval_loss")))
        loss = meta.get("eval_loss")
        self.best = Best(int(meta["step"]), value, int(meta.get("evaluations", 1)),
                         float(loss) if isinstance(loss, (int, float)) else None)
        self.weights = load_file(str(folder / BEST_WEIGHTS))

    def callback(self) -> Any:
        from transformers import TrainerCallback

        keeper = self

        class EarlyStoppingCallback(TrainerCallback):  # type: ignore[misc]
            def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                            **kw: Any) -> None:
                loss = (metrics or {}).get("eval_loss")
                value = (metrics or {}).get(f"eval_{keeper.metric}")
                if keeper.metric != "loss" and keeper.measure is not None:
                    value = keeper.measure()
                    entry = state.log_history[-1] if state.log_history else None
                    if entry is not None and entry.get("step") == state.global_step and "eval_loss" in entry:
                        entry[f"eval_{keeper.metric}"] = value  # kept in trainer_state.json: a resume counts it
                    keeper.log(f"step {state.global_step} eval_{keeper.metric}={value:.4g}")
                keeper.evaluated(state, control, value, loss)

            def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                keeper.save_into(Path(args.output_dir) / checkpoints.checkpoint_name(state.global_step))

        return EarlyStoppingCallback()

    @property
    def metric(self) -> str:
        return self.settings.metric.removeprefix("eval_")

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "loss"

    def _badness(self, value: float) -> float:
        """Lower is better, whatever the metric."""
        return -value if self.higher_is_better else value

    def evaluated(self, state: Any, control: Any, value: float | None, loss: float | None = None) -> None:
        if value is None or not math.isfinite(value):
            return
        step = state.global_step
        key = f"eval_{self.metric}"
        evaluations = [e for e in state.log_history if key in e]
        if self.best is None or self._badness(value) < self._badness(self.best.value):
            eval_loss = float(loss) if loss is not None else (value if not self.higher_is_better else None)
            self.best = Best(step, float(value), len(evaluations), eval_loss)
            self.weights = lora_state(self.model)
        elif self.best is not None:
            self.best.evaluations = len(evaluations)
        best, since, best_step = None, 0, step
        for entry in evaluations:
            badness = self._badness(float(entry[key]))
            if best is None or badness < best - self.settings.min_delta:
                best, since, best_step = badness, 0, int(entry.get("step", step))
            else:
                since += 1
        if since >= self.settings.patience and not control.should_training_stop:
            why = (f"early stopping: no {key} improvement greater than {self.settings.min_delta:g} in "
                   f"{since} evaluation(s) since step {best_step} (patience {self.settings.patience})")
            self.stopped = (step, why)
            self.log(why)
            control.should_training_stop = True

    def save_into(self, checkpoint: Path) -> None:
        """The best weights so far into a checkpoint (before it is marked complete), for a resume to find."""
        if self.best is None or self.weights is None or not checkpoint.is_dir():
            return
        from safetensors.torch import save_file

        folder = checkpoint / BEST_DIR
        folder.mkdir(exist_ok=True)
        save_file(self.weights, str(folder / BEST_WEIGHTS))
        fsutil.atomic_write_json(folder / BEST_META, asdict(self.best))

    def publish_after(self, trainer: Any, max_steps: int) -> dict[str, Any]:
        """:meth:`publish_best` once ``trainer`` has trained, its last step evaluated first if it was not; logged."""
        step = trainer.state.global_step
        if not evaluated_at(trainer.state, step):
            trainer.evaluate()
        stopping = self.publish_best(step, max_steps)
        self.log(f"publishing step {stopping['published_step']} ({stopping['published_because']}); "
                 f"{stopping['stopped_because']}")
        return stopping

    def publish_best(self, final_step: int, max_steps: int) -> dict[str, Any]:
        """Put the best weights into the model; return what the manifest and ``show`` say about it."""
        stopped_at, why = self.stopped or (final_step, f"reached max_steps {max_steps}")
        if self.best is None or self.weights is None:
            return {"published_step": final_step, "published_because": "no evaluation to choose by: the last step",
                    "stopped_at": stopped_at, "stopped_because": why}
        if self.best.step != final_step:
            load_lora_state(self.model, self.weights)
        word = "highest" if self.higher_is_better else "lowest"
        out = {"published_step": self.best.step,
               "published_because": (f"the {word} eval_{self.metric} ({self.best.value:.4f}) of "
                                     f"{self.best.evaluations} evaluation(s)"),
               "stopped_at": stopped_at, "stopped_because": why}
        if self.higher_is_better:
            out["best_" + self.metric] = self.best.value
        if self.best.eval_loss is not None:
            out["best_eval_loss"] = self.best.eval_loss
        return out


def evaluated_at(state: Any, step: int) -> bool:
    return any(e.get("step") == step and "eval_loss" in e for e in state.log_history)


# ---------------------------------------------------------------- OOM back-off


@dataclass(frozen=True)
class Batching:
    """What the OOM back-off changes: the micro-batch, the accumulation, gradient checkpointing."""

    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool = False

    @classmethod
    def of(cls, spec: JobSpec, gradient_checkpointing: bool | None = None) -> Batching:
        """The job's settings; ``gradient_checkpointing`` as the trainer resolved an ``auto`` (train/memory.py)."""
        t = spec.training
        checkpointing = t.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        return cls(int(t.batch_size), t.grad_accum, checkpointing is True)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def after_oom(current: Batching) -> Batching | None:
    """The next settings after an out-of-memory error, with the same examples per optimizer step; ``None``: none left.

    The micro-batch is halved (for an odd one, divided by its smallest prime factor,
    so that micro-batch x grad_accum stays the same); at micro-batch 1, gradient
    checkpointing goes on.
    """
    b = current.batch_size
    if b > 1:
        factor = next(p for p in range(2, b + 1) if b % p == 0)
        return Batching(b // factor, current.grad_accum * factor, current.gradient_checkpointing)
    if not current.gradient_checkpointing:
        return Batching(1, current.grad_accum, True)
    return None


_ASKED = (re.compile(r"Tried to allocate ([\d.]+ ?[KMGTP]i?B)"), re.compile(r"tried to allocate (\d+) bytes"))


def asked(exc: BaseException) -> str | None:
    """How much memory the failed allocation asked for, as the error said it (``2.00 GiB``)."""
    text = str(exc)
    for pattern in _ASKED:
        if match := pattern.search(text):
            value = match.group(1)
            return _human(int(value)) if value.isdigit() else value
    return None


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.2f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def is_oom(exc: BaseException) -> bool:
    return not isinstance(exc, TrainingError) and classify(exc) is FailureKind.OOM


def exhausted(error: str, amount: str | None, current: Batching, device: str) -> TrainingError:
    """The permanent failure once the back-off has nothing left: it says how much memory was asked for."""
    return TrainingError(
        f"out of memory on {device} even at micro-batch 1 (grad_accum {current.grad_accum}) with gradient "
        f"checkpointing{f': asked for {amount} more' if amount else ''} ({error[:200]}); "
        "lower training.max_seq_len, set quantization: 4bit, or train on a device with more memory",
        kind=FailureKind.MEMORY)


def newest_own_checkpoint(checkpoints_dir: str) -> Path | None:
    """The newest complete checkpoint this attempt wrote; incomplete ones after it are removed."""
    folder = Path(checkpoints_dir)
    found = sorted((checkpoints.step_of(p) or 0, p) for p in folder.glob("checkpoint-*") if p.is_dir()) \
        if folder.is_dir() else []
    newest = None
    for _step, path in found:
        if checkpoints.is_complete(path):
            newest = path
        else:
            fsutil.remove_tree(path)  # cut off by the error: training saves it again
    return newest


def settle_resume(folder: str, into: Path, batching: Batching, args: Any) -> str:
    """A private copy of checkpoint ``folder`` whose trainer_state.json holds loraq's settings; its path.

    transformers' ``Trainer`` reads ``train_batch_size`` (and logging, eval and save
    steps) back from the checkpoint's ``trainer_state.json``. transformers 5.24 uses
    the saved batch size only with ``auto_find_batch_size`` (which loraq never sets)
    but keeps it in its state and saves it again; older releases trained with it.
    Either way the settings that win are loraq's: the copy is rewritten to say them.
    The copy is hard links (the original is never changed: the rewrite replaces the link).
    """
    source = Path(folder)
    target = into / source.name
    if source.resolve() != target.resolve():
        if target.exists():
            fsutil.remove_tree(target)
        checkpoints.link_tree(source, target)
    path = target / "trainer_state.json"
    if path.is_file():
        state = json.loads(path.read_text(encoding="utf-8"))
        per_device = getattr(args, "per_device_train_batch_size", None) or batching.batch_size  # what loraq set
        state["train_batch_size"] = per_device * max(1, int(getattr(args, "n_gpu", 1) or 1))
        for key in ("logging_steps", "eval_steps", "save_steps"):
            if getattr(args, key, None) is not None:
                state[key] = getattr(args, key)
        fsutil.atomic_write_json(path, state)
    return str(target)


class BatchGuard:
    """Fails training at its start if it would run with another batch than loraq asked for (a Trainer that
    restored its saved batch size)."""

    def __init__(self, trainer: Any, batching: Batching, per_device: int | None = None) -> None:
        # per_device: the data loader's batch size loraq set (1 when the micro-batches are planned: data/packing.py)
        self.trainer, self.batching = trainer, batching
        self.per_device = batching.batch_size if per_device is None else per_device

    def callback(self) -> Any:
        from transformers import TrainerCallback

        guard = self

        class BatchGuardCallback(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                               **kw: Any) -> None:
                guard.check(args, train_dataloader)

        return BatchGuardCallback()

    def check(self, args: Any, dataloader: Any) -> None:
        used = getattr(self.trainer, "_train_batch_size", None)
        per_device = used // max(1, int(getattr(args, "n_gpu", 1) or 1)) if used else None
        loader = getattr(dataloader, "total_batch_size", None) or getattr(dataloader, "batch_size", None)
        wanted = self.batching
        if (per_device is not None and per_device != self.per_device) or \
                args.gradient_accumulation_steps != wanted.grad_accum or \
                (loader is not None and loader != self.per_device * max(1, int(getattr(args, "n_gpu", 1) or 1))):
            raise TrainingError(f"transformers would train with micro-batch {per_device} (data loader {loader}) x "
                                f"grad_accum {args.gradient_accumulation_steps}; loraq asked for {wanted.batch_size} x "
                                f"{wanted.grad_accum}", kind=FailureKind.INTERNAL)


def drop_saved_copies(model: Any) -> None:
    """Put each ``modules_to_save`` layer's original back, so that ``unload()`` leaves the base as it was loaded.

    PEFT's ``unload()`` puts the trained copy of such a layer in the base's place (peft
    0.21, ``ModulesToSaveWrapper.unload_and_optionally_merge_module``): the resident
    base would carry the job's trained ``lm_head`` into the next job.
    """
    for name, module in list(model.named_modules()):
        original = getattr(module, "original_module", None)
        if original is None or not hasattr(module, "modules_to_save") or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, original)


def checkpointing_args(batching: Batching, arguments: Any) -> dict[str, Any]:
    """TrainingArguments for gradient checkpointing when it is on (transformers 5 calls it activation checkpointing;
    the old name is a deprecated alias there). Non-reentrant: the frozen base's inputs need no gradient hook."""
    if not batching.gradient_checkpointing:
        return {}
    import dataclasses

    new = any(f.name == "activation_checkpointing" for f in dataclasses.fields(arguments))
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def end_gradient_checkpointing(model: Any) -> None:
    """The resident base leaves the job as it came: no gradient checkpointing, no input-grad hook."""
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    if hasattr(model, "disable_input_require_grads") and getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()

