"""Per-layer maths: parameter specs and per-example gradient kernels."""

from .base import LayerKernel
from .registry import KERNELS, kernel_for

__all__ = ["KERNELS", "LayerKernel", "kernel_for"]
