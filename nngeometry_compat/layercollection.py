"""``nngeometry.layercollection``."""

from fimntk.engine import LayerCollection

__all__ = ["LayerCollection"]
