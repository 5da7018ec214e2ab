"""``nngeometry.backend``: the Jacobian generator under NNGeometry's name."""

from fimntk.nngeometry.backend import torch_hooks
from fimntk.nngeometry.backend.torch_hooks.torch_hooks import TorchHooksJacobianBackend

__all__ = ["TorchHooksJacobianBackend", "torch_hooks"]
