"""``nngeometry.metrics``: the Fisher with an exact or a Monte Carlo expectation."""

from fimntk.engine import FIM, FIM_MonteCarlo

__all__ = ["FIM", "FIM_MonteCarlo"]
