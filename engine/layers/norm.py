"""Kernels of the normalisation layers: ``y = x̂ ⊙ γ + β``.

Per example, ``∂γ = Σ_pos gy ⊙ x̂`` and ``∂β = Σ_pos gy``, summed over every dimension that the
parameter is broadcast along. ``x̂`` depends only on the example itself for GroupNorm, LayerNorm
and BatchNorm in eval mode (running statistics). BatchNorm in train mode normalises with batch
statistics, which couple the examples: per-example gradients are not defined there.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimntk.engine.errors import TrainModeBatchNormError
from fimntk.engine.layers.base import LayerKernel
from fimntk.engine.layers.layout import MatLayout


class AffineNormKernel(LayerKernel):
    """Shared maths; subclasses give ``x̂`` and the parameter's dimensions in ``x``."""

    _normalized_of: tuple[weakref.ref[Tensor], Tensor] | None = None

    def normalized(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def param_dims(self, x: Tensor) -> tuple[int, ...]:
        """Dimensions of ``x`` (batch excluded, counted from 1) that the parameter spans."""
        return (1,)

    def mat_layout(self) -> MatLayout:
        """``(1, C, 2)``: each channel's scale and shift side by side."""
        params = self.parameters()
        return MatLayout(1, params[0][1].numel(), 1, len(params) == 2)

    def _reduce(self, t: Tensor, x: Tensor) -> Tensor:
        """Sum ``(K, n, *x.shape[1:])`` over the broadcast dimensions: ``(K, n, numel)``."""
        keep = {d + 1 for d in self.param_dims(x)}
        dims = tuple(d for d in range(2, t.dim()) if d not in keep)
        s = t.sum(dim=dims) if dims else t
        return s.reshape(t.shape[0], t.shape[1], -1)

    def _normalized_once(self, x: Tensor) -> Tensor:
        """``x̂`` of a batch's input, computed once for all its chunks of pseudo-outputs and
        slices of examples (they share ``x`` or slice it along the examples); held only while
        that input lives. Any other view of an input is normalised on its own."""
        root = x if x._base is None else x._base
        if not (
            root.is_contiguous()
            and root.shape[1:] == x.shape[1:]
            and (x is root or x.stride() == root.stride())
        ):
            return self.normalized(x)
        held = self._normalized_of
        if held is not None and held[0]() is root:
            whole = held[1]
        else:

            def forget(_: object) -> None:
                self._normalized_of = None

            whole = self.normalized(root).contiguous()
            self._normalized_of = (weakref.ref(root, forget), whole)
        if x is root:
            return whole
        start = x.storage_offset() - root.storage_offset()
        return whole.as_strided(x.shape, x.stride(), whole.storage_offset() + start)

    def per_example_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        out = []
        for attr, _ in self.parameters():
            t = gy * self._normalized_once(x).unsqueeze(0) if attr == "weight" else gy
            out.append(self._reduce(t, x))
        return torch.cat(out, dim=2)


class BatchNormKernel(AffineNormKernel):
    """``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics."""

    module: nn.modules.batchnorm._BatchNorm

    def check(self) -> None:
        m = self.module
        if m.training or not m.track_running_stats:
            raise TrainModeBatchNormError(
                f"{type(m).__name__} normalises with batch statistics (train mode or "
                "track_running_stats=False), which couple the examples of a batch, so "
                "per-example Jacobians are not defined: call model.eval() first"
            )

    def _inverse_std(self) -> Tensor:
        """``1/√(σ²_run + ε)`` per channel."""
        var = self.module.running_var
        assert var is not None, "checked: eval mode with running statistics"
        return torch.rsqrt(var + self.module.eps)

    def _input_scale(self) -> Tensor:
        """``γ/√(σ²_run + ε)`` per channel (``γ = 1`` without affine weight)."""
        weight = self.module.weight
        inv = self._inverse_std()
        return inv if weight is None else inv * weight.detach()

    def input_tangent(self, t: Tensor) -> Tensor:
        """The tangent of the output for an input tangent ``t``: with running statistics the
        layer is affine in its input, ``∂y = t ⊙ γ / √(σ² + ε)`` (forward mode then needs no
        formula of torch's, whose eval-mode batch-norm rule imports torch's compiler, seconds
        on its first use)."""
        return t * self._input_scale().reshape((1, -1) + (1,) * (t.dim() - 2))

    def output_tangent(self, x: Tensor, t_x: Tensor | None, tangents: dict[str, Tensor]) -> Tensor:
        """The whole tangent of the output, for an input tangent ``t_x`` (or none) and the
        parameters' tangents ``t_γ``, ``t_β``: with ``σ = √(σ²_run + ε)``, per channel,
        ``∂y = t_x ⊙ γ/σ + x ⊙ t_γ/σ + (t_β − μ_run t_γ/σ)``, in two fused passes over the
        activations (instead of a batch norm with the tangents as parameters, a product and a
        sum)."""
        m = self.module
        assert m.running_mean is not None, "checked in check()"
        shape = (1, -1) + (1,) * (x.dim() - 2)
        inv = self._inverse_std()
        t_w, t_b = tangents.get("weight"), tangents.get("bias")
        slope = inv * t_w if t_w is not None else torch.zeros_like(inv)
        offset = -m.running_mean * slope
        if t_b is not None:
            offset = offset + t_b
        out = torch.addcmul(offset.reshape(shape), x, slope.reshape(shape))
        if t_x is not None:
            out.addcmul_(t_x, self._input_scale().reshape(shape))
        return out

    def normalized(self, x: Tensor) -> Tensor:
        m = self.module
        assert m.running_mean is not None and m.running_var is not None, "checked in check()"
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = m.running_mean.reshape(shape)
        std = torch.sqrt(m.running_var.reshape(shape) + m.eps)
        return (x - mean) / std


class GroupNormKernel(AffineNormKernel):
    """``nn.GroupNorm``: statistics per example and group."""

    module: nn.GroupNorm

    def normalized(self, x: Tensor) -> Tensor:
        m = self.module
        return F.group_norm(x, m.num_groups, eps=m.eps)


class LayerNormKernel(AffineNormKernel):
    """``nn.LayerNorm`` over the trailing ``normalized_shape`` dimensions."""

    module: nn.LayerNorm

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return bool(getattr(module, "elementwise_affine", False))

    def normalized(self, x: Tensor) -> Tensor:
        m = self.module
        return F.layer_norm(x, m.normalized_shape, eps=m.eps)

    def param_dims(self, x: Tensor) -> tuple[int, ...]:
        k = len(self.module.normalized_shape)
        return tuple(range(x.dim() - k, x.dim()))
