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
    """A :class:`~fimntk.engine.Jacobian` over all of ``model``'s trainable layers; a
    representation built on a sub-collection differentiates only its layers
    (:meth:`~fimntk.engine.Jacobian.for_layers`), as NNGeometry passes the collection to each
    call."""
    return Jacobian(model, function=function, verbose=verbose, centering=centering)


__all__ = ["TorchHooksJacobianBackend"]
