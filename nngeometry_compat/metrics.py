"""``nngeometry.metrics``: the Fisher with an exact or a Monte Carlo expectation."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from fimntk.engine import FIM, PMatAbstract
from fimntk.engine import FIM_MonteCarlo as engine_fim_monte_carlo
from fimntk.engine.errors import InvalidInputError

__all__ = ["FIM", "FIM_MonteCarlo"]


def FIM_MonteCarlo(
    model: nn.Module,
    loader: Iterable,
    representation: str | type[PMatAbstract],
    variant: str = "classif_logits",
    trials: int = 1,
    *args: Any,
    covariance: float | Tensor | None = None,
    **kwargs: Any,
) -> PMatAbstract:
    """NNGeometry's ``FIM_MonteCarlo``; ``covariance=σ²`` (regression) is the engine's
    ``sigma=σ``.

    The Fisher of a Gaussian ``N(f, σ² I)`` is ``Jᵀ J / σ²`` and the engine computes that.
    NNGeometry draws ``ε ~ N(0, σ² I)`` and differentiates ``ε · f``, which gives ``σ² Jᵀ J``
    (wrong by ``σ⁴``; ``docs/from-nngeometry.md``)."""
    if covariance is not None:
        if variant != "regression":
            raise InvalidInputError("covariance= applies to variant='regression' only")
        if isinstance(covariance, Tensor) and covariance.numel() != 1:
            raise InvalidInputError("covariance must be one variance σ² (a scalar)")
        value = float(covariance.detach() if isinstance(covariance, Tensor) else covariance)
        if not (math.isfinite(value) and value > 0):
            raise InvalidInputError(f"covariance must be a positive variance, got {value}")
        kwargs["sigma"] = math.sqrt(value)
    return engine_fim_monte_carlo(model, loader, representation, variant, trials, *args, **kwargs)
