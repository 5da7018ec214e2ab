"""``nngeometry.backend.torch_hooks.torch_hooks``: NNGeometry's name for the Jacobian
generator, mapped to :class:`fimntk.engine.Jacobian`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from fimntk.engine import Jacobian
from fimntk.engine.layers.conv import per_example_conv_impl


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


@contextmanager
def use_unfold_impl_for_convs() -> Iterator[None]:
    """Per-example convolution gradients from unfolded inputs (the engine's
    :func:`~fimntk.engine.layers.conv.per_example_conv_impl` ``("unfold")``)."""
    with per_example_conv_impl("unfold"):
        yield


@contextmanager
def use_conv_impl_for_convs() -> Iterator[None]:
    """Per-example convolution gradients by grouped convolutions (the engine's default)."""
    with per_example_conv_impl("conv"):
        yield


__all__ = ["TorchHooksJacobianBackend", "use_conv_impl_for_convs", "use_unfold_impl_for_convs"]
