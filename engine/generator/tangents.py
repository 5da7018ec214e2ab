"""Jacobian-vector products ``J v`` in forward mode, with the hooked layers' share added by hooks.

Under an active ``torch.autograd.forward_ad.dual_level``, a layer whose output is affine in its
own parameters with no offset (Linear, Conv, ConvTranspose, Embedding, the affine normalisation
layers: ``f(x; θ)`` linear in ``θ`` jointly) contributes ``∂f/∂θ · t = f(x; t)`` to the tangent of
its output: the module applied to its primal input with the tangent in place of its parameters.
The parameters themselves stay plain tensors, so forward mode never computes the zero tangent of
a network's input through the first layer (``W·0``). For a layer linear in its input
(``f(x; W, b) = L_W(x) + b``) the input's tangent is stripped before the module runs and added
back as ``L_W(t_x)``, since torch's forward-mode formula would also compute ``L_0(x)`` for the
absent weight tangent (one wasted convolution per layer); other layers (normalisations) propagate
``t_x`` through their own forward-mode formulas. Parameters of the layers without hooks are made
dual as usual (``torch.func``-style).

A module whose forward applies its parameters functionally (``nn.MultiheadAttention``, see
:data:`fimntk.engine.layers.registry.REPLAYS`) is recomputed with dual parameters: its input
tangent and its own parameters' share both propagate, and its sub-modules' hooks add theirs.

Only valid for layers the generator hooks (called once, parameters used only by their own
forward; see :meth:`fimntk.engine.generator.Jacobian.settle_paths`). Reference: forward-mode
automatic differentiation, Griewank & Walther (2008), "Evaluating Derivatives", ch. 3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.func import functional_call

from fimntk.engine.generator.hooks import count_calls
from fimntk.engine.layers.attention import Replay
from fimntk.engine.layers.registry import replay_for


def _primal(value):
    if isinstance(value, Tensor):
        return fwad.unpack_dual(value).primal
    return value


@dataclass
class TangentCapture:
    """Context manager adding ``f(x; t)`` to the output tangent of each module in ``modules``.

    Args:
        modules: ``{layer: module}`` whose parameter tangents the hooks add.
        tangents: ``{layer: {attribute: tangent}}`` (e.g. ``{"weight": tW, "bias": tb}``).
        input_linear: layers linear in their input, whose input tangent the hooks carry.
        input_maps: ``{layer: map}`` for layers affine in their input (BatchNorm in eval mode):
            the hooks carry the input tangent as ``map(t_x)``.
        counted: ``{layer: module}`` whose calls are only counted (to detect reuse).
        output_tangents: ``{layer: fn}`` for layers that compute their output's whole tangent
            at once, ``fn(x, t_x or None, {attribute: tangent})`` (BatchNorm in eval mode;
            their input tangent is stripped as for ``input_maps``).
    """

    modules: dict[str, nn.Module]
    tangents: dict[str, dict[str, Tensor]]
    input_linear: set[str] = field(default_factory=set)
    input_maps: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)
    counted: dict[str, nn.Module] = field(default_factory=dict)
    output_tangents: dict[str, Callable[[Tensor, Tensor | None, dict[str, Tensor]], Tensor]] = (
        field(default_factory=dict)
    )
    calls: dict[str, int] = field(default_factory=dict)
    _inside: bool = False
    _input_tangents: dict[str, Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> TangentCapture:
        for name, module in self.modules.items():
            if name in self.input_linear or name in self.input_maps:
                self._handles.append(
                    module.register_forward_pre_hook(self._strip(name), with_kwargs=True)
                )
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        self._handles += count_calls(self.counted, self.modules, self.calls)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _strip(self, name: str) -> Callable[..., Any]:
        def pre_hook(module, args, kwargs):
            if self._inside or not args or not isinstance(args[0], Tensor):
                return None
            primal, tangent = fwad.unpack_dual(args[0])
            if tangent is None:
                return None
            self._input_tangents[name] = tangent
            return (primal, *args[1:]), kwargs

        return pre_hook

    def _hook(self, name: str) -> Callable[..., Any]:
        replay = replay_for(self.modules[name])
        if replay is not None:
            return self._replay_hook(name, replay)

        def hook(module, args, kwargs, output):
            if self._inside:  # the replays below
                return None
            self.calls[name] = self.calls.get(name, 0) + 1
            t_in = self._input_tangents.pop(name, None)
            if not isinstance(output, Tensor):
                return None
            args = tuple(_primal(a) for a in args)
            kwargs = {k: _primal(v) for k, v in kwargs.items()}
            self._inside = True
            try:
                with torch.no_grad():
                    if name in self.output_tangents:  # the layer's whole tangent at once
                        own = self.output_tangents[name](args[0], t_in, self.tangents[name])
                        t_in = None
                    else:
                        own = functional_call(module, self.tangents[name], args, kwargs)
                    if t_in is not None and name in self.input_maps:
                        own = own.add_(self.input_maps[name](t_in))
                    elif t_in is not None:  # L_W(t_x): the module with a zero bias
                        bias = getattr(module, "bias", None)
                        zero = {} if bias is None else {"bias": torch.zeros_like(bias)}
                        own = own.add_(functional_call(module, zero, (t_in, *args[1:]), kwargs))
            finally:
                self._inside = False
            primal, tangent = fwad.unpack_dual(output)  # outside no_grad: the graph stays
            return fwad.make_dual(primal, own if tangent is None else own.add_(tangent))

        return hook

    def _replay_hook(self, name: str, replay: Replay) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self._inside:
                return None
            self.calls[name] = self.calls.get(name, 0) + 1
            tangents = self.tangents[name]
            params = {
                attr: fwad.make_dual(p, tangents[attr])
                for attr, p in module.named_parameters(recurse=False)
            }
            return replay(module, args, kwargs, params, lambda x, y: y)

        return hook
