"""Forward hooks that capture, for one forward pass, each fast-path module's input and output.

State lives in the :class:`ForwardCapture` object of one call, never on the modules. A module
whose output is later modified in place (``ReLU(inplace=True)`` after a Linear) would make the
captured output describe the modified tensor; :class:`ForwardCapture` notices (the tensor's
version counter moved) so the caller can rerun with ``clone`` for that module: the hook then
hands a copy downstream and keeps the original.

A module whose parameters its forward applies functionally (``nn.MultiheadAttention``: see
:data:`fimntk.engine.layers.registry.REPLAYS`) has its output replaced by a re-computation that
exposes its parameter sites; each site is one :class:`Capture`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from fimntk.engine.layers.attention import Replay
from fimntk.engine.layers.registry import replay_for


def count_calls(
    counted: dict[str, nn.Module], skip: dict[str, nn.Module], calls: dict[str, int]
) -> list[RemovableHandle]:
    """Forward hooks adding each call of a module of ``counted`` (not in ``skip``, whose own
    hooks count) to ``calls``; the handles, to remove."""

    def counter(name: str) -> Callable[..., None]:
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1

        return hook

    return [
        module.register_forward_hook(counter(name))
        for name, module in counted.items()
        if name not in skip
    ]


@dataclass
class Capture:
    """Input (detached) and output of one call of one module.

    Once the forward pass is over (:meth:`ForwardCapture.release_outputs`), only the output's
    place in the graph (its :class:`~torch.autograd.graph.GradientEdge`) is kept, not its
    values: the gradient with respect to it is what the generator needs, and a layer's output
    that no later operation saved for backward (a Linear or a convolution before a ReLU, which
    saves its own result) is then freed at once instead of living until the backward passes.
    """

    x: Any
    y: Tensor | None
    version: int
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    edge: GradientEdge | None

    @classmethod
    def of(cls, x: Any, y: Tensor) -> Capture:
        """``x``: the site's input, a tensor or an object with ``detach()`` the kernel reads."""
        edge = get_gradient_edge(y) if y.requires_grad else None
        return cls(x.detach(), y, y._version, y.shape, y.dtype, y.device, edge)

    @property
    def target(self) -> GradientEdge | Tensor:
        """What ``torch.autograd.grad`` differentiates with respect to to get ``∂/∂y``."""
        if self.edge is not None:
            return self.edge
        assert self.y is not None, "the output was released"
        return self.y

    def zeros(self, *lead: int) -> Tensor:
        """A zero output gradient, ``(*lead, *y.shape)``."""
        return torch.zeros(*lead, *self.shape, dtype=self.dtype, device=self.device)


@dataclass
class ForwardCapture:
    """Context manager recording inputs/outputs of ``modules`` and call counts of ``counted``.

    Args:
        modules: ``{layer: module}`` whose input and output are captured.
        counted: ``{layer: module}`` whose calls are only counted (to detect reuse).
        clone: layers whose output is copied before it goes downstream.
        broadcast: layers called on a tensor the examples share (a batch dimension of 1, later
            broadcast): their input and output are expanded to the batch's ``examples`` before
            they go downstream, so that each example's share of the gradient has its own row.
        examples: the batch's number of examples (for ``broadcast``).
    """

    modules: dict[str, nn.Module]
    counted: dict[str, nn.Module] = field(default_factory=dict)
    clone: set[str] = field(default_factory=set)
    broadcast: set[str] = field(default_factory=set)
    examples: int = 0
    captures: dict[str, list[Capture]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> ForwardCapture:
        for name, module in self.modules.items():
            self._handles.append(
                module.register_forward_hook(self._capture_hook(name), with_kwargs=True)
            )
        self._handles += count_calls(self.counted, self.modules, self.calls)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _capture_hook(self, name: str) -> Callable[..., Any]:
        replay = replay_for(self.modules[name])
        if replay is not None:
            return self._replay_hook(name, replay)

        def hook(module, args, kwargs, output):
            self.calls[name] = self.calls.get(name, 0) + 1
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(output, Tensor) or not isinstance(x, Tensor):
                return None
            expand = (
                name in self.broadcast
                and self.examples > 1
                and x.dim() > 0
                and output.dim() > 0
                and x.shape[0] == output.shape[0] == 1
            )
            if expand:
                x = x.expand(self.examples, *x.shape[1:])
                output = output.expand(self.examples, *output.shape[1:])
            self.captures.setdefault(name, []).append(Capture.of(x, output))
            if name in self.clone:
                return output.clone()
            return output if expand else None

        return hook

    def _replay_hook(self, name: str, replay: Replay) -> Callable[..., Any]:
        def record(x: Any, y: Tensor) -> Tensor:
            self.captures.setdefault(name, []).append(Capture.of(x, y))
            return y

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            params: dict[str, Tensor] = dict(module.named_parameters(recurse=False))
            return replay(module, args, kwargs, params, record)

        return hook

    def modified_in_place(self) -> set[str]:
        """Layers whose captured output was changed in place after the hook ran."""
        return {
            n
            for n, caps in self.captures.items()
            if any(c.y is not None and c.y._version != c.version for c in caps)
        }

    def release_outputs(self) -> None:
        """Drop the references to the captured outputs that have a gradient edge (see
        :class:`Capture`); call once the forward pass and :meth:`modified_in_place` are done."""
        for caps in self.captures.values():
            for c in caps:
                if c.edge is not None:
                    c.y = None
