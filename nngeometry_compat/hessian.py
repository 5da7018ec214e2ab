"""``nngeometry.hessian``: the loss Hessian, NNGeometry's arguments mapped to the engine's."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from fimntk.engine import LayerCollection, PMatAbstract
from fimntk.engine import hessian as engine_hessian


def Hessian(
    model: nn.Module,
    loader: Iterable,
    representation: str | type[PMatAbstract],
    function: Callable | None = None,
    layer_collection: LayerCollection | None = None,
    verbose: bool = False,
) -> PMatAbstract:
    """NNGeometry's ``Hessian``: ``function(outputs, targets)`` is the loss (the engine's
    ``loss=``), summed over the loader's batches; ``representation`` a ``PMat*`` class or
    its name (dense, block-diagonal, diagonal or implicit). ``verbose`` is accepted and
    ignored (the Hessian shows no progress bar)."""
    name = representation if isinstance(representation, str) else representation.name
    return engine_hessian.Hessian(
        model, loader, name, loss=function, layer_collection=layer_collection
    )
