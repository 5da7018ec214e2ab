"""``nngeometry.backend.torch_hooks.torch_hooks``: NNGeometry's name for the Jacobian
generator, mapped to :class:`fimntk.engine.Jacobian`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fimntk.engine import Jacobian


def TorchHooksJacobianBackend(
    model: nn.Module,
    function: Callable | None = None,
    centering: bool = False,
    verbose: bool = False,
) -> Jacobian:
    """A :class:`~fimntk.engine.Jacobian` over all of ``model``'s trainable layers (NNGeometry
    passes the layer collection to each call instead; here the representation's collection
    must be the model's). ``centering=True`` is refused: see ``docs/from-nngeometry.md``."""
    if centering:
        raise ValueError(
            "centering=True (per-example gradients minus their mean) is not offered by the "
            "generator: use EmpiricalFIM(..., centering=True) for a centered Fisher"
        )
    return Jacobian(model, function=function, verbose=verbose)


__all__ = ["TorchHooksJacobianBackend"]
