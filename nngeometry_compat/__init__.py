"""NNGeometry's module paths over the fimntk engine: change ``nngeometry`` to
``fimntk.nngeometry`` in a script's imports and it runs on fimntk.

Only names and argument adapters live here; every computation is :mod:`fimntk.engine`'s.
The remaining differences (conventions, NNGeometry internals not copied) are listed in
``docs/from-nngeometry.md``.
"""

from fimntk.nngeometry.gram import GramMatrix
from fimntk.nngeometry.hessian import Hessian
from fimntk.nngeometry.jacobian import Jacobian
from fimntk.nngeometry.metrics import FIM, FIM_MonteCarlo

__all__ = ["FIM", "FIM_MonteCarlo", "GramMatrix", "Hessian", "Jacobian"]
