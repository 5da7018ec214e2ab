"""Which kernel computes per-example gradients of which module type.

A dict keyed by the exact module type: subclasses (which may override ``forward``) are not
assumed to behave like their parent; layers of libraries the engine does not import (Hugging
Face ``transformers``) by their exact qualified name (:mod:`.hf`). A miss means the
``torch.func`` fallback path.
"""

from __future__ import annotations

from torch import nn

from fimntk.engine.layers.attention import MultiheadAttentionKernel, Replay, replay_attention
from fimntk.engine.layers.base import LayerKernel
from fimntk.engine.layers.conv import (
    Conv1dKernel,
    ConvKernel,
    ConvTranspose1dKernel,
    ConvTransposeKernel,
)
from fimntk.engine.layers.embedding import EmbeddingKernel
from fimntk.engine.layers.hf import KERNELS_BY_NAME, RMSNormKernel
from fimntk.engine.layers.linear import LinearKernel
from fimntk.engine.layers.norm import BatchNormKernel, GroupNormKernel, LayerNormKernel

KERNELS: dict[type[nn.Module], type[LayerKernel]] = {
    nn.Linear: LinearKernel,
    nn.modules.linear.NonDynamicallyQuantizableLinear: LinearKernel,  # attention's out_proj
    nn.MultiheadAttention: MultiheadAttentionKernel,
    nn.Conv1d: Conv1dKernel,
    nn.Conv2d: ConvKernel,
    nn.ConvTranspose1d: ConvTranspose1dKernel,
    nn.ConvTranspose2d: ConvTransposeKernel,
    nn.Embedding: EmbeddingKernel,
    nn.BatchNorm1d: BatchNormKernel,
    nn.BatchNorm2d: BatchNormKernel,
    nn.BatchNorm3d: BatchNormKernel,
    nn.GroupNorm: GroupNormKernel,
    nn.LayerNorm: LayerNormKernel,
    nn.RMSNorm: RMSNormKernel,
}

#: Module types whose output the hooked passes recompute with exposed parameter sites:
#: ``replay(module, args, kwargs, params, record)`` returns what ``module(*args, **kwargs)``
#: returns, built from ``params`` (``{attribute: tensor}``), handing each site's input and
#: output to ``record(x, y) -> y``. Their sub-modules are called as modules inside.
REPLAYS: dict[type[nn.Module], Replay] = {nn.MultiheadAttention: replay_attention}


def replay_for(module: nn.Module) -> Replay | None:
    """The re-computation of ``module``'s forward (see :data:`REPLAYS`), or ``None``."""
    return REPLAYS.get(type(module))


def kernel_for(module: nn.Module) -> LayerKernel | None:
    """The hook kernel for ``module``, or ``None`` when it needs the ``torch.func`` fallback.

    The fast path also requires every parameter of the module to require a gradient.
    """
    kind = type(module)
    cls = KERNELS.get(kind) or KERNELS_BY_NAME.get((kind.__module__, kind.__qualname__))
    if cls is None or not cls.supports(module):
        return None
    own = [p for _, p in module.named_parameters(recurse=False)]
    if not own or not all(p.requires_grad for p in own):
        return None
    kernel = cls(module)
    if len(kernel.parameters()) != len(own):
        return None
    return kernel
