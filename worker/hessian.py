"""What a ``hessian`` job differentiates: the allowlisted losses by name (a user never sends a
callable), and a loader that reports progress and stops a canceled job between batches.

Both losses are summed over examples, as NNGeometry's ``Hessian`` is (see
:mod:`fimntk.engine.hessian` for the scale and when the Hessian equals the Fisher):

.. math::

    \\ell_{\\mathrm{CE}} = -\\sum_i \\log \\mathrm{softmax}(f(x_i))_{y_i}, \\qquad
    \\ell_{\\mathrm{MSE}} = \\tfrac12 \\sum_i \\lVert f(x_i) - y_i \\rVert^2 .
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fimntk.worker.errors import JobInputError


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """``F.cross_entropy(out, y, reduction="sum")`` for logits ``(b, c)`` and classes ``(b,)``."""
    if y.is_floating_point() or y.dtype == torch.bool:
        raise JobInputError(
            f"loss 'cross_entropy' needs integer class targets, got {y.dtype}: "
            "upload targets as int64 class indices, or use loss 'mse'",
            "loss",
        )
    return F.cross_entropy(out, y.reshape(-1), reduction="sum")


def mse(out: Tensor, y: Tensor) -> Tensor:
    """``½ Σ ‖out − y‖²`` for outputs and targets of one shape ``(b, c)``."""
    if y.numel() != out.numel():
        raise JobInputError(
            f"loss 'mse' needs targets shaped like the outputs {list(out.shape)}, got "
            f"{list(y.shape)}",
            "loss",
        )
    return 0.5 * (out - y.reshape(out.shape).to(out.dtype)).pow(2).sum()


#: The losses a job may name (``fimntk.contract.vocabulary.HESSIAN_LOSSES``).
HESSIAN_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": cross_entropy,
    "mse": mse,
}


class ProgressLoader:
    """Iterates ``loader``, calling ``progress(done, total, "computing")`` after each batch (done
    counts examples over all passes; ``total`` is ``passes · n``), or, given ``check`` (the
    implicit Hessian, iterated once per product by operations that report their own progress,
    possibly in a later job reusing it), only ``check()``: a canceled job stops at the next
    batch either way.
    """

    def __init__(
        self,
        loader: Any,
        n: int | None,
        progress: Callable[[int, int | None, str], None],
        passes: int = 1,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.loader = loader
        self.dataset = getattr(loader, "dataset", None)
        self.total = None if n is None else n * passes
        self.progress = progress
        self.check = check
        self.done = 0

    def _tick(self) -> None:
        if self.check is not None:
            self.check()
        else:
            self.progress(self.done, self.total, "computing")

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self._tick()
            yield batch
            first = batch[0] if isinstance(batch, tuple | list) else batch
            self.done += len(first) if isinstance(first, Tensor) else 1
        self._tick()
