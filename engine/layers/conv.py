"""Kernels of ``nn.Conv1d/2d`` and ``nn.ConvTranspose1d/2d``: outer products over output pixels
(Grosse & Martens 2016, KFC), read off unfolded inputs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import grad as nn_grad

from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.layers.outer_product import OuterKernel


def _conv_input(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Apply the module's own padding to ``x`` when unfold cannot; return the padding left."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, list(module._reversed_padding_repeated_twice), mode=mode)
        return x, (0,) * (x.dim() - 2)
    return x, tuple(module.padding)


def _as_2d(t: Tensor, spatial_dims: int) -> Tensor:
    """View a 1-D spatial tensor ``(..., C, L)`` as ``(..., C, 1, L)``."""
    return t.unsqueeze(-2) if spatial_dims == 1 else t


def _pair(v: tuple[int, ...], spatial_dims: int, fill: int) -> tuple[int, int]:
    return (fill, v[0]) if spatial_dims == 1 else (v[0], v[1])


#: How :class:`ConvKernel` computes per-example weight gradients (see
#: :func:`per_example_conv_impl`).
PER_EXAMPLE_CONV_IMPLS = ("conv", "unfold")
_per_example_impl: ContextVar[str] = ContextVar("per_example_conv_impl", default="conv")


@contextmanager
def per_example_conv_impl(impl: str) -> Iterator[None]:
    """Within the block, per-example gradients of ``Conv1d``/``Conv2d`` layers come from
    ``impl``: ``"conv"`` (the default: one grouped weight-gradient convolution per
    pseudo-output, no unfolded input) or ``"unfold"`` (the outer products of the unfolded
    inputs and the output gradients, ``Σ_t g_t a_tᵀ``, as KFAC reads them). Both give the
    same gradients; they differ in speed and memory (``unfold`` builds the ``(n, C_in·kk, T)``
    unfolded input)."""
    if impl not in PER_EXAMPLE_CONV_IMPLS:
        raise ValueError(f"impl must be one of {list(PER_EXAMPLE_CONV_IMPLS)}, got {impl!r}")
    token = _per_example_impl.set(impl)
    try:
        yield
    finally:
        _per_example_impl.reset(token)


class ConvKernel(OuterKernel):
    """``nn.Conv1d`` / ``nn.Conv2d`` with any stride, padding, dilation, groups, padding mode."""

    module: nn.Conv1d | nn.Conv2d

    spatial_dims = 2

    def _layout(self) -> MatLayout:
        m = self.module
        kk = 1
        for k in m.kernel_size:
            kk *= k
        return MatLayout(
            m.groups, m.out_channels // m.groups, m.in_channels // m.groups * kk, self.has_bias
        )

    def _unfold_args(self, padding: tuple[int, ...]) -> dict:
        m, sd = self.module, self.spatial_dims
        return {
            "kernel_size": _pair(m.kernel_size, sd, 1),
            "dilation": _pair(m.dilation, sd, 1),
            "padding": _pair(padding, sd, 0),
            "stride": _pair(m.stride, sd, 1),
        }

    def positions(self, x: Tensor) -> int:
        """T, the output positions, from the input's shape alone (no unfolded input):
        ``Π ⌊(L + pad − d(k − 1) − 1)/s⌋ + 1`` over the spatial dimensions."""
        m = self.module
        sizes = x.shape[2:]
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            pads = m._reversed_padding_repeated_twice  # last dimension first
            total = [pads[2 * i] + pads[2 * i + 1] for i in range(len(sizes))][::-1]
        else:
            total = [2 * p for p in m.padding]
        t = 1
        for size, pad, k, d, s in zip(sizes, total, m.kernel_size, m.dilation, m.stride):
            t *= (size + pad - d * (k - 1) - 1) // s + 1
        return t

    def inputs(self, x: Tensor) -> Tensor:
        m, sd = self.module, self.spatial_dims
        n, grp = x.shape[0], m.groups
        x, padding = _conv_input(m, x)
        cols = F.unfold(_as_2d(x, sd), **self._unfold_args(padding))  # (n, C_in·kk, T)
        return cols.reshape(n, grp, -1, cols.shape[-1]).transpose(2, 3)

    def output_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        m = self.module
        grp = m.groups
        return gy.reshape(gy.shape[0], x.shape[0], grp, m.out_channels // grp, -1).transpose(3, 4)

    def per_example_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        """Per-example gradients as one grouped weight-gradient convolution per pseudo-output:
        the n examples become n·G groups, so no ``(n, C_in·kk, T)`` unfolded input is built
        (the per-example trick of Rochette, Manoel & Tramel 2019, "Efficient per-example
        gradient computations in convolutional neural networks"); inside
        :func:`per_example_conv_impl` ``("unfold")``, the outer products of unfolded inputs."""
        if _per_example_impl.get() == "unfold":
            return super().per_example_grads(x, gy)
        m, sd = self.module, self.spatial_dims
        k, n = gy.shape[0], x.shape[0]
        x, padding = _conv_input(m, x)
        weight_grad = nn_grad.conv1d_weight if sd == 1 else nn_grad.conv2d_weight
        xi = x.reshape(1, n * m.in_channels, *x.shape[2:])
        size = (n * m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        gw = torch.stack(
            [
                weight_grad(
                    xi,
                    size,
                    gy[i].reshape(1, n * m.out_channels, *gy.shape[3:]),
                    stride=m.stride,
                    padding=padding,
                    dilation=m.dilation,
                    groups=n * m.groups,
                ).reshape(n, -1)
                for i in range(k)
            ]
        )
        if self.has_bias:
            return torch.cat([gw, gy.reshape(k, n, m.out_channels, -1).sum(dim=3)], dim=2)
        return gw

    def grad_sum(self, x: Tensor, gy: Tensor) -> Tensor:
        """The ordinary weight gradient of the summed pseudo-outputs (one convolution)."""
        m, sd = self.module, self.spatial_dims
        x, padding = _conv_input(m, x)
        weight_grad = nn_grad.conv1d_weight if sd == 1 else nn_grad.conv2d_weight
        g = gy.sum(dim=0)
        gw = weight_grad(
            x,
            m.weight.shape,
            g,
            stride=m.stride,
            padding=padding,
            dilation=m.dilation,
            groups=m.groups,
        ).reshape(-1)
        if self.has_bias:
            return torch.cat([gw, g.reshape(g.shape[0], m.out_channels, -1).sum(dim=(0, 2))])
        return gw

    def sq_output_sum(self, x: Tensor, gy: Tensor) -> Tensor | None:
        if gy[0, 0, 0].numel() != 1:  # no unfolded input for the output side's check
            return None
        return super().sq_output_sum(x, gy)


class Conv1dKernel(ConvKernel):
    spatial_dims = 1


class ConvTransposeKernel(OuterKernel):
    """``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d``: the output gradient is unfolded.

    With ``y[o, p·s + κ·d − π] += x[i, p] W[i, o, κ]``, the weight gradient is
    ``∂W[i, o, κ] = Σ_p x[i, p] · unfold(gy)[o·|κ| + κ, p]``: ``a`` is the input, ``g`` the
    unfolded output gradient, and the weight is the transpose of the outer product.
    """

    module: nn.ConvTranspose1d | nn.ConvTranspose2d

    spatial_dims = 2
    bias_folds = False

    def _layout(self) -> MatLayout:
        m = self.module
        kk = 1
        for k in m.kernel_size:
            kk *= k
        return MatLayout(
            m.groups,
            m.out_channels // m.groups * kk,
            m.in_channels // m.groups,
            False,
            transposed=True,
        )

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        assert isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d)
        return module.padding_mode == "zeros" and all(
            op < s for op, s in zip(module.output_padding, module.stride)
        )

    def inputs(self, x: Tensor) -> Tensor:
        m = self.module
        return x.reshape(x.shape[0], m.groups, m.in_channels // m.groups, -1).transpose(2, 3)

    def output_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        m, sd = self.module, self.spatial_dims
        n, grp, k = x.shape[0], m.groups, gy.shape[0]
        positions = x[0, 0].numel()
        cols = F.unfold(
            _as_2d(gy.reshape(k * n, *gy.shape[2:]), sd),
            kernel_size=_pair(m.kernel_size, sd, 1),
            dilation=_pair(m.dilation, sd, 1),
            padding=_pair(m.padding, sd, 0),  # type: ignore[arg-type]  # transposed: never a str
            stride=_pair(m.stride, sd, 1),
        )
        if cols.shape[-1] != positions:
            raise ValueError(
                f"ConvTranspose output of shape {tuple(gy.shape[2:])} was not produced by its "
                "output_padding; pass output_padding to the module instead of output_size"
            )
        return cols.reshape(k, n, grp, -1, cols.shape[-1]).transpose(3, 4)

    def weight_from_outer(self, gw: Tensor) -> Tensor:
        return gw.transpose(-1, -2).reshape(*gw.shape[:-3], -1)

    def outer_view(self, flat_w: Tensor, groups: int, q: int, p: int) -> Tensor:
        return flat_w.view(groups, p, q).transpose(-1, -2)

    def bias_grad(self, gy: Tensor, g: Tensor) -> Tensor:
        return gy.reshape(*gy.shape[:3], -1).sum(dim=3)


class ConvTranspose1dKernel(ConvTransposeKernel):
    spatial_dims = 1
