"""``nngeometry.gram``: the NTK Gram matrix ``(c, n, c, n)``."""

from fimntk.engine import GramMatrix

__all__ = ["GramMatrix"]
