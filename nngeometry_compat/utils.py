"""``nngeometry.utils``."""

from fimntk.engine.vector import grad

__all__ = ["grad"]
