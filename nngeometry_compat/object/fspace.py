"""``nngeometry.object.fspace``."""

from fimntk.engine import FMatDense

__all__ = ["FMatDense"]
