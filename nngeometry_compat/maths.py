"""``nngeometry.maths``."""

from fimntk.engine.linalg import kronecker

__all__ = ["kronecker"]
