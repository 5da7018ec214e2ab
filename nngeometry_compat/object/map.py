"""``nngeometry.object.map``: PushForward / PullBack maps."""

from fimntk.engine import PFMapDense, PFMapImplicit, random_pfmap

__all__ = ["PFMapDense", "PFMapImplicit", "random_pfmap"]
