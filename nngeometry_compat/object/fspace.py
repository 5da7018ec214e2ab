"""``nngeometry.object.fspace``: ``FMatDense`` with NNGeometry's constructor."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from fimntk.engine import FMatDense as _FMatDense
from fimntk.engine import Jacobian, LayerCollection
from fimntk.engine.errors import InvalidInputError


class FMatDense(_FMatDense):
    """NNGeometry's ``FMatDense(layer_collection, generator, data=None, examples=None)``:
    ``data`` as given, else :meth:`fimntk.engine.FMatDense.from_generator`. Also accepts the
    engine's ``FMatDense(data)``."""

    def __init__(
        self,
        layer_collection: LayerCollection | Tensor | None = None,
        generator: Jacobian | None = None,
        data: Tensor | None = None,
        examples: Iterable | None = None,
        paths: dict[str, str] | None = None,
    ) -> None:
        if isinstance(layer_collection, Tensor):  # the engine's FMatDense(data)
            data, layer_collection = layer_collection, None
        if data is None:
            if generator is None or examples is None:
                raise InvalidInputError("FMatDense needs data=, or generator= and examples=")
            built = _FMatDense.from_generator(generator, examples, layer_collection)
            data, paths = built.data, built.paths
        super().__init__(data, paths=paths)


__all__ = ["FMatDense"]
