"""Calling a model with some parameters swapped for other tensors, safe for modules registered
under two names.

``torch.func.functional_call`` (torch 2.13) restores a module reached by two paths (``self.a =
self.b = lin``) with the tensor it swapped in: after one call the model holds a plain tensor
where its ``Parameter`` was, and every later gradient of that parameter is missing. Here each
parameter is swapped once, in every slot that holds it (a module under two names, or one
``Parameter`` tied between two modules), and the original objects are put back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn


def _slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``{id(parameter): [(module, attribute), ...]}``: every place that holds each parameter."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for module in model.modules():  # each module object once, whatever its number of names
        for attr, p in module._parameters.items():
            if p is not None and (id(module), attr) not in seen:
                seen.add((id(module), attr))
                slots.setdefault(id(p), []).append((module, attr))
    return slots


@contextmanager
def swapped(model: nn.Module, params: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, ``model``'s parameter named ``name`` (as in
    ``model.named_parameters(remove_duplicate=False)``) reads as ``params[name]``, in every
    module that holds it; the original parameters are back on exit, also after an error."""
    named = dict(model.named_parameters(remove_duplicate=False))
    slots = _slots(model)
    saved: list[tuple[nn.Module, str, nn.Parameter | None]] = []
    try:
        for name, value in params.items():
            for module, attr in slots[id(named[name])]:
                saved.append((module, attr, module._parameters[attr]))
                module._parameters[attr] = value  # type: ignore[assignment]
        yield
    finally:
        for module, attr, original in reversed(saved):
            module._parameters[attr] = original


def call_swapped(
    model: nn.Module, params: Mapping[str, Tensor], function: Callable, args: tuple
) -> Tensor:
    """``function(*args)`` with ``model``'s parameters ``params`` swapped in (see
    :func:`swapped`); a drop-in for ``torch.func.functional_call`` that differentiates through
    ``params`` under ``torch.func`` transforms."""
    with swapped(model, params):
        return function(*args)
