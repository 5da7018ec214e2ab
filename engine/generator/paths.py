"""Which path each layer takes: the hooks (a kernel of :mod:`fimntk.engine.layers`) or the
``torch.func`` fallback. A layer whose parameters are shared, only partly its own, or of a type
without a kernel takes the fallback; train-mode BatchNorm and Dropout are refused.
"""

from __future__ import annotations

from torch import nn

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.layers import LayerKernel, kernel_for
from fimntk.engine.layers.norm import BatchNormKernel

HOOKS = "hooks"
FALLBACK = "torch.func"


class PathChoice:
    """The first choice of each layer's path, before any batch is seen (mixed into ``Jacobian``)."""

    model: nn.Module
    layer_collection: LayerCollection
    _kernels: dict[str, LayerKernel]
    _modules: dict[str, nn.Module]

    def check_modes(self) -> None:
        """Refuse train-mode BatchNorm and Dropout (``p > 0``): their outputs depend on the batch
        or on random draws, so the Fisher or NTK would not be the model's. Run when the
        generator is built and again before each batch, since ``model.train()`` may be called
        in between."""
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                BatchNormKernel(module).check()
            if (
                isinstance(module, nn.modules.dropout._DropoutNd)
                and module.training
                and module.p > 0
            ):
                raise InvalidInputError(
                    f"{type(module).__name__} is in train mode, so the outputs are random and "
                    "the Fisher or NTK would be a random matrix: call model.eval() first"
                )

    def _select_kernels(self) -> dict[str, LayerKernel]:
        self.check_modes()
        owners: dict[int, int] = {}
        for _, module in self.model.named_modules(remove_duplicate=False):
            for _, p in module.named_parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        kernels = {}
        for e in self.layer_collection:
            module = self._modules[e.name]
            own = [p for _, p in module.named_parameters(recurse=False)]
            if any(owners[id(p)] > 1 for p in own) or len(own) != len(e.params):
                continue
            kernel = kernel_for(module)
            if kernel is not None:
                kernel.check()
                kernels[e.name] = kernel
        return kernels

    @property
    def paths(self) -> dict[str, str]:
        """``{layer: "hooks" | "torch.func"}``; final once the first batch has been seen."""
        return {
            e.name: HOOKS if e.name in self._kernels else FALLBACK for e in self.layer_collection
        }
