"""Preference tuning on LoRA (issue 23): DPO, ORPO and SimPO, from a fresh LoRA or a warm start.

The losses (each checked against TRL's trainer code in tests/test_preference.py):

- per sequence, the answer tokens' log-probabilities summed (:func:`sequence_logps`), the chosen
  and rejected sides of a batch in one concatenated forward (``[chosen; rejected]``, padded):
  the model's body over the batch, then its LM head and log-softmax on the scored positions only
  (:func:`scored_token_logps`: the answers', and for ORPO the chosen sequences'), in chunks, as
  TRL's fused LM head: no vocabulary-wide logits for every position;
- **DPO** (sigmoid): ``-log σ(β·((π_c − ref_c) − (π_r − ref_r)))``, averaged over pairs (TRL
  ``DPOTrainer``, ``loss_type="sigmoid"``);
- **ORPO**: the chosen sequences' NLL (mean over their tokens, the prompt's included, as TRL's
  ``ORPOTrainer`` computes it) ``− β · mean log σ(log odds_c − log odds_r)``, the odds from mean
  per-token answer log-probabilities;
- **SimPO**: ``-log σ(β·(mean π_c − mean π_r − γ/β))`` with ``γ/β = gamma_beta_ratio`` (TRL
  ``CPOTrainer``, ``loss_type="simpo"``, ``cpo_alpha=0``).

The reference model costs no second copy. DPO's reference is the model the job starts from:
the base (the fresh LoRA's B is zero, and the reference pass runs with the adapter disabled,
PEFT's ``disable_adapter()``), or for a warm start the starting adapter's weights. Its
log-probabilities are computed once, before training, in eval mode and without gradients,
for every train and eval pair, and ride along in the batches (TRL's
``precompute_ref_log_probs``): one forward per pair instead of one per pair per epoch, and
no frozen copy of the starting adapter to keep. A retried attempt computes them again from
the starting weights (the warm start is loaded first, whatever checkpoint it then resumes).

Quality: ``preference_accuracy`` is the share of held-out pairs whose log-probability margin
(chosen − rejected, summed over answer tokens) is positive, for the base (adapter disabled)
and the adapter (and, for a warm start, the starting adapter: ``extras["preference"]``).
The eval loss is the method's loss on the eval pairs; the base's is the starting model's
(DPO's: ln 2). Chosen and rejected log-probabilities, rewards, margins and the reward
accuracy go out as ``progress`` metrics at each logging step and evaluation, and to the job's
experiment trackers (``tracking.report_to``).

As for SFT jobs, an out-of-memory error in training goes on with smaller micro-batches (the
same pairs per optimizer step) from the newest checkpoint, or from the starting LoRA weights
(:meth:`PreferenceRun._train`); early stopping watches the eval loss and publishes the best
evaluated step. Not here (refused at submit): packing, the fused loss, early stopping on another
metric, PiSSA/OLoRA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import checkpoints, data, fsutil
from ..errors import DataError, FailureKind, TemplateBudgetError, TrainingError
from ..model.base import release_memory, resolve_dtype
from ..protocol import Event, Progress, Started, Stopped, TrainRequest, TrainResult
from ..queue.spec import JobSpec, PreferenceMethod
from . import controls, faults, quality, tracking
from .job import JobRun, _last_train_loss, _OutOfMemory, _Pass
from .prepare import read_roots

Emit = Callable[[Event], None]

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
#: The preference metrics logged as ``progress`` metrics (train: as named; evaluation: ``eval_`` before each).
LOGGED = ("logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


# ---------------------------------------------------------------- the losses


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Each next token's log-probability: ``[batch, length - 1]`` (position ``t`` scores token ``t + 1``)."""
    import torch

    logits = logits[:, :-1, :].float()
    picked = torch.gather(logits, -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the label tokens' log-probabilities summed, and how many there are (``-100``: not an answer)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    per_token = token_logps(logits, labels.masked_fill(labels == IGNORE_INDEX, 0))
    return (per_token * mask).sum(-1), mask.sum(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, stable on both sides of −ln 2."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass
class PairLogps:
    """A batch's answer log-probabilities: sums and token counts per side, and the reference's sums (DPO)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    # the chosen sequences' log-probabilities over every attended token, prompt included (ORPO's NLL, as TRL's)
    chosen_full: torch.Tensor | None = None
    chosen_full_tokens: torch.Tensor | None = None


def preference_loss(method: PreferenceMethod, logps: PairLogps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The method's loss (a scalar, mean over pairs) and, detached, per pair: the log-probabilities and rewards."""
    import torch.nn.functional as F  # noqa: N812

    beta = float(method.beta or 0.0)
    if method.type == "dpo":
        if logps.ref_chosen is None or logps.ref_rejected is None:
            raise ValueError("DPO needs the reference log-probabilities")
        chosen_ratio = logps.chosen - logps.ref_chosen
        rejected_ratio = logps.rejected - logps.ref_rejected
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        loss = losses.mean()
        rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    else:
        chosen_mean = logps.chosen / logps.chosen_tokens.clamp(min=1)
        rejected_mean = logps.rejected / logps.rejected_tokens.clamp(min=1)
        if method.type == "orpo":
            log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
            if logps.chosen_full is None or logps.chosen_full_tokens is None:
                raise ValueError("ORPO needs the chosen sequences' log-probabilities")
            nll = -logps.chosen_full.sum() / logps.chosen_full_tokens.sum().clamp(min=1)
            loss = nll - beta * F.logsigmoid(log_odds).mean()
        else:  # simpo
            gamma_ratio = float(method.gamma_beta_ratio or 0.0)
            loss = (-F.logsigmoid(beta * (chosen_mean - rejected_mean - gamma_ratio))).mean()
        rewards = beta * chosen_mean.detach(), beta * rejected_mean.detach()
    stats = {"logps_chosen": logps.chosen.detach(), "logps_rejected": logps.rejected.detach(),
             "rewards_chosen": rewards[0], "rewards_rejected": rewards[1], "reward_margin": rewards[0] - rewards[1],
             "reward_accuracy": (rewards[0] > rewards[1]).float()}
    return loss, stats


#: The float32 logits one chunk of the LM-head pass holds (rows × vocabulary × 4 bytes); more rows go in chunks.
HEAD_CHUNK_BYTES = 128 * 2**20
#: Config keys of models whose forward changes the logits after the LM head (TRL's fused head reads the same ones):
#: their log-probabilities come from the model's own forward, the logits of every position.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier")


def _causal_lm(model: Any) -> Any:
    """The transformers causal LM under a PEFT wrapper (its LoRA layers in place), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lean_parts(model: Any) -> tuple[Any, Any] | None:
    """``(backbone, head)`` when the logits are the head's output and nothing more, else None."""
    causal = _causal_lm(model)
    config = getattr(causal, "config", None)
    if config is None or not hasattr(causal, "get_output_embeddings"):
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, key, None) is not None for key in _LOGIT_TRANSFORMS):
        return None
    backbone, head = getattr(causal, getattr(causal, "base_model_prefix", ""), None), causal.get_output_embeddings()
    if backbone is None or backbone is causal or head is None:
        return None
    return backbone, head


def _head_logps(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` of each row of ``hidden`` ``[rows, hidden]`` through ``head`` (the model's own LM-head
    module, an adapter on it included), in float32, in chunks of :data:`HEAD_CHUNK_BYTES` of logits; with
    gradients, a chunk's logits are recomputed in the backward pass rather than kept (one chunk: kept)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        return torch.gather(logits, -1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    vocab = int(head.weight.shape[0]) if hasattr(head, "weight") else int(head.out_features)
    rows = max(1, HEAD_CHUNK_BYTES // (4 * vocab))
    if hidden.shape[0] <= rows:
        return chunk_logps(hidden, targets)
    recompute = torch.is_grad_enabled()
    parts = [checkpoint(chunk_logps, hidden[i:i + rows], targets[i:i + rows], use_reentrant=False) if recompute
             else chunk_logps(hidden[i:i + rows], targets[i:i + rows]) for i in range(0, hidden.shape[0], rows)]
    return torch.cat(parts)


def scored_token_logps(model: Any, batch: dict[str, Any], scored: torch.Tensor) -> torch.Tensor:
    """Each next token's log-probability, ``[batch, length - 1]``, where ``scored`` (that shape) is true; 0 elsewhere.

    The model's body runs once; the LM head and the log-softmax run on the scored positions only (shifted by one:
    position ``t`` scores token ``t + 1``), never building the vocabulary-wide logits of the whole batch. A model
    whose forward transforms the logits after its head (:data:`_LOGIT_TRANSFORMS`) runs its own forward instead.
    """
    import torch

    parts = _lean_parts(model)
    if parts is None:
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return token_logps(outputs.logits, batch["input_ids"]) * scored
    backbone, head = parts
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
    picked = _head_logps(head, hidden[:, :-1][scored], batch["input_ids"][:, 1:][scored])
    return torch.zeros(scored.shape, dtype=picked.dtype, device=picked.device).masked_scatter(scored, picked)


def forward_logps(model: Any, batch: dict[str, Any], *, nll: bool = True) -> PairLogps:
    """One forward over ``[chosen; rejected]``; the sums and counts of each side, the reference's from the batch.

    ``nll``: also the chosen sequences' log-probabilities over every attended token (ORPO's NLL term); without it
    only the answer tokens are scored (DPO, SimPO, the reference)."""
    answer = batch["labels"][:, 1:] != IGNORE_INDEX
    attended = batch["attention_mask"][:, 1:] == 1
    n = answer.shape[0] // 2
    scored = answer.clone()
    if nll:
        scored[:n] |= attended[:n]
    per_token = scored_token_logps(model, batch, scored)
    sums, counts = (per_token * answer).sum(-1), answer.sum(-1)
    return PairLogps(chosen=sums[:n], rejected=sums[n:], chosen_tokens=counts[:n], rejected_tokens=counts[n:],
                     ref_chosen=batch.get("ref_chosen"), ref_rejected=batch.get("ref_rejected"),
                     chosen_full=(per_token[:n] * attended[:n]).sum(-1) if nll else None,
                     chosen_full_tokens=attended[:n].sum(-1) if nll else None)


# ---------------------------------------------------------------- data


@dataclass
class PairCollator:
    """Pairs into one padded batch: ``input_ids``/``labels``/``attention_mask`` of ``[chosen; rejected]``."""

    pad_id: int

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        sequences = [(i["chosen_input_ids"], i["chosen_labels"]) for i in items] + \
                    [(i["rejected_input_ids"], i["rejected_labels"]) for i in items]
        width = max(len(ids) for ids, _ in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (seq, lab) in enumerate(sequences):  # right padding, as TRL's DPO collator
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.long)
            mask[row, :len(seq)] = 1
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if all("ref_chosen" in i for i in items):
            batch["ref_chosen"] = torch.tensor([i["ref_chosen"] for i in items], dtype=torch.float32)
            batch["ref_rejected"] = torch.tensor([i["ref_rejected"] for i in items], dtype=torch.float32)
        return batch


@dataclass
class Pairs:
    """A job's pairs, encoded: train and eval items, and the eval pairs' chosen sides' prompts (for samples)."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    truncated: int
    train_tokens: int
    prompts: list[data.Prompt] = field(default_factory=list)
    base_answers: list[str] = field(default_factory=list)
    fault: faults.Fault | None = None  # tests only: see train/faults.py


def encode_pairs(rows: list[dict[str, Any]], fmt: str, tokenizer: Any, max_seq_len: int,
                 chat_template: str | None) -> tuple[list[dict[str, Any]], int, list[dict[str, Any]], str]:
    """Pairs as items of both sides' token ids and answer labels; pairs a side of which keeps no answer token are
    left out (submit refused them). Returns the items, the sides truncated, the chosen rows and their format."""
    from ..data import pairs

    sides = pairs.split_sides(data.Dataset(path=Path("pairs"), format=fmt, rows=rows, lines=list(range(1, len(rows) + 1)),
                                           sha256=""))
    if sides is None:
        return [], 0, [], "prompt_completion"
    encoded = [data.encode_many(side.rows, sides.format, tokenizer, max_seq_len, chat_template)
               for side in (sides.chosen, sides.rejected)]
    items = [{"chosen_input_ids": c.input_ids, "chosen_labels": c.labels,
              "rejected_input_ids": r.input_ids, "rejected_labels": r.labels}
             for c, r in zip(*encoded, strict=True) if c.trainable and r.trainable]
    truncated = sum(e.truncated for side in encoded for e in side)
    return items, truncated, sides.chosen.rows, sides.format


def _expected(size: int | None, sha256: str | None) -> tuple[int | None, str] | None:
    """``(bytes, sha256)`` of a dataset as submitted: a file changed since is refused unread."""
    return (size, sha256) if sha256 else None


def prepare_pairs(request: TrainRequest, spec: JobSpec, tokenizer: Any, roots: Any) -> Pairs:
    """Read, split and encode the job's pairs (the same split and checks as submit's)."""
    job = request.job
    dataset = data.load_dataset(job.dataset_path, spec.dataset.format, roots=roots,
                                expect=_expected(job.dataset_bytes, job.dataset_sha256))
    fault = faults.injected_bug(dataset.rows)
    if job.eval_dataset_path:
        eval_set = data.load_dataset(job.eval_dataset_path, spec.dataset.format or dataset.format, roots=roots,
                                     expect=_expected(job.eval_dataset_bytes, job.eval_dataset_sha256))
        train_rows, eval_rows, eval_fmt = dataset.rows, eval_set.rows, eval_set.format
    else:
        data.check_split(dataset.path, len(dataset.rows), spec.validation.split)
        train_idx, eval_idx = data.split_indices(len(dataset.rows), spec.validation.split, spec.training.seed)
        train_rows, eval_rows = [dataset.rows[i] for i in train_idx], [dataset.rows[i] for i in eval_idx]
        eval_fmt = dataset.format
    max_len, template = spec.training.max_seq_len, job.chat_template_text
    try:
        train, truncated, _, _ = encode_pairs(train_rows, dataset.format, tokenizer, max_len, template)
        held, _, chosen_rows, side_fmt = encode_pairs(eval_rows, eval_fmt, tokenizer, max_len, template)
    except TemplateBudgetError as exc:
        raise TrainingError(str(exc), kind=FailureKind.SPEC) from exc
    except data.TemplateError as exc:
        raise TrainingError(f"{dataset.path}: {exc}", kind=FailureKind.DATA) from exc
    if not train or not held:
        raise TrainingError(f"{dataset.path}: no pair keeps an answer token on both sides after truncation to "
                            f"max_seq_len {max_len}", kind=FailureKind.DATA)
    wanted = spec.validation.samples + (64 if [m for m in spec.validation.measured if m != "preference_accuracy"] else 0)
    prompts = [p for p in data.prompts_of(chosen_rows[:wanted], side_fmt, tokenizer, template)
               if isinstance(p, data.Prompt)] if wanted else []
    tokens = sum(sum(1 for t in item[k] if t != IGNORE_INDEX) for item in train
                 for k in ("chosen_labels", "rejected_labels"))
    return Pairs(train=train, eval=held, truncated=truncated, train_tokens=tokens, prompts=prompts, fault=fault)


# ---------------------------------------------------------------- measuring


@dataclass(frozen=True)
class PairEval:
    """The method's loss and the margins on a set of pairs, for one model state."""

    loss: float
    accuracy: float  # preference_accuracy: summed log-probability margin > 0
    logps_chosen: float
    logps_rejected: float
    reward_margin: float


@contextlib.contextmanager
def _evaluating(model: Any) -> Iterator[None]:
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _batches(items: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _device(model: Any) -> Any:
    return next(p for p in model.parameters()).device


def _on(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class _Tally:
    """A :class:`PairEval` summed batch by batch (:func:`evaluate_pairs`, and the Trainer's evaluations)."""

    loss: float = 0.0
    wins: int = 0
    n: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("logps_chosen", "logps_rejected", "reward_margin"), 0.0))

    def add(self, logps: PairLogps, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        pairs = int(logps.chosen.shape[0])
        self.loss += float(loss) * pairs
        self.wins += int((logps.chosen > logps.rejected).sum())
        self.n += pairs
        for key in self.sums:
            self.sums[key] += float(stats[key].sum())

    def result(self) -> PairEval:
        n = max(1, self.n)
        return PairEval(loss=self.loss / n, accuracy=self.wins / n, **{k: v / n for k, v in self.sums.items()})


def evaluate_pairs(model: Any, items: list[dict[str, Any]], collator: PairCollator, method: PreferenceMethod,
                   batch_size: int) -> PairEval:
    """Loss, preference accuracy and mean log-probabilities of ``model`` on ``items``, in eval mode."""
    device = _device(model)
    tally = _Tally()
    with _evaluating(model):
        for chunk in _batches(items, batch_size):
            logps = forward_logps(model, _on(collator(chunk), device), nll=method.type == "orpo")
            tally.add(logps, *preference_loss(method, logps))
    return tally.result()


def reference_eval(items: list[dict[str, Any]]) -> PairEval:
    """DPO's eval of the reference itself, from the log-probabilities :func:`add_reference` put in ``items``:
    the policy is the reference, so the loss is ln 2 and the rewards are 0 (no second pass over the pairs)."""
    n = max(1, len(items))
    return PairEval(loss=math.log(2.0), accuracy=sum(i["ref_chosen"] > i["ref_rejected"] for i in items) / n,
                    logps_chosen=sum(i["ref_chosen"] for i in items) / n,
                    logps_rejected=sum(i["ref_rejected"] for i in items) / n, reward_margin=0.0)


def add_reference(model: Any, items: list[dict[str, Any]], collator: PairCollator, batch_size: int, *,
                  disable_adapter: bool) -> None:
    """Put the reference's summed answer log-probabilities into each item (``ref_chosen``, ``ref_rejected``).

    The reference is ``model`` as it is now (the starting adapter), or with ``disable_adapter`` the base.
    """
    device = _device(model)
    off = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    with _evaluating(model), off:
        for chunk in _batches(items, batch_size):
            batch = _on(collator([{k: v for k, v in i.items() if not k.startswith("ref_")} for i in chunk]), device)
            logps = forward_logps(model, batch, nll=False)
            for item, c, r in zip(chunk, logps.chosen.tolist(), logps.rejected.tolist(), strict=True):
                item["ref_chosen"], item["ref_rejected"] = c, r


# ---------------------------------------------------------------- the trainer


def trainer_class(base: Any) -> Any:
    """transformers' ``Trainer`` with the preference loss, and its metrics in the logs."""
    import torch

    class PreferenceTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, method: PreferenceMethod, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.method = method
            self.model_accepts_loss_kwargs = False  # the loss is ours: Trainer scales it for accumulation (as TRL)
            self._stats: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
            #: step -> the eval pairs' :class:`PairEval` at that step's evaluation: the final one is not run twice
            self.evaluations: dict[int, PairEval] = {}
            self._tally: _Tally | None = None
            self.eval_s = 0.0  # the time of the evaluations inside train(), for the job's timings

        def _record(self, mode: str, stats: dict[str, torch.Tensor]) -> None:
            for key, value in stats.items():
                self._stats[mode].setdefault(key, []).append(float(value.float().mean()))

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss, stats = preference_loss(self.method, forward_logps(model, inputs, nll=self.method.type == "orpo"))
            self._record("train" if model.training else "eval", stats)
            return (loss, None) if return_outputs else loss

        def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                            ignore_keys: list[str] | None = None) -> Any:
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                logps = forward_logps(model, inputs, nll=self.method.type == "orpo")
                loss, stats = preference_loss(self.method, logps)
            self._record("eval", stats)
            if self._tally is not None:
                self._tally.add(logps, loss, stats)
            return loss.detach(), None, None

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            self._tally, t0 = _Tally(), time.perf_counter()
            try:
                out = super().evaluate(*args, **kwargs)
                self.evaluations[self.state.global_step] = self._tally.result()
            finally:
                self._tally = None
                self.eval_s += time.perf_counter() - t0
            return out

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            mode = "eval" if "eval_loss" in logs else "train"
            prefix = "eval_" if mode == "eval" else ""
            for key, values in self._stats[mode].items():
                if values:
                    logs[f"{prefix}{key}"] = sum(values) / len(values)
            self._stats[mode] = {}
            super().log(logs, *args, **kwargs)

    return PreferenceTrainer


def _metrics_callback(emit: Emit, track: tracking.Tracking) -> Any:
    """Sends the preference metrics of each log (train and eval) out as ``progress`` metrics, and to the trackers."""
    from transformers import TrainerCallback

    wanted = set(LOGGED) | {f"eval_{k}" for k in LOGGED}

    class PreferenceMetrics(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            metrics = {k: float(v) for k, v in (logs or {}).items()
                       if k in wanted and isinstance(v, (int, float)) and math.isfinite(v)}
            if metrics:
                emit(Progress(step=state.global_step, max_steps=state.max_steps, metrics=metrics))
                track.log(metrics, state.global_step)

    return PreferenceMetrics()


class PreferenceRun(JobRun):
    """One attempt of a preference job: :class:`~.job.JobRun`'s base, callbacks and flags, this module's loop."""

    def _train(self) -> Stopped | TrainResult:
        from peft import get_peft_model
        from transformers import set_seed

        request, log, emit, timings, spec = self.request, self.log, self.emit, self.timings, self.spec
        method = spec.preference
        assert method is not None
        resident = self.load_base()
        key, reused, load_s = self.key, self.reused, self.load_s
        log(f"{method.type} (beta {method.beta}): {', '.join(f'{k} {v}' for k, v in method.model_dump().items())}")
        roots = read_roots(request)
        t0 = time.perf_counter()
        try:
            pairs = prepare_pairs(request, spec, resident.tokenizer, roots)
        except DataError as exc:
            raise TrainingError(str(exc), kind=FailureKind.DATA) from exc
        collator = PairCollator(pad_id=_pad_id(resident.tokenizer))
        batch = int(spec.training.batch_size)  # type: ignore[arg-type] # resolved at submit
        per_epoch = spec.steps_per_epoch(len(pairs.train))
        steps = self.steps = spec.total_steps(len(pairs.train), per_epoch)
        timings["prepare_s"] = time.perf_counter() - t0
        pairs.base_answers[:] = quality.answer(resident.model, resident.tokenizer, spec, pairs.prompts)
        set_seed(spec.training.seed)
        try:
            model = get_peft_model(resident.model, controls.lora_config(spec))
        except ValueError as exc:
            raise TrainingError(f"lora: {exc}", kind=FailureKind.SPEC) from exc
        trainer = None
        resume = request.resume_from
        published = False
        try:
            t0 = time.perf_counter()
            # The warm start is loaded whatever checkpoint the attempt resumes: the reference is the starting
            # adapter; Trainer then loads the checkpoint's weights over it.
            warm = controls.warm_start(model, request.job) > 0
            if warm:
                log(f"warm start: LoRA weights loaded from {request.job.init_from_path}")
            if method.uses_reference:
                add_reference(model, pairs.train, collator, batch, disable_adapter=not warm)
                timings["reference_s"] = time.perf_counter() - t0
                add_reference(model, pairs.eval, collator, batch, disable_adapter=not warm)
                start = reference_eval(pairs.eval)  # the model as it starts is the reference
            else:
                start = evaluate_pairs(model, pairs.eval, collator, method, batch)
            if warm or spec.lora.init != "default":  # else the fresh LoRA (B = 0) is the base exactly
                with model.disable_adapter():
                    base = evaluate_pairs(model, pairs.eval, collator, method, batch)
            else:
                base = start
            # reference_s: the train pairs' reference; eval_reference_s: the eval pairs' and the base's evaluation
            timings["eval_reference_s"] = time.perf_counter() - t0 - timings.setdefault("reference_s", 0.0)
            if not math.isfinite(start.loss):
                raise TrainingError(f"base model {key.path} gives a non-finite {method.type} loss ({start.loss}) "
                                    "before any training; check the base model", kind=FailureKind.BASE_MODEL)
            emit(Started(max_steps=steps, base_reused=reused, base_eval_loss=start.loss, resume_from=resume,
                         n_train=len(pairs.train), n_eval=len(pairs.eval)))
            log(f"{len(pairs.train)} train / {len(pairs.eval)} eval pairs, {steps} steps; eval {method.type} loss "
                f"{start.loss:.4f}, preference accuracy: base {base.accuracy:.3f}, start {start.accuracy:.3f}")
            job_dir = Path(request.log_path).parent.parent  # jobs/<id>: the runs continue across its attempts
            self.tracking = tracking.open_runs(spec, job_dir=job_dir, home=job_dir.parent.parent, attempt=request.attempt,
                                               sweep=request.job.sweep, log=log,
                                               resume_step=checkpoints.step_of(resume) if resume else None)
            self.tracking.log({"base_eval_loss": start.loss, "base_preference_accuracy": base.accuracy}, 0)
            batching = controls.Batching.of(spec, spec.training.gradient_checkpointing is True)
            initial = controls.lora_state(model) if resume is None else None  # where a back-off with no checkpoint restarts
            while True:  # once, unless the OOM back-off goes on with smaller micro-batches
                current, trainer, t_train = self._pass(model, pairs, collator, batching, resume)
                try:
                    output = trainer.train(resume_from_checkpoint=current.resume)
                    break
                except BaseException as exc:  # an out-of-memory error goes to the back-off, as for SFT jobs
                    if not controls.is_oom(exc):
                        raise
                    oom = _OutOfMemory.of(exc, trainer)
                trainer = None
                release_memory()
                after = self._after_oom(current, oom)
                batching, resume = after.batching, after.resume
                if resume is None and initial is not None:  # no checkpoint yet: from the weights it started with
                    controls.load_lora_state(model, initial)
            train_s = timings["train_s"] = time.perf_counter() - t_train
            timings["eval_s"] = trainer.eval_s  # inside train_s
            if current.problems:
                raise TrainingError("; ".join(current.problems), kind=FailureKind.DIVERGED)
            step = trainer.state.global_step
            if self.flags.graceful.is_set() and step < steps:
                log(f"stopped gracefully at step {step}")
                return Stopped(step=step)
            t0 = time.perf_counter()
            staging = Path(request.staging_dir)
            if staging.exists():
                fsutil.remove_tree(staging)
            published_step, stopping = step, None
            if current.keeper is not None:  # the adapter published is the best evaluated, the last step's included
                stopping = current.keeper.publish_after(trainer, steps)
                published_step = int(stopping["published_step"])
            controls.save_adapter(model, staging, None)
            # Trainer evaluated the published step (the last of a steps eval strategy, or early stopping's best) on
            # the same pairs and batches: only weights no evaluation of this attempt saw (a resume from the last
            # checkpoint) are evaluated here
            final = trainer.evaluations.get(published_step) or evaluate_pairs(model, pairs.eval, collator, method,
                                                                              batch)
            timings["save_eval_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            answers = quality.answer(model, resident.tokenizer, spec, pairs.prompts)
            generated = spec.model_copy(update={"validation": spec.validation.model_copy(update={
                "metrics": [m for m in spec.validation.metrics if m != "preference_accuracy"]})})
            metrics, extras = quality.quality(generated, pairs.prompts, pairs.base_answers, answers, log)
            timings["generate_s"] = time.perf_counter() - t0
            # measured for every preference job (validation.metrics may name it to gate on it)
            metrics |= {"preference_accuracy": final.accuracy, "base_preference_accuracy": base.accuracy}
            if stopping is not None:
                extras["stopping"] = stopping
            extras["preference"] = {
                "method": method.model_dump(), "reference": ("none" if not method.uses_reference else
                                                             "the starting adapter" if warm else "the base"),
                "started_from": request.job.init_from_path, "eval_pairs": len(pairs.eval),
                "base": dataclasses.asdict(base), "start": dataclasses.asdict(start), "adapter": dataclasses.asdict(final),
            }
            self.tracking.log({"eval_loss": final.loss, "base_eval_loss": start.loss, **metrics}, step)
            if self.tracking.trackers or self.tracking.warnings:
                extras["tracking"] = self.tracking.summary()
            published = True
            log(f"preference accuracy: base {base.accuracy:.3f}, start {start.accuracy:.3f} -> adapter "
                f"{final.accuracy:.3f} on {len(pairs.eval)} eval pairs; eval loss {start.loss:.4f} -> {final.loss:.4f}")
            emit(Progress(step=step, max_steps=steps, metrics={
                "eval_loss": final.loss, "preference_accuracy": final.accuracy,
                "base_preference_accuracy": base.accuracy, "eval_logps_chosen": final.logps_chosen,
                "eval_logps_rejected": final.logps_rejected, "eval_reward_margin": final.reward_margin}))
            return TrainResult(
                staging=str(staging), steps=step, max_steps=steps, train_loss=_last_train_loss(trainer, output),
                eval_loss=final.loss, base_eval_loss=start.loss, n_train=len(pairs.train), n_eval=len(pairs.eval),
                truncated_rows=pairs.truncated, train_tokens=pairs.train_tokens, base_reused=reused,
                base_load_s=round(load_s, 3), train_s=round(train_s, 3), resumed_from=request.resume_from,
                device=self.device, metrics=metrics, extras=extras,
                timings={k: round(v, 3) for k, v in timings.items()},
            )
        finally:
            self.tracking.close(published)
            del trainer
            controls.end_gradient_checkpointing(resident.model)
            model.unload().eval()
            del model
            release_memory()

    def _pass(self, model: Any, pairs: Pairs, collator: PairCollator, batching: controls.Batching,
              resume: str | None) -> tuple[_Pass, Any, float]:
        """A Trainer for ``batching`` from ``resume`` (settled to it), its pass, and when its training starts."""
        import torch
        from transformers import Trainer, TrainingArguments

        spec, request, method = self.spec, self.request, self.spec.preference
        precision = resolve_dtype(spec.training.precision, self.device)
        args = TrainingArguments(
            output_dir=request.checkpoints_dir, per_device_train_batch_size=batching.batch_size,
            per_device_eval_batch_size=batching.batch_size, gradient_accumulation_steps=batching.grad_accum,
            **controls.checkpointing_args(batching, TrainingArguments),
            learning_rate=spec.training.learning_rate, max_steps=self.steps,
            lr_scheduler_type=spec.training.lr_scheduler,
            warmup_steps=math.ceil(spec.training.warmup_ratio * self.steps), weight_decay=spec.training.weight_decay,
            logging_steps=spec.training.logging_steps, save_strategy="steps", save_steps=spec.training.save_steps,
            save_total_limit=2, eval_strategy="steps", eval_steps=spec.training.eval_steps or spec.training.save_steps,
            seed=spec.training.seed, data_seed=spec.training.seed,
            bf16=precision == torch.bfloat16 and self.device != "cpu", fp16=precision == torch.float16,
            use_cpu=self.device == "cpu", report_to=[], disable_tqdm=True, remove_unused_columns=False,
            dataloader_num_workers=0, dataloader_pin_memory=False,
        )
        if resume is not None:
            resume = controls.settle_resume(resume, Path(request.checkpoints_dir).parent / "resume", batching, args)
        current = _Pass(batching, resume)  # what the job's callbacks fill in: problems, evaluations
        extra = [faults.FaultCallback(pairs.fault, batching).callback()] if pairs.fault is not None else []
        if (early := spec.validation.early_stopping) is not None:  # on the eval loss: the method's on the eval pairs
            current.keeper = controls.EarlyStopping(early, model, resume, self.log)
            extra.insert(0, current.keeper.callback())
        trainer = trainer_class(Trainer)(
            model=model, args=args, train_dataset=data_list(pairs.train), eval_dataset=data_list(pairs.eval),
            data_collator=collator, method=method, callbacks=[_metrics_callback(self.emit, self.tracking), *extra,
                                                              *self._callbacks(current)],
        )
        return current, trainer, time.perf_counter()


def data_list(items: list[dict[str, Any]]) -> Any:
    from ..model.batching import ListDataset

    return ListDataset(items)  # type: ignore[arg-type]


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id or 0)


__all__ = ["LOGGED", "PairCollator", "PairEval", "PairLogps", "PreferenceRun", "add_reference",
           "evaluate_pairs", "forward_logps", "preference_loss", "scored_token_logps", "sequence_logps"]
