"""``nngeometry.jacobian``: the Jacobian as a PushForward/PullBack map."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from fimntk.engine import Jacobian as JacobianGenerator
from fimntk.engine import LayerCollection, PFMapDense, PFMapImplicit


def Jacobian(
    model: nn.Module,
    loader: Iterable,
    function: Callable | None = None,
    representation: type[PFMapDense] | type[PFMapImplicit] = PFMapDense,
    layer_collection: LayerCollection | None = None,
) -> PFMapDense | PFMapImplicit:
    """NNGeometry's ``Jacobian(model, loader, function, representation, layer_collection)``:
    :class:`~fimntk.engine.PFMapDense` (``(c, n, d)``) or
    :class:`~fimntk.engine.PFMapImplicit` over ``loader``."""
    gen = JacobianGenerator(model, layer_collection, function=function)
    return representation(gen.layer_collection, generator=gen, examples=loader)
