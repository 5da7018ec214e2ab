"""``nngeometry.backend.torch_hooks``."""

from fimntk.nngeometry.backend.torch_hooks.torch_hooks import TorchHooksJacobianBackend

__all__ = ["TorchHooksJacobianBackend"]
