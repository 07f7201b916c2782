"""The queue file: its schema, and how it becomes a list of resolved job specs.

A queue file has ``defaults`` (merged under every job), ``jobs``, and queue-level
settings. Every problem in the file is collected and raised at once as a
:class:`~loraq.errors.SpecError`, each naming the file, the job and the field.
Paths are relative to the queue file and must stay inside the allowed roots.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from .. import safeyaml
from ..errors import PathError, Problem, SpecError, YamlProblem
from ..escape import excerpt, printable
from ..sandbox import Roots, check_model_folder, is_hub_id, is_pickle, open_regular, read_fd, resolve
from . import sweep

#: A job name: it becomes a folder (adapters/<name>) and a command-line argument. Matched
#: with ``fullmatch``: ``$`` would also match before a trailing newline.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
#: Names Windows file systems reserve for devices, with or without an extension (``nul.txt`` too).
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)),
                              *(f"LPT{i}" for i in range(10))})
#: SQLite stores integers in 64 bits; a priority is far smaller in practice.
MAX_PRIORITY = 1_000_000_000
#: The most optimizer steps (``max_steps``, ``save_steps``, ``logging_steps``, ``eval_steps``) a job may name:
#: far past any LoRA run (a million steps at batch 1 is days of GPU time), and far inside SQLite's 64 bits,
#: so a number the store, the trainer and halving's arithmetic hold (README: "Every number and its range").
MAX_STEPS = 10_000_000
#: The largest ``lora.alpha``: PEFT scales a LoRA by alpha / r (alpha / sqrt(r) with rsLoRA); real values are 1-1024.
MAX_ALPHA = 65_536.0
DATASET_FORMATS = ("chat", "prompt_completion", "alpaca", "text", "preference", "openai_preference")
DatasetFormat = Literal["chat", "prompt_completion", "alpaca", "text", "preference", "openai_preference"]
#: The formats of preference pairs (issue 23): TRL's {prompt, chosen, rejected}, OpenAI's DPO rows.
PREFERENCE_FORMATS = ("preference", "openai_preference")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number (got {value})")
    return value


class LoraSpec(_Strict):
    r: int = Field(8, gt=0, le=4096)
    alpha: float = Field(16.0, gt=0, le=MAX_ALPHA)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    # ---- LoRA variants (issue 12), passed to PEFT's LoraConfig as they are
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init: str = "default"  # PEFT's init_lora_weights: see LORA_INITS

    @field_validator("modules_to_save")
    @classmethod
    def _saved(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not all(isinstance(v, str) and v.strip() for v in value)):
            raise ValueError("must be a non-empty list of module names")
        return value

    @field_validator("init")
    @classmethod
    def _init(cls, value: str) -> str:
        if problem := lora_init_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("alpha", "dropout")
    @classmethod
    def _is_finite(cls, value: float) -> float:
        return _finite(value)

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            if value != "all-linear":
                raise ValueError("must be 'all-linear' or a list of module names")
            return value
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError("must be a non-empty list of module names")
        if len(set(value)) != len(value):
            raise ValueError("lists a module twice")
        return value


#: ``auto`` (issue 12): resolved at submit from the dataset (:mod:`loraq.queue.auto`).
Auto = Literal["auto"]


class TrainingSpec(_Strict):
    epochs: Annotated[float, Field(gt=0, le=1000)] | Auto = 3.0
    max_steps: int | None = Field(None, gt=0, le=MAX_STEPS)
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] | Auto = 2.0e-4
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Auto = 8
    grad_accum: int = Field(1, ge=1, le=4096)
    max_seq_len: int = Field(512, ge=8, le=1_048_576)
    save_steps: int = Field(50, ge=1, le=MAX_STEPS)
    logging_steps: int = Field(5, ge=1, le=MAX_STEPS)
    eval_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: on when the largest micro-batch's activations would take over half the device's free memory
    # (train/memory.py); also turned on by the OOM back-off at micro-batch 1
    gradient_checkpointing: bool | Auto = "auto"
    # whole examples packed padding-free up to a token budget per step (data/packing.py); false: padded, by length
    packing: bool = True
    # fused linear cross-entropy (liger-kernel, CUDA only): the logits are never materialised; skipped with a note
    # where liger-kernel is not installed, the device is not CUDA or the architecture is not one it patches
    fused_loss: bool = False

    @field_validator("epochs", "learning_rate", "warmup_ratio", "weight_decay")
    @classmethod
    def _is_finite(cls, value: Any) -> Any:
        return value if value == "auto" else _finite(value)

    @property
    def has_auto(self) -> bool:
        return "auto" in (self.epochs, self.learning_rate, self.batch_size)


class DatasetSpec(_Strict):
    path: str = Field(min_length=1)
    format: DatasetFormat | None = None


class EarlyStoppingSpec(_Strict):
    """Stop when the eval loss has not improved by more than ``min_delta`` for ``patience`` evaluations (issue 12)."""

    patience: int = Field(3, ge=1, le=1000)
    min_delta: float = Field(0.0, ge=0.0, le=1000.0)
    # what is watched: the eval loss (lower is better), or a grader of validation.metrics (higher is better),
    # measured on the eval prompts' greedy answers at each evaluation
    metric: str = "eval_loss"

    @field_validator("min_delta")
    @classmethod
    def _is_finite(cls, value: float) -> float:
        return _finite(value)


#: Metrics a job can ask for besides the eval loss (``validation.metrics``): the graders of
#: loraq.model.graders, each 0 to 1, higher better. ``judge`` is measured when ``validation.judge`` is set.
METRICS = ("exact_match", "rouge_1", "rouge_2", "rouge_l", "bleu", "chrf", "fuzzy_match", "json_valid", "json_match",
           "contains", "regex", "preference_accuracy")
#: Measured on held-out preference pairs, not on generated answers: only a preference job (``method``) has it.
PREFERENCE_METRIC = "preference_accuracy"
JUDGE_METRIC = "judge"
#: Longest pattern accepted for ``validation.contains`` / ``validation.regex``.
MAX_PATTERN_CHARS = 1000


class JudgeSpec(_Strict):
    """A model judge (``validation.judge``): an OpenAI-compatible chat endpoint scores the answers (model/judge.py)."""

    endpoint: str = Field(min_length=1, max_length=2000)  # the API's base URL, e.g. http://127.0.0.1:8000/v1
    model: str = Field(min_length=1, max_length=200)
    rubric: str = Field(min_length=1, max_length=4000)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")  # the key's env variable
    timeout_s: float = Field(30.0, gt=0, le=600)  # one request
    concurrency: int = Field(4, ge=1, le=32)  # requests in flight
    max_rows: int = Field(64, ge=1, le=1024)  # eval prompts judged (the first ones)

    @field_validator("endpoint")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("must be an http(s) URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
        return value.rstrip("/")


class ValidationSpec(_Strict):
    split: float = Field(0.05, ge=0.0, lt=1.0)
    dataset: str | None = None
    min_eval_loss_drop: float = Field(0.0, ge=-1000.0, le=1000.0)  # an eval loss drop, in nats
    early_stopping: EarlyStoppingSpec | None = None
    # ---- quality you can see (issue 10): greedy answers on the eval rows' prompts, base and adapter
    metrics: list[str] = Field(default_factory=list)
    min_exact_match: float | None = Field(None, ge=0.0, le=1.0)  # a gate: the adapter's exact match at least this
    samples: int = Field(3, ge=0, le=50)  # eval prompts whose base and adapter answers are shown side by side
    # gates on measured metrics, {metric: minimum}: the adapter's value at least this (inspect/verdict.py)
    min: dict[str, float] = Field(default_factory=dict)
    contains: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS)  # for the contains grader
    regex: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS)  # for the regex grader
    judge: JudgeSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _min_preference_accuracy(cls, value: Any) -> Any:
        """``min_preference_accuracy: x`` (issue 23's spelling) is ``min: {preference_accuracy: x}``, measured."""
        if isinstance(value, dict) and "min_preference_accuracy" in value:
            value = dict(value)
            minimum = value.pop("min_preference_accuracy")
            value["min"] = {**(value.get("min") or {}), PREFERENCE_METRIC: minimum} if isinstance(
                value.get("min") or {}, dict) else value.get("min")
            metrics = value.get("metrics") or []
            if isinstance(metrics, list) and PREFERENCE_METRIC not in metrics:
                value["metrics"] = [*metrics, PREFERENCE_METRIC]
        return value

    @field_validator("regex")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            import regex

            try:
                regex.compile(value, flags=regex.V0)
            except (regex.error, RecursionError, OverflowError) as exc:
                raise ValueError(f"is not a valid regex ({exc})") from None
        return value

    @field_validator("min")
    @classmethod
    def _minimums(cls, value: dict[str, float]) -> dict[str, float]:
        for minimum in value.values():
            if not 0.0 <= _finite(minimum) <= 1.0:
                raise ValueError(f"a metric's minimum is 0 to 1 (every grader and the judge score 0 to 1), not {minimum}")
        return value

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a metric twice")
        for name in value:
            if name not in METRICS:
                raise ValueError(f"{name!r} is not a metric loraq measures (one of: {', '.join(METRICS)}; "
                                 f"{JUDGE_METRIC} comes with validation.judge)")
        return value

    @property
    def gate_metric(self) -> str | None:
        """The metric that gates besides the eval loss, which ranks a sweep: the first of ``min``
        (``min_exact_match``: exact_match)."""
        if self.min:
            return next(iter(self.min))
        return "exact_match" if self.min_exact_match is not None else None

    @property
    def measured(self) -> list[str]:
        """Every metric this job measures on the eval prompts: ``metrics``, and ``judge`` with a judge."""
        return self.metrics + ([JUDGE_METRIC] if self.judge is not None else [])

    @field_validator("split", "min_eval_loss_drop")
    @classmethod
    def _is_finite(cls, value: float) -> float:
        return _finite(value)

    @model_validator(mode="after")
    def _has_eval(self) -> ValidationSpec:
        if self.split == 0.0 and self.dataset is None:
            raise ValueError("needs split > 0 or a dataset: the eval loss gates publishing")
        if self.min_exact_match is not None and "exact_match" not in self.metrics:
            raise ValueError("min_exact_match gates on the exact_match metric: add metrics: [exact_match]")
        for name in self.min:
            if name not in self.measured:
                raise ValueError(f"min.{name} gates on a metric this job does not measure: add {name} to "
                                 f"validation.metrics (one of: {', '.join(METRICS)}; {JUDGE_METRIC}: set validation.judge)")
        for name in ("contains", "regex"):
            if name in self.metrics and getattr(self, name) is None:
                raise ValueError(f"the {name} metric needs a pattern: set validation.{name}")
        stopping = self.early_stopping
        if stopping is not None and stopping.metric != "eval_loss" and stopping.metric not in self.metrics:
            raise ValueError(f"early_stopping.metric {stopping.metric!r} must be eval_loss or a metric of "
                             f"validation.metrics (add it there)")
        return self


#: Experiment trackers ``tracking.report_to`` may name (train/tracking.py); one not installed is a warning.
TRACKERS = ("mlflow", "tensorboard", "trackio", "wandb")


class TrackingSpec(_Strict):
    """``tracking``: the experiment trackers each job's run is reported to (at queue or job level)."""

    report_to: list[Literal["mlflow", "tensorboard", "trackio", "wandb"]] = Field(default_factory=list)
    experiment: str = Field("loraq", min_length=1, max_length=200)  # the MLflow experiment, the W&B / trackio project
    # a tracking server (http, https, databricks); default: the environment's MLFLOW_TRACKING_URI. A local store
    # (file:, sqlite:) only comes from the environment, the operator's: a queue file writes only inside the home.
    mlflow_uri: str | None = Field(None, max_length=2000)
    tensorboard_dir: str | None = Field(None, max_length=1000)  # inside the home; default tensorboard/<job>
    wandb_entity: str | None = Field(None, max_length=200)

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a tracker twice")
        return value

    @field_validator("mlflow_uri")
    @classmethod
    def _server(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"(https?://|databricks)", value):
            raise ValueError("must be a tracking server (http://, https://, databricks); a local store is named by "
                             "the operator's MLFLOW_TRACKING_URI")
        return value

    @field_validator("tensorboard_dir")
    @classmethod
    def _inside_home(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or Path(value).is_absolute() or ".." in Path(value).parts
                                  or value.startswith("~")):
            raise ValueError("must be a folder relative to the home, without '..' (loraq writes only inside the home)")
        return value


#: Each preference method's settings: (default, low, high) of ``beta``; ranges are what the papers and TRL use, widened.
PREFERENCE_BETA = {"dpo": (0.1, 0.0, 10.0), "orpo": (0.1, 0.0, 10.0), "simpo": (2.0, 0.0, 20.0)}


class PreferenceMethod(_Strict):
    """``method: {type: dpo | orpo | simpo, ...}``: preference tuning on pairs (train/preference.py).

    - ``dpo``: DPO's sigmoid loss, ``-log σ(β·((π_c − ref_c) − (π_r − ref_r)))`` on answer log-probabilities
      summed over tokens; ``beta`` 0.1 (TRL's default). The reference is the model the job starts from.
    - ``orpo``: ORPO, the chosen sequences' NLL (prompt included, as TRL's) plus ``beta`` (the paper's λ,
      TRL's ``beta``, 0.1) times the odds-ratio term ``-log σ(log odds_c − log odds_r)`` on mean per-token log-probabilities. No reference.
    - ``simpo``: SimPO, ``-log σ(β·(mean π_c − mean π_r) − γ)`` with ``γ = gamma_beta_ratio · β``;
      ``beta`` 2.0, ``gamma_beta_ratio`` 0.5 (the paper's defaults; TRL's CPO ``loss_type=simpo`` with
      ``simpo_gamma = γ`` and ``cpo_alpha = 0``). No reference.
    """

    type: Literal["dpo", "orpo", "simpo"]
    beta: float | None = Field(None, gt=0.0, le=20.0)
    gamma_beta_ratio: float | None = Field(None, ge=0.0, le=10.0)  # simpo only
    loss: Literal["sigmoid"] = "sigmoid"  # dpo: the sigmoid loss of the DPO paper (the one loss offered)

    @field_validator("beta", "gamma_beta_ratio")
    @classmethod
    def _is_finite(cls, value: float | None) -> float | None:
        return None if value is None else _finite(value)

    @model_validator(mode="after")
    def _settings(self) -> PreferenceMethod:
        default, _, high = PREFERENCE_BETA[self.type]
        if self.beta is not None and self.beta > high:
            raise ValueError(f"beta for {self.type} is at most {high} (got {self.beta})")
        if self.gamma_beta_ratio is not None and self.type != "simpo":
            raise ValueError(f"gamma_beta_ratio is SimPO's margin; {self.type} has none")
        updates: dict[str, Any] = {}
        if self.beta is None:
            updates["beta"] = default
        if self.type == "simpo" and self.gamma_beta_ratio is None:
            updates["gamma_beta_ratio"] = 0.5
        for key, value in updates.items():  # frozen: filled in once, as validated
            object.__setattr__(self, key, value)
        return self

    @property
    def uses_reference(self) -> bool:
        return self.type == "dpo"


class JobSpec(_Strict):
    """One adapter to train, as written in the queue (after defaults are merged)."""

    name: str
    base_model: str = Field(min_length=1)
    revision: str | None = None
    dataset: DatasetSpec
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    validation: ValidationSpec = ValidationSpec()
    max_retries: int = Field(2, ge=0, le=100)
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    trust_remote_code: bool = False
    # ---- training controls (issue 12)
    group: str | None = None  # the sweep this job was expanded from (queue/sweep.py)
    quantization: Literal["4bit", "8bit"] | None = None  # QLoRA: the base loaded through bitsandbytes
    init_from: str | None = None  # warm start: a published adapter's name, or an adapter folder
    # a dependency: wait until this job (of the queue, or already in the home) has completed, then start from its adapter
    after: str | None = None
    # ---- a chat template for a base without one (issue 10): a built-in name (chatml) or a .jinja file
    chat_template: str | None = None
    # ---- experiment trackers (issue 24): a job's run in MLflow, TensorBoard, trackio, W&B
    tracking: TrackingSpec | None = None
    # ---- preference tuning (issue 23): sft (the default) or {type: dpo | orpo | simpo, beta: ...}
    # (stored as None for sft, and written back as "sft")
    method: PreferenceMethod | None = None

    @field_serializer("method")
    def _method_out(self, value: PreferenceMethod | None) -> Any:
        return "sft" if value is None else value.model_dump()

    @property
    def preference(self) -> PreferenceMethod | None:
        """The preference method, or ``None`` for supervised fine-tuning."""
        return self.method

    @field_validator("method", mode="before")
    @classmethod
    def _method_shorthand(cls, value: Any) -> Any:
        if value in ("dpo", "orpo", "simpo"):
            return {"type": value}
        if value == "sft" or (isinstance(value, dict) and value.get("type") == "sft" and len(value) == 1):
            return None
        if not isinstance(value, dict | PreferenceMethod):
            raise ValueError("must be sft, or {type: dpo | orpo | simpo, beta: ...}")
        return value

    @model_validator(mode="after")
    def _preference(self) -> JobSpec:
        """A preference job has preference pairs and only the features its trainer has; an SFT job has no pairs."""
        method, fmt, validation = self.preference, self.dataset.format, self.validation
        if method is None:
            if fmt in PREFERENCE_FORMATS:
                raise ValueError(f"dataset.format {fmt} holds preference pairs: set method: {{type: dpo}} "
                                 "(or orpo, simpo) to train on them")
            if PREFERENCE_METRIC in validation.metrics:
                raise ValueError("validation.metrics: preference_accuracy is measured on preference pairs: only a "
                                 "job with method: {type: dpo | orpo | simpo} has them")
            return self
        if fmt is not None and fmt not in PREFERENCE_FORMATS:
            raise ValueError(f"method {method.type} trains on preference pairs; dataset.format {fmt} has none "
                             f"(use {' or '.join(PREFERENCE_FORMATS)}, or leave the format to be detected)")
        training = self.training  # packing: refused where the queue file asks for it (preference_refusal)
        refusals = {
            "training.fused_loss": (training.fused_loss, "the preference losses need each answer token's "
                                    "log-probability, which a fused loss never materialises"),
            "validation.early_stopping.metric": (
                validation.early_stopping is not None and validation.early_stopping.metric != "eval_loss",
                "a preference job stops on eval_loss (the method's loss on the eval pairs)"),
            "lora.init": (rewrites_base(self.lora.init), "PiSSA and OLoRA rewrite the base weights, and DPO's "
                          "reference is the base as it is"),
        }
        for field_name, (refused, why) in refusals.items():
            if refused:
                raise ValueError(f"{field_name}: {why} (method {method.type})")
        return self

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must name a built-in chat template (chatml) or a .jinja file")
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and not NAME_PATTERN.match(value):
            raise ValueError("must be 1-100 characters of [A-Za-z0-9._-] and must not start with a dot")
        return value

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must name a published adapter or an adapter folder")
        return value

    @field_validator("after")
    @classmethod
    def _after(cls, value: str | None) -> str | None:
        if value is not None and not NAME_PATTERN.fullmatch(value):
            raise ValueError("must name a job (of this queue, or already in the home)")
        return value

    @model_validator(mode="after")
    def _controls(self) -> JobSpec:
        if self.init_from is not None and self.lora.init != "default":
            raise ValueError(f"init_from starts from a trained adapter's weights; lora.init {self.lora.init!r} "
                             "would initialise them afresh: drop one of the two")
        if self.quantization is not None and rewrites_base(self.lora.init):
            raise ValueError(f"lora.init {self.lora.init!r} rewrites the base weights, which a quantized base "
                             "(quantization) cannot hold: use one or the other")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if problem := name_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    def steps_per_epoch(self, n_train: int) -> int:
        """Optimizer steps in one pass over ``n_train`` padded rows (the last batch may be short).

        With ``packing`` the steps depend on the rows' token counts: ``data.packing.steps_per_epoch``.
        """
        if self.training.batch_size == "auto":
            raise ValueError("training.batch_size is still 'auto': resolve it first (queue/auto.py)")
        batches = math.ceil(n_train / self.training.batch_size)
        return max(1, math.ceil(batches / self.training.grad_accum))

    def total_steps(self, n_train: int, per_epoch: int | None = None) -> int:
        """Optimizer steps the job trains for: ``max_steps``, else ``epochs`` passes of ``per_epoch`` steps
        (by default, ``n_train`` padded rows: :meth:`steps_per_epoch`)."""
        if self.training.max_steps:
            return self.training.max_steps
        if self.training.epochs == "auto":
            raise ValueError("training.epochs is still 'auto': resolve it first (queue/auto.py)")
        per_epoch = per_epoch if per_epoch is not None else self.steps_per_epoch(n_train)
        return max(1, math.ceil(self.training.epochs * per_epoch))


#: The engines ``serving: [...]`` may name (inspect.serving judges them); Ollama serves with llama.cpp.
SERVING_ENGINES = ("vllm", "lorax", "llamacpp")
SERVING_ALIASES = {"ollama": "llamacpp", "llama.cpp": "llamacpp"}


class QueueSettings(_Strict):
    pause_after_failures: int | None = Field(None, ge=1, le=1_000_000)
    # jobs failing for good in a row with the same internal error (a bug) pause the queue; 0: never
    pause_after_internal_errors: int = Field(3, ge=0, le=1_000_000)
    retry_backoff_s: float = Field(10.0, ge=0.0, le=86_400)
    #: Engines every adapter must be servable by (vllm, lorax, llamacpp; ollama = llamacpp):
    #: checked on each job's settings at submit and on the trained adapter before publishing.
    serving: list[str] = Field(default_factory=list)

    @field_validator("serving", mode="before")
    @classmethod
    def _engines(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of serving engines, e.g. [vllm, llamacpp]")
        engines: list[str] = []
        for name in value:
            engine = SERVING_ALIASES.get(name.lower(), name.lower())
            if engine not in SERVING_ENGINES:
                raise ValueError(f"{name!r} is not a serving engine loraq judges "
                                 f"(one of: {', '.join(SERVING_ENGINES + tuple(SERVING_ALIASES))})")
            if engine not in engines:
                engines.append(engine)
        return engines


class ResolvedJob(BaseModel):
    """A validated job with absolute paths: what the store keeps and the trainer runs."""

    model_config = ConfigDict(frozen=True)

    spec: JobSpec
    queue_file: str
    base_model: str  # absolute folder, or a hub id
    dataset_path: str
    eval_dataset_path: str | None = None
    # ---- training controls (issue 12)
    sweep: dict[str, Any] | None = None  # the settings this job of a sweep was given (queue/sweep.py)
    halving: dict[str, Any] | None = None  # a halving sweep's plan and this job's round in it (queue/halving.py)
    auto: dict[str, Any] | None = None  # what each `auto` was resolved to, and why (queue/auto.py)
    init_from_path: str | None = None  # spec.init_from as an absolute adapter folder, checked at submit
    # spec.chat_template as loaded at submit (data/templates.py): the trainer renders with this text
    chat_template_text: str | None = None
    chat_template_path: str | None = None  # the file it was read from; None for a built-in

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def base_key(self) -> str:
        """Jobs with the same key can share one resident base model."""
        key = [self.base_model, self.spec.revision, self.spec.training.precision]
        return json.dumps(key + [self.spec.quantization] if self.spec.quantization else key)


class Queue(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    settings: QueueSettings
    jobs: list[ResolvedJob]


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a job (``None`` if it can).

    A name becomes ``adapters/<name>`` and an argument of ``cancel``/``show``: it must
    be the same folder on every file system and never read as a job id or a flag.
    """
    if not NAME_PATTERN.fullmatch(name):
        return ("must be 1-100 characters of [A-Za-z0-9._-], starting with a letter, a digit or '_' "
                "(not '.' or '-')")
    if name.isdigit():
        return "must not be only digits: 'loraq cancel 1' means the job with id 1"
    if name.endswith("."):
        return "must not end with a dot: Windows file systems drop it, so the adapter folder would lose it"
    if name.split(".", 1)[0].upper() in WINDOWS_RESERVED:
        return f"{name.split('.', 1)[0]!r} is a device name on Windows file systems; the adapter folder could not be made"
    return None


def base_is_local(base_model: str) -> bool:
    return base_model.startswith(("/", "./", "../", "~")) or base_model in (".", "..")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``; nested mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _field_path(loc: tuple[Any, ...], data: Any, *, missing: bool) -> str:
    """The dotted path of the field an error is about, as the user wrote it.

    pydantic puts tags in ``loc`` that name no field (which member of a union failed:
    ``str``, ``list[str]``, ``literal[...]``, ``function-after[...]``). A part is kept
    only where it names something in the input (a key of the mapping, an index of the
    list), so tags drop out and every real key stays, whatever it is called; the last
    part of a "missing" error is kept although the input lacks it.
    """
    parts: list[str] = []
    node = data
    for position, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (missing and position == len(loc) - 1):
            continue
        parts.append(str(part) if isinstance(part, int) else _key(part))
    return ".".join(parts) or "(job)"


def _key(key: Any) -> str:
    """A key of the input as a location: itself when it is a plain name, else a short escaped excerpt."""
    if isinstance(key, str) and len(key) <= 60 and key.isprintable():
        return key
    return excerpt(key, 60)


def _pydantic_problems(where: str, exc: ValidationError, data: Any) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[str] = set()
    for err in exc.errors():
        field = _field_path(err["loc"], data, missing=err["type"] == "missing")
        if field in seen:  # a union reports one error per member: keep the first
            continue
        seen.add(field)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; unknown keys are errors)"
        elif err.get("input") == "auto" and field not in AUTO_FIELDS:
            message = f"'auto' is accepted only for {', '.join(AUTO_FIELDS)}"
        elif err["type"] != "missing" and "input" in err:
            message = f"{message} (got {excerpt(err['input'])})"
        problems.append(Problem(f"{where}: {field}", message))
    return problems


def _load_yaml(path: Path) -> Any:
    where = printable(path)
    try:
        if not resolve(path, what="queue file").exists():
            raise SpecError([Problem(where, "queue file not found")])
        fd = open_regular(resolve(path), what="queue file", shown=path)  # a FIFO would block the read
    except PathError as exc:
        raise SpecError([Problem(where, str(exc).replace(f"queue file {where!r} ", ""))]) from None
    except OSError as exc:
        raise SpecError([Problem(where, f"cannot read: {exc.strerror or exc}")]) from None
    try:
        size = os.fstat(fd).st_size
        if size > safeyaml.MAX_BYTES:
            raise SpecError([Problem(where, f"is {size:,} bytes; queue files over {safeyaml.MAX_BYTES:,} are refused")])
        text = read_fd(fd, safeyaml.MAX_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([Problem(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except OSError as exc:
        raise SpecError([Problem(where, f"cannot read: {exc.strerror or exc}")]) from None
    finally:
        os.close(fd)
    try:
        return safeyaml.load(text)
    except YamlProblem as exc:
        raise SpecError([Problem(f"{where}:{exc.line}" if exc.line else where, str(exc))]) from None


def resolve_local(queue_dir: Path, value: str) -> Path:
    return (queue_dir / Path(value).expanduser()).resolve()


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except ValueError:
        raise PathError(f"{printable(path)!r} holds a NUL byte; not a usable path") from None
    except OSError as exc:
        raise PathError(f"{printable(path)!r}: {exc.strerror or exc}") from None


def load_queue(path: str | Path, roots: Roots, *, allow_remote_code: bool = False) -> Queue:
    """Parse, merge and validate a queue file; raise :class:`SpecError` listing every problem.

    Checks the schema, names, and that every path exists inside ``roots``. Dataset
    rows and base models are checked by :mod:`loraq.data`. ``trust_remote_code`` in a
    job is refused unless the operator allowed remote code (``allow_remote_code``):
    a queue file alone cannot run a model's Python.
    """
    qpath = Path(path).expanduser().absolute()
    return queue_from_doc(_load_yaml(qpath), qpath, roots, where=printable(path), allow_remote_code=allow_remote_code)


def queue_from_doc(doc: Any, qpath: Path, roots: Roots, *, where: str, allow_remote_code: bool = False) -> Queue:
    """Validate a parsed queue file (``qpath`` is where its relative paths start); see :func:`load_queue`."""
    if not isinstance(doc, dict):
        raise SpecError([Problem(where, "expected a mapping with 'jobs' (and optional 'defaults')")])
    problems: list[Problem] = []
    known = {"defaults", "jobs", "tracking", *QueueSettings.model_fields}
    for key in doc:
        if key not in known:
            problems.append(Problem(f"{where}: {_key(key)}", f"unknown key (expected one of: {', '.join(sorted(known))})"))
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(Problem(f"{where}: defaults", "must be a mapping"))
        defaults = {}
    if "name" in defaults:
        problems.append(Problem(f"{where}: defaults.name", "a name is per job, not a default"))
    if isinstance(doc.get("tracking"), dict):  # queue-level tracking: under every job, as a default would be
        defaults = deep_merge({"tracking": doc["tracking"]}, defaults)
    elif "tracking" in doc:
        problems.append(Problem(f"{where}: tracking", "must be a mapping, e.g. {report_to: [mlflow]}"))
    settings_doc = {k: v for k, v in doc.items() if k in QueueSettings.model_fields}
    try:
        settings = QueueSettings.model_validate(settings_doc)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(where, exc, settings_doc))
        settings = QueueSettings()
    raw_jobs = doc.get("jobs")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        problems.append(Problem(f"{where}: jobs", "must be a non-empty list of jobs"))
        raise SpecError(problems)

    for key in ("sweep", "sweep_strategy"):
        if isinstance(defaults, dict) and key in defaults:
            problems.append(Problem(f"{where}: defaults.{key}", "a sweep is per job, not a default"))
            defaults = {k: v for k, v in defaults.items() if k != key}
    raw_jobs, sweeps, plans = sweep.expand_jobs(raw_jobs, defaults if isinstance(defaults, dict) else {}, where, problems,
                                         schema=JobSpec)
    queue_dir = qpath.parent
    jobs: list[ResolvedJob] = []
    names: dict[str, tuple[str, int]] = {}
    validated: dict[str, str] = {}  # a sweep job's settings once validated -> the first job that has them
    for index, raw in enumerate(raw_jobs):
        label = f"job #{index + 1}"
        if not isinstance(raw, dict):
            problems.append(Problem(f"{where}: {label}", "must be a mapping"))
            continue
        if isinstance(raw.get("name"), str):
            label = f"job {excerpt(raw['name'], 60)}"
        merged = deep_merge(defaults, raw)
        try:
            spec = JobSpec.model_validate(merged)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(f"{where}: {label}", exc, merged))
            continue
        # Names that differ only in case would share one adapter folder on macOS and Windows.
        folded = spec.name.lower()
        if folded in names:
            other, first = names[folded]
            same = "" if other == spec.name else f" {other!r}: names that differ only in case are one folder on " \
                                                  "case-insensitive file systems"
            problems.append(Problem(f"{where}: {label}: name", f"duplicate name (also job #{first}{same})"))
            continue
        names[folded] = (spec.name, index + 1)
        if spec.name in sweeps and (twin := _sweep_twin(spec, sweeps, validated, where)) is not None:
            if twin not in problems:
                problems.append(twin)
            continue
        if (refused := preference_refusal(spec, merged)) is not None:
            problems.append(Problem(f"{where}: {label}: training.packing", refused))
            continue
        if spec.trust_remote_code and not allow_remote_code:
            problems.append(Problem(f"{where}: {label}: trust_remote_code", "runs the model's own Python code, which "
                                    "a queue file alone cannot allow: submit with --allow-remote-code, or set "
                                    "allow_remote_code: true in the home's config.yaml"))
            continue
        job, job_problems = _resolve_paths(spec, qpath, queue_dir, roots, f"{where}: {label}")
        problems.extend(job_problems)
        if job is not None:
            jobs.append(job)
    if problems:
        raise SpecError(problems)
    jobs = [job.model_copy(update={"sweep": sweeps[job.name]}) if job.name in sweeps else job for job in jobs]
    jobs = [_first_round(job, plans[job.name]) if job.name in plans else job for job in jobs]
    return Queue(path=str(qpath), settings=settings, jobs=jobs)


def preference_refusal(spec: JobSpec, merged: dict[str, Any]) -> str | None:
    """Why a preference job's queue entry asks for what its trainer does not do (``packing: true``), or ``None``.

    Read from the entry as written: packing is on by default, and a preference job trains padded whatever the default.
    """
    training = merged.get("training")
    if spec.preference is not None and isinstance(training, dict) and training.get("packing") is True:
        return (f"a pair's chosen and rejected answers are scored as whole padded sequences: method "
                f"{spec.preference.type} trains padded; leave packing out or set it false")
    return None


def _sweep_twin(spec: JobSpec, sweeps: dict[str, dict[str, Any]], validated: dict[str, str],
                where: str) -> Problem | None:
    """A problem when this job of a sweep is, once validated, the same job as an earlier one of it.

    ``[4, 4.0, "4"]`` are three values as written and one once validated: three identical
    jobs would train the same adapter thrice and rank it against itself. The values that
    differ only as written are named, with the fields that hold them.
    """
    key = json.dumps([spec.group, spec.model_dump(mode="json", exclude={"name"})], sort_keys=True)
    first = validated.setdefault(key, spec.name)
    if first == spec.name:
        return None
    mine, theirs = sweeps[spec.name], sweeps[first]

    def shown(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    fields = [k for k in mine if shown(mine[k]) != shown(theirs.get(k))] or sorted(mine)

    def value(settings: dict[str, Any], key: str) -> str:
        return excerpt(settings[key], 40) if key in settings else "(unset)"

    if len(fields) == 1:
        said = f"{value(theirs, fields[0])} and {value(mine, fields[0])} are the same value"
    else:
        said = ", ".join(f"{k} {value(theirs, k)} and {value(mine, k)}" for k in fields) + " are the same settings"
    return Problem(f"{where}: job {spec.group!r}: sweep.{', sweep.'.join(fields)}",
                   f"{said} once validated: two jobs of the sweep would be one job (list each value once)")


def _first_round(job: ResolvedJob, plan: dict[str, Any]) -> ResolvedJob:
    """A job of a halving sweep as it starts: ``max_steps`` is its first round's share (queue/halving.py)."""
    training = job.spec.training.model_copy(update={"max_steps": plan["steps"][0]})
    return job.model_copy(update={"spec": job.spec.model_copy(update={"training": training}), "halving": plan})


def _check_file(value: str, field: str, queue_dir: Path, roots: Roots, where: str) -> tuple[Path | None, Problem | None]:
    try:
        candidate = roots.check_read(queue_dir / value, what=field)
        if not candidate.exists():
            return None, Problem(f"{where}: {field}", f"file not found: {printable(candidate)}")
        if not candidate.is_file():
            return None, Problem(f"{where}: {field}", f"not a file: {printable(candidate)}")
    except PathError as exc:
        return None, Problem(f"{where}: {field}", str(exc))
    except OSError as exc:  # a name too long for the file system, a permission
        return None, Problem(f"{where}: {field}", f"{excerpt(value)}: {exc.strerror or exc}")
    if is_pickle(candidate):
        return None, Problem(f"{where}: {field}", f"pickle files are refused: {printable(candidate)}")
    return candidate, None


def _resolve_paths(spec: JobSpec, qpath: Path, queue_dir: Path, roots: Roots, where: str) -> tuple[ResolvedJob | None, list[Problem]]:
    problems: list[Problem] = []
    dataset, problem = _check_file(spec.dataset.path, "dataset.path", queue_dir, roots, where)
    if problem:
        problems.append(problem)
    eval_dataset = None
    if spec.validation.dataset is not None:
        eval_dataset, problem = _check_file(spec.validation.dataset, "validation.dataset", queue_dir, roots, where)
        if problem:
            problems.append(problem)
    base = spec.base_model
    try:
        local = base_is_local(base) or _is_dir(queue_dir / base)
    except PathError as exc:
        problems.append(Problem(f"{where}: base_model", str(exc)))
        local = None
    if local:
        try:
            folder = roots.check_read(queue_dir / Path(base).expanduser(), what="base_model")
            if not folder.is_dir():
                problems.append(Problem(f"{where}: base_model", f"folder not found: {printable(folder)}"))
            elif not (folder / "config.json").is_file():
                problems.append(Problem(f"{where}: base_model",
                                        f"no config.json in {printable(folder)}: not a model folder"))
            else:
                # Every file the model and tokenizer are read from must stay inside the roots,
                # symlinks included (a tokenizer.json linked to a file elsewhere is not read).
                check_model_folder(folder, roots)
            base = str(folder)
        except PathError as exc:
            problems.append(Problem(f"{where}: base_model", str(exc)))
        except OSError as exc:
            problems.append(Problem(f"{where}: base_model", f"{excerpt(base)}: {exc.strerror or exc}"))
    elif local is not None and not is_hub_id(base):
        problems.append(
            Problem(f"{where}: base_model", f"{excerpt(base)} is neither a local folder (start it with ./ or /) nor a "
                                            "hub id like 'org/model'")
        )
    if problems:
        return None, problems
    assert dataset is not None
    return (
        ResolvedJob(
            spec=spec,
            queue_file=str(qpath),
            base_model=base,
            dataset_path=str(dataset),
            eval_dataset_path=str(eval_dataset) if eval_dataset else None,
        ),
        [],
    )


# ---------------------------------------------------------------- training controls (issue 12)

#: The fields that accept ``auto`` (resolved at submit by :mod:`loraq.queue.auto`).
AUTO_FIELDS = ("training.epochs", "training.batch_size", "training.learning_rate")
#: PEFT's ``init_lora_weights`` choices that loraq passes on: ``default`` (PEFT's True: B = 0),
#: ``gaussian``, ``orthogonal``, and the two that start from the base's principal directions and
#: rewrite its weights (``pissa``, ``pissa_niter_<n>``, ``olora``; published converted to a plain
#: LoRA that loads on the unchanged base).
LORA_INITS = ("default", "gaussian", "orthogonal", "pissa", "pissa_niter_<n>", "olora")
#: The most subspace iterations ``pissa_niter_<n>`` may ask of PEFT's randomized SVD (PEFT suggests 4-16).
MAX_PISSA_NITER = 1000
_REFUSED_INITS = {
    "eva": "needs a data-driven EvaConfig and a pass over the data before training",
    "corda": "needs a CordaConfig and a pass over the data before training",
    "loftq": "needs a LoftQConfig and replaces the base weights with quantised ones",
    "mica": "freezes lora_B, which loraq's trainer and inspector expect to train",
    "false": "starts from a random LoRA that already changes the model (PEFT: for debugging)",
}


def lora_init_problem(value: str) -> str | None:
    """Why ``value`` is not an ``init`` loraq accepts (``None`` if it is)."""
    if value in LORA_INITS:
        return None
    if value.startswith("pissa_niter_"):
        niter = value[len("pissa_niter_"):]
        # ASCII digits only ('١٢'.isdigit() is true too), and a count PEFT's randomized SVD finishes
        if niter.isascii() and niter.isdigit() and 1 <= int(niter) <= MAX_PISSA_NITER:
            return None
        return f"pissa_niter_<n> takes n from 1 to {MAX_PISSA_NITER} subspace iterations (got {excerpt(value, 40)})"
    if value.lower() in _REFUSED_INITS:
        return f"{value!r} is not offered: it {_REFUSED_INITS[value.lower()]}"
    return f"must be one of {', '.join(LORA_INITS)} (got {value!r})"


def peft_init(value: str) -> bool | str:
    """``init`` as PEFT's ``init_lora_weights``."""
    return True if value == "default" else value


def rewrites_base(value: str) -> bool:
    """Whether this ``init`` changes the base weights (PiSSA, OLoRA): the adapter is converted before publishing."""
    return value in ("pissa", "olora") or value.startswith("pissa_niter_")

