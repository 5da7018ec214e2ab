"""The Hessian of a loss with respect to the parameters, in the Fisher's representations.

.. math::

    H = \\nabla^2_\\theta \\sum_b \\ell\\big(f_\\theta(x_b), y_b\\big)

summed over the loader's batches ``b`` and not divided by n: the loss's own reduction sets the
scale (``reduction="sum"`` gives NNGeometry's ``Hessian``). Where the model is linear in its
parameters, ``H`` equals the generalised Gauss-Newton matrix, so with ``reduction="sum"`` a
cross-entropy Hessian is ``n ·`` the ``classif_logits`` Fisher and ``½‖f − y‖²`` gives ``n ·``
the ``regression`` Fisher (Martens 2020, "New insights and perspectives on the natural
gradient method", section 9).

Computed by ``torch.func``: ``hessian`` of the loss over the flat parameters (dense, ``d²``
per batch), over each layer's parameters (block-diagonal and diagonal, ``Σ_l d_l²``), or
Hessian-vector products by forward-over-reverse (implicit: one ``jvp`` of ``grad`` per batch).

Example::

    def loss(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    H = Hessian(model, loader, "dense", loss=loss)
    H.vTMv(v)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jvp

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
from fimntk.engine.generator.jacobian import Jacobian
from fimntk.engine.generator.swap import call_swapped
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.pspace.base import PMatAbstract
from fimntk.engine.pspace.blockdiag import PMatBlockDiag
from fimntk.engine.pspace.dense import PMatDense
from fimntk.engine.pspace.diag import PMatDiag
from fimntk.engine.vector import PVector

Loss = Callable[..., Tensor]


class LossHessian:
    """Second derivatives of ``loss(function(*batch), *batch[1:])`` summed over batches.

    Args:
        model: the network (BatchNorm and Dropout in eval mode, checked before each batch).
        loss: ``loss(outputs, *rest_of_batch) -> scalar``.
        layer_collection: the layers to differentiate (default: all trainable ones).
        function: ``function(*batch) -> outputs``; default ``model(batch[0])``.
        device: where batches go (default: the device of the parameters).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Loss,
        layer_collection: LayerCollection | None = None,
        function: Callable | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if not callable(loss):
            raise InvalidInputError(
                f"loss must be a callable loss(outputs, *rest_of_batch) -> scalar, got "
                f"{type(loss).__name__}"
            )
        self.model = model
        self.loss = loss
        self.generator = Jacobian(model, layer_collection, function=function, device=device)
        self.layer_collection = self.generator.layer_collection

    def _loss_of(self, names: Sequence[str], batch: tuple) -> Callable[[Tensor], Tensor]:
        """The batch's loss as a function of the flat vector of parameters ``names``."""
        named = dict(self.model.named_parameters(remove_duplicate=False))
        shapes = [named[n].shape for n in names]
        sizes = [s.numel() for s in shapes]

        def f(flat: Tensor) -> Tensor:
            parts = flat.split(sizes)
            params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
            out = call_swapped(self.model, params, self.generator.function, batch)
            value = self.loss(out, *batch[1:])
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise InvalidInputError(
                    "loss must return a scalar tensor (reduce it with reduction='sum' or "
                    "'mean'); got "
                    + (f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else "no tensor")
                )
            return value.reshape(())

        return f

    def _flat(self, names: Sequence[str]) -> Tensor:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        return torch.cat([named[n].detach().reshape(-1) for n in names])

    def _batches(self, examples: Iterable) -> Iterable[tuple]:
        seen = False
        for raw in examples:
            seen = True
            yield self.generator.prepare(raw)
        if not seen:
            raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")

    def _hessian_of(self, names: Sequence[str], examples: Iterable) -> Tensor:
        theta = self._flat(names)
        total = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype, device=theta.device)
        for batch in self._batches(examples):
            total += hessian(self._loss_of(names, batch))(theta)
        return _finite(total, "Hessian")

    def dense(self, examples: Iterable) -> Tensor:
        """``H``: ``(d, d)``."""
        return self._hessian_of(self.layer_collection.param_names(), examples)

    def layer_blocks(self, examples: Iterable) -> dict[str, Tensor]:
        """``{layer: H_ll}``, the ``(d_l, d_l)`` diagonal blocks (one pass per layer)."""
        return {e.name: self._hessian_of(e.param_names(), examples) for e in self.layer_collection}

    def hvp(self, v: Tensor, examples: Iterable) -> Tensor:
        """``H v``: ``(d,)`` for ``v`` of shape ``(d,)``."""
        names = self.layer_collection.param_names()
        theta = self._flat(names)
        total = torch.zeros_like(theta)
        for batch in self._batches(examples):
            total += jvp(grad(self._loss_of(names, batch)), (theta,), (v.to(theta.dtype),))[1]
        return _finite(total, "Hessian-vector product")


def _finite(t: Tensor, what: str) -> Tensor:
    if not torch.isfinite(t).all():
        raise InvalidInputError(
            f"the {what} is non-finite (NaN or inf): check the loss and the model's outputs"
        )
    return t


class PMatHessianImplicit(PMatAbstract):
    """The loss Hessian as an operator: ``mv`` and ``vTMv`` by Hessian-vector products, one
    forward-over-reverse pass per batch; nothing stored but a scale factor."""

    name = "hessian-implicit"

    def __init__(self, hessian_: LossHessian, examples: Iterable) -> None:
        self.hessian = hessian_
        self.examples = examples
        super().__init__(hessian_.layer_collection, data={"scale": torch.ones(())})

    def _new(self, data: Any) -> PMatHessianImplicit:
        out = PMatHessianImplicit.__new__(PMatHessianImplicit)
        out.__dict__.update(self.__dict__)
        out.data = data
        return out

    def mv(self, v: PVector) -> PVector:
        self._check_vector(v)
        hv = self.hessian.hvp(v.get_flat_representation(), self.examples)
        return PVector(self.layer_collection, hv * float(self.data["scale"]))

    def vTMv(self, v: PVector) -> Tensor:
        return torch.dot(v.get_flat_representation(), self.mv(v).get_flat_representation())

    def _unsupported(self, op: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"{op} of an implicit Hessian would need d Hessian-vector products: use "
            "representation='dense', 'blockdiag' or 'diag'"
        )

    def trace(self) -> Tensor:
        raise self._unsupported("trace")

    def _frobenius_norm(self) -> Tensor:
        raise self._unsupported("the norm")

    def get_diag(self) -> Tensor:
        raise self._unsupported("the diagonal")

    def to_torch(self) -> Tensor:
        raise self._unsupported("the dense matrix")

    def solve(self, v: PVector, regul: float = 1e-8) -> PVector:
        raise UnsupportedOperationError(
            "solve needs a positive definite matrix and a Hessian need not be one: use "
            "representation='dense' and torch.linalg.solve, or the Fisher (PMatImplicit)"
        )


HESSIAN_REPRESENTATIONS = ("dense", "blockdiag", "diag", "implicit")


def Hessian(
    model: nn.Module,
    loader: Iterable,
    representation: str = "dense",
    loss: Loss | None = None,
    layer_collection: LayerCollection | None = None,
    function: Callable | None = None,
    device: str | torch.device | None = None,
) -> PMatAbstract:
    """The loss Hessian ``H = ∇²_θ Σ_b loss(function(*batch_b), *batch_b[1:])`` (see the
    module's docstring for its scale and when it equals the Fisher).

    Args:
        model: the network, in eval mode if it has BatchNorm or Dropout.
        loader: iterable of batches; each is ``(inputs, targets, ...)``.
        representation: ``"dense"`` (``(d, d)``), ``"blockdiag"`` (``{layer: (d_l, d_l)}``),
            ``"diag"`` (``(d,)``, from the blocks) or ``"implicit"`` (``mv``/``vTMv`` only).
        loss: ``loss(outputs, *rest_of_batch) -> scalar``, e.g. ``lambda out, y:
            F.cross_entropy(out, y, reduction="sum")``.
        layer_collection: the layers to differentiate (default: all trainable ones).
        function: ``function(*batch) -> outputs``; default ``model(batch[0])``.
        device: where batches go (default: the parameters' device).

    Returns:
        a :class:`PMatDense`, :class:`PMatBlockDiag`, :class:`PMatDiag` or
        :class:`PMatHessianImplicit`.
    """
    if loss is None:
        raise InvalidInputError(
            "Hessian needs loss=: a function loss(outputs, *rest_of_batch) -> scalar, e.g. "
            "lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction='sum')"
        )
    rep = representation.lower().removeprefix("pmat") if isinstance(representation, str) else ""
    if rep not in HESSIAN_REPRESENTATIONS:
        raise InvalidInputError(
            f"unknown Hessian representation {representation!r}; use one of "
            f"{list(HESSIAN_REPRESENTATIONS)}"
        )
    h = LossHessian(model, loss, layer_collection, function=function, device=device)
    lc = h.layer_collection
    if rep == "dense":
        return PMatDense(lc, data=h.dense(loader))
    if rep == "implicit":
        return PMatHessianImplicit(h, loader)
    blocks = h.layer_blocks(loader)
    if rep == "blockdiag":
        return PMatBlockDiag(lc, data=blocks)
    return PMatDiag(lc, data=torch.cat([torch.diagonal(blocks[e.name]) for e in lc]))
