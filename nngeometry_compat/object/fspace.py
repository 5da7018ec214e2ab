"""``nngeometry.object.fspace``: ``FMatDense`` with NNGeometry's constructor."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from fimntk.engine import FMatDense as _EngineFMatDense
from fimntk.engine import InvalidInputError
from fimntk.engine.layercollection import LayerCollection


class FMatDense(_EngineFMatDense):
    """NNGeometry's ``FMatDense(layer_collection, generator, data=None, examples=None)``: the
    ``(c, n, c, n)`` Gram of the generator's Jacobian on ``layer_collection``'s layers (the
    engine's :func:`~fimntk.engine.GramMatrix` computes the same)."""

    def __init__(
        self,
        layer_collection: LayerCollection,
        generator: Any = None,
        data: Tensor | None = None,
        examples: Iterable | None = None,
    ) -> None:
        paths: dict[str, str] = {}
        if data is None:
            if generator is None or examples is None:
                raise InvalidInputError("FMatDense needs data=, or generator= and examples=")
            generator = generator.for_layers(layer_collection)
            data = generator.get_gram_matrix(examples)
            paths = generator.paths
        super().__init__(data, paths)
        self.layer_collection = layer_collection
        self.generator = generator


__all__ = ["FMatDense"]
