"""Batches for a causal LM: encoded rows, laid out packed (padding-free) or padded, as a job's plan says.

Shared by the trainer and the inspector (torch-side, knows nothing of the queue).
Which rows share a micro-batch is planned torch-free (:mod:`loraq.data.packing`);
this module lays a micro-batch out as tensors:

- :class:`PackedCollator`: the rows one after another in a single row, with
  ``position_ids`` restarting at 0 at every row, and no ``attention_mask``. transformers
  (5.x ``masking_utils``) then finds the row boundaries from the position ids and builds
  the block-diagonal causal mask itself (``find_packed_sequence_indices``; flash
  attention takes the same position ids as variable-length sequences), *but only when
  no cache is in use*: the batch carries ``use_cache=False``, since a model whose
  config says ``use_cache: true`` otherwise makes a cache in training too and the
  packed rows silently attend to each other. Each row's first label is ignored, so no
  row is trained to predict its neighbour's first token.
- :class:`Collator`: padded to the longest row, with an ``attention_mask``.

:class:`MicroBatches` is what ``Trainer`` trains on: item ``k`` of epoch ``e`` is the
``k``-th micro-batch of that epoch's order of the plan's steps (``Trainer`` calls
``set_epoch`` through accelerate's data loader), read one at a time, in order.
:func:`attends_across_rows` checks on the model itself that packed rows stay apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data import packing
from ..data.encoding import IGNORE_INDEX

Item = dict[str, list[int]]


class ListDataset:
    """A map-style dataset over encoded rows."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        return self.items[index]

    @property
    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]


@dataclass
class Collator:
    """Padded to the longest row, with an ``attention_mask``."""

    pad_id: int

    def __call__(self, batch: list[Item]) -> dict[str, Any]:
        import torch

        batch = _unwrap(batch)
        if not batch:
            return _empty(self.pad_id)
        width = max(len(item["input_ids"]) for item in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@dataclass
class PackedCollator:
    """The rows of a micro-batch in one row, ``position_ids`` restarting per row, no mask, no cache."""

    pad_id: int

    def __call__(self, batch: list[Item]) -> dict[str, Any]:
        import torch

        batch = _unwrap(batch)
        if not batch:
            return _empty(self.pad_id)
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for item in batch:
            n = len(item["input_ids"])
            ids += item["input_ids"]
            labels += [IGNORE_INDEX] + list(item["labels"][1:])  # never predict a row's first token from the last row
            positions += range(n)
        return {"input_ids": torch.tensor([ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long),
                "use_cache": False}


def collator_for(packed: bool, pad_id: int) -> Collator | PackedCollator:
    return PackedCollator(pad_id) if packed else Collator(pad_id)


def _unwrap(batch: Sequence[Any]) -> list[Item]:
    """A data loader of batch size 1 over :class:`MicroBatches` hands over ``[micro-batch]``; a plain list is rows."""
    if len(batch) == 1 and isinstance(batch[0], MicroBatch):
        return list(batch[0])
    if any(isinstance(item, MicroBatch) for item in batch):
        raise ValueError(f"a data loader batched {len(batch)} micro-batches together; loraq's batch size is 1 "
                         "micro-batch (the plan makes the micro-batches)")
    return list(batch)


def _empty(pad_id: int) -> dict[str, Any]:
    """An empty micro-batch (a step with fewer rows than grad_accum): one token, nothing to train on."""
    import torch

    return {"input_ids": torch.tensor([[pad_id]]), "labels": torch.tensor([[IGNORE_INDEX]]),
            "position_ids": torch.tensor([[0]]), "use_cache": False}


class MicroBatch(list):  # type: ignore[type-arg]
    """The rows of one micro-batch (a list, marked as one so that collators tell it from a batch of rows)."""


class MicroBatches:
    """The training set as ``Trainer`` sees it: micro-batches in the plan's order for the current epoch."""

    def __init__(self, items: Sequence[Item], plan: packing.Plan, seed: int) -> None:
        self.items, self.plan, self.seed = items, plan, seed
        self.epoch = 0
        self._order = packing.epoch_order(plan.n_steps, seed, 0)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._order = packing.epoch_order(self.plan.n_steps, self.seed, self.epoch)

    def __len__(self) -> int:
        return self.plan.n_micro

    def __getitem__(self, index: int) -> MicroBatch:
        step, part = divmod(index, self.plan.grad_accum)
        return MicroBatch(self.items[i] for i in self.plan.micro(self._order[step], part))


class EvalBatches:
    """The eval set as fixed micro-batches (packed up to a token budget, or padded by length)."""

    def __init__(self, items: Sequence[Item], micro: Sequence[packing.MicroBatch], packed: bool = True) -> None:
        self.items, self.micro, self.packed = items, list(micro), packed

    @property
    def tokens(self) -> int:
        """Trainable tokens as the loss counts them: every row's labels after its first (collator-independent)."""
        return sum(sum(1 for label in self.items[i]["labels"][1:] if label != IGNORE_INDEX)
                   for micro in self.micro for i in micro)

    @property
    def rows_seen(self) -> int:
        """What ``Trainer``'s evaluation loop counts as examples: the first dimension of each batch's input_ids."""
        return len(self.micro) if self.packed else sum(len(micro) for micro in self.micro)

    def __len__(self) -> int:
        return len(self.micro)

    def __getitem__(self, index: int) -> MicroBatch:
        return MicroBatch(self.items[i] for i in self.micro[index])

    @property
    def n_rows(self) -> int:
        return len(self.items)


def sequential_trainer(trainer_class: Any) -> Any:
    """``Trainer`` that reads the micro-batches in order: the plan is the shuffle (and the grouping)."""

    class PlannedTrainer(trainer_class):  # type: ignore[misc, valid-type]
        """Reads the planned micro-batches in order, and reports its eval loss per token, as loraq's own.

        ``Trainer``'s evaluation loop averages each batch's mean loss, weighted by the
        batch's first dimension (1 for a packed row): a mean of micro-batch means, which
        depends on how the eval rows were cut. Each eval batch's loss is scaled here so
        that the loop's average is the sum over every trainable token divided by their
        number: the eval loss that early stopping and the loss curves read is the one
        loraq publishes, whatever the layout.
        """

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            import torch

            dataset = args[0] if args else kwargs.get("train_dataset", self.train_dataset)
            return torch.utils.data.SequentialSampler(dataset if dataset is not None else self.train_dataset)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None, **kwargs: Any) -> Any:
            weight = None
            dataset = self.eval_dataset
            if not model.training and isinstance(dataset, EvalBatches) and "labels" in inputs:
                if not hasattr(self, "_loraq_eval_scale"):
                    self._loraq_eval_scale = dataset.rows_seen / max(1, dataset.tokens)
                count = int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum())
                weight = count * self._loraq_eval_scale / int(inputs["input_ids"].shape[0])
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch, **kwargs)
            if weight is None:
                return out
            if return_outputs:
                return out[0] * weight, out[1]
            return out * weight

    PlannedTrainer.__name__ = PlannedTrainer.__qualname__ = f"Planned{trainer_class.__name__}"
    return PlannedTrainer


def attends_across_rows(model: Any, vocab_size: int, *, device: Any = None, tolerance: float = 1e-3) -> float | None:
    """Whether packed rows see each other in ``model``: the largest logit gap between a row alone and the same
    row packed after another, as :class:`PackedCollator` lays them out; ``None`` when they agree within
    ``tolerance`` (relative to the logits' scale). Runs without gradients, on two rows of 12 and 9 tokens."""
    import torch

    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab_size, (12,), generator=generator).tolist()
    second = torch.randint(0, vocab_size, (9,), generator=generator).tolist()
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0].float()
            batch = PackedCollator(0)([{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}])
            batch.pop("labels")
            packed = model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}).logits[0].float()
    finally:
        if was_training:
            model.train()
    gap = float((packed[len(first):] - alone).abs().max())
    scale = float(alone.abs().max()) or 1.0
    return gap if gap > tolerance * scale else None
