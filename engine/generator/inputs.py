"""Batches as the generator reads them: tensors, tuples of tensors, or dictionaries of tensors
(a Hugging Face tokenizer's ``input_ids``, ``attention_mask``, ``token_type_ids`` and
``labels``), every tensor holding the batch's examples along its first dimension.

A dictionary batch ``b`` is passed to the default function as ``model(**inputs)`` with the
target keys left out, and a model output carrying ``logits`` (a Hugging Face ``ModelOutput``)
gives those logits. Its ``attention_mask`` marks the padded positions, which do not count in
KFAC's sequence statistics (:mod:`.kfac_factors`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fimntk.engine.errors import InvalidInputError

#: Keys of a dictionary batch that hold targets, not model inputs.
TARGET_KEYS = ("labels", "label", "targets")

#: The key of a dictionary batch that marks real (1) and padded (0) positions.
MASK_KEY = "attention_mask"


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the model: a dictionary batch without its targets."""
    return {k: v for k, v in batch.items() if k not in TARGET_KEYS}


def logits_of(out: object) -> Tensor:
    """A model's output tensor: itself, or the ``logits`` of a ``ModelOutput``/dictionary."""
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise InvalidInputError(
        f"the model returned {type(out).__name__}, not a tensor nor an output with logits: "
        "pass function= that returns the (n, c) outputs"
    )


def default_function(model: nn.Module) -> Callable[..., Tensor]:
    """``model(batch[0])``, or ``model(**inputs)`` for a dictionary batch; logits of a
    ``ModelOutput``."""

    def call(*batch: Any) -> Tensor:
        first = batch[0]
        out = model(**model_inputs(first)) if isinstance(first, Mapping) else model(first)
        return logits_of(out)

    return call


def as_loader(examples: Iterable, lists: bool = False) -> Iterable:
    """``examples`` as an iterable of batches: a tuple of tensors (and, with ``lists``, a list
    of tensors, as a ``DataLoader`` yields) is one batch, ``[examples]``; anything else is a
    loader already."""
    one = isinstance(examples, tuple) or (lists and isinstance(examples, list))
    if one and len(examples) > 0 and all(isinstance(t, Tensor) for t in examples):  # type: ignore[arg-type]
        return [tuple(examples)]
    return examples


def to_device(batch: object, device: torch.device, dtype: torch.dtype) -> tuple:
    """A loader's batch as a tuple whose tensors (also inside dictionaries) are on ``device``,
    floating-point ones in ``dtype``."""
    if isinstance(batch, (Tensor, Mapping)):
        batch = (batch,)
    elif not isinstance(batch, (tuple, list)):
        raise InvalidInputError(
            "the loader must yield tensors, tuples of tensors such as (x,) or (x, y), or "
            "dictionaries of tensors; pass function= to read other batch structures"
        )

    def move(t: object) -> object:
        if isinstance(t, Tensor):
            t = t.to(device)
            return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
        if isinstance(t, Mapping):
            return {k: move(v) for k, v in t.items()}
        return t

    return tuple(move(t) for t in batch)


def tensors_of(batch: tuple) -> list[Tensor]:
    """Every tensor of a batch, dictionaries included."""
    out: list[Tensor] = []
    for t in batch:
        if isinstance(t, Tensor):
            out.append(t)
        elif isinstance(t, Mapping):
            out.extend(v for v in t.values() if isinstance(v, Tensor))
    return out


def map_tensors(batch: tuple, fn: Callable[[Tensor], Tensor]) -> tuple:
    """Apply ``fn`` to every tensor of a batch (dictionaries included)."""

    def one(t: object) -> object:
        if isinstance(t, Tensor):
            return fn(t)
        if isinstance(t, Mapping):
            return {k: one(v) for k, v in t.items()}
        return t

    return tuple(one(t) for t in batch)


def example_dims(batch: tuple) -> tuple:
    """``vmap`` ``in_dims`` of a batch: 0 for its tensors (also inside dictionaries), None for
    everything else."""

    def one(t: object) -> object:
        if isinstance(t, Tensor):
            return 0
        if isinstance(t, Mapping):
            return {k: one(v) for k, v in t.items()}
        return None

    return tuple(one(t) for t in batch)


def targets_of(batch: tuple, index: int) -> Tensor | None:
    """The targets of a batch: ``batch[index]``, or a dictionary batch's ``labels``."""
    if batch and isinstance(batch[0], Mapping):
        for key in TARGET_KEYS:
            if isinstance(batch[0].get(key), Tensor):
                return batch[0][key]
        return None
    return batch[index] if len(batch) > index else None


def positions_mask(batch: tuple) -> Tensor | None:
    """``(n, T)`` of 1 for real and 0 for padded positions, from a dictionary batch's
    ``attention_mask``; None without one."""
    if batch and isinstance(batch[0], Mapping):
        mask = batch[0].get(MASK_KEY)
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return mask
    return None
