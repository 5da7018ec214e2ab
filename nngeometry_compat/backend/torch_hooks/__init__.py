"""``nngeometry.backend.torch_hooks``."""

from fimntk.nngeometry.backend.torch_hooks.torch_hooks import (
    TorchHooksJacobianBackend,
    use_conv_impl_for_convs,
    use_unfold_impl_for_convs,
)

__all__ = ["TorchHooksJacobianBackend", "use_conv_impl_for_convs", "use_unfold_impl_for_convs"]
