"""Per-layer maths: parameter specs and per-example gradient kernels."""

from fimntk.engine.layers.base import LayerKernel
from fimntk.engine.layers.registry import KERNELS, kernel_for

__all__ = ["KERNELS", "LayerKernel", "kernel_for"]
