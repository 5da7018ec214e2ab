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
    call. ``centering=True`` subtracts the examples' mean gradient (see
    :class:`~fimntk.engine.Jacobian`). As in NNGeometry, ``examples=`` may be one batch: a
    tuple or list of tensors."""
    return Jacobian(
        model, function=function, verbose=verbose, centering=centering, lists_are_batches=True
    )


__all__ = ["TorchHooksJacobianBackend"]
