"""Models from graph specs (:mod:`fimntk.contract.graph`), run by our own interpreter.

:func:`build_graph` rebuilds the module tree (real ``torch.nn`` layers from their checked
arguments, plain containers, the containers' own tensors) under the paths the client's model
uses, so that state-dict keys, parameter order and per-layer hooks are those of the client's
model. :class:`GraphModel` then runs the nodes in order: each target was resolved once, from
the static tables below, to a module, a parameter, a function or a method name; no code is
generated, compiled, evaluated or imported from a spec.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimntk.contract.arguments import check_layer_arguments
from fimntk.contract.graph import CONTAINER, GRAPH_FUNCTIONS, GRAPH_METHODS
from fimntk.contract.vocabulary import ALLOWED_LAYERS
from fimntk.worker.errors import JobInputError

#: The callable of each allowlisted function name (a static table: never ``getattr`` on a
#: name from a spec).
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "operator.add": operator.add,
    "operator.sub": operator.sub,
    "operator.mul": operator.mul,
    "operator.truediv": operator.truediv,
    "operator.floordiv": operator.floordiv,
    "operator.matmul": operator.matmul,
    "operator.neg": operator.neg,
    "operator.getitem": operator.getitem,
    "torch.flatten": torch.flatten,
    "torch.cat": torch.cat,
    "torch.stack": torch.stack,
    "torch.add": torch.add,
    "torch.sub": torch.sub,
    "torch.mul": torch.mul,
    "torch.matmul": torch.matmul,
    "torch.bmm": torch.bmm,
    "torch.relu": torch.relu,
    "torch.sigmoid": torch.sigmoid,
    "torch.tanh": torch.tanh,
    "torch.exp": torch.exp,
    "torch.sqrt": torch.sqrt,
    "torch.rsqrt": torch.rsqrt,
    "torch.mean": torch.mean,
    "torch.sum": torch.sum,
    "torch.softmax": torch.softmax,
    "torch.transpose": torch.transpose,
    "torch.permute": torch.permute,
    "torch.reshape": torch.reshape,
    "torch.squeeze": torch.squeeze,
    "torch.unsqueeze": torch.unsqueeze,
    "torch.chunk": torch.chunk,
    "torch.split": torch.split,
    "torch.nn.functional.relu": F.relu,
    "torch.nn.functional.relu6": F.relu6,
    "torch.nn.functional.gelu": F.gelu,
    "torch.nn.functional.silu": F.silu,
    "torch.nn.functional.elu": F.elu,
    "torch.nn.functional.leaky_relu": F.leaky_relu,
    "torch.nn.functional.softplus": F.softplus,
    "torch.nn.functional.sigmoid": F.sigmoid,
    "torch.nn.functional.tanh": F.tanh,
    "torch.nn.functional.hardswish": F.hardswish,
    "torch.nn.functional.softmax": F.softmax,
    "torch.nn.functional.log_softmax": F.log_softmax,
    "torch.nn.functional.dropout": F.dropout,
    "torch.nn.functional.linear": F.linear,
    "torch.nn.functional.conv2d": F.conv2d,
    "torch.nn.functional.layer_norm": F.layer_norm,
    "torch.nn.functional.avg_pool2d": F.avg_pool2d,
    "torch.nn.functional.max_pool2d": F.max_pool2d,
    "torch.nn.functional.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "torch.nn.functional.pad": F.pad,
    "torch.nn.functional.normalize": F.normalize,
}
assert set(FUNCTIONS) == GRAPH_FUNCTIONS, "the table and the contract's allowlist differ"


class GraphError(JobInputError):
    """A graph that cannot be built or run, naming the field at fault."""


class _Container(nn.Module):
    """A module that only holds others (a custom module of the client, traced through)."""


@dataclass(frozen=True)
class _Step:
    """One node, resolved: what to call and its argument templates."""

    name: str
    op: str
    call: Any
    args: list[Any]
    kwargs: dict[str, Any]
    field: str


def build_graph(arch: Mapping[str, Any], where: str) -> nn.Module:
    """Build a graph architecture already checked by
    :func:`~fimntk.contract.graph.check_graph`, on the current default device.

    Args:
        arch: The ``model.architecture``.
        where: Its field path.

    Raises:
        GraphError: A module that cannot be built or placed, or a ``param`` node naming no
            tensor of the model.
    """
    model = GraphModel()
    for i, spec in enumerate(arch.get("modules", [])):
        at = f"{where}.modules[{i}]"
        owner, _, attr = spec["name"].rpartition(".")
        module = _module(spec, at)
        try:
            model.get_submodule(owner).add_module(attr, module)
        except (KeyError, AttributeError) as exc:
            raise GraphError(f"cannot place the module: {exc}", f"{at}.name") from None
    for i, spec in enumerate(arch.get("params", [])):
        at = f"{where}.params[{i}]"
        owner, _, attr = spec["name"].rpartition(".")
        tensor = torch.empty(spec["shape"])
        try:
            parent = model.get_submodule(owner)
            if spec.get("buffer", False):
                parent.register_buffer(attr, tensor)
            else:
                parent.register_parameter(attr, nn.Parameter(tensor))
        except (KeyError, AttributeError) as exc:
            raise GraphError(f"cannot place the tensor: {exc}", f"{at}.name") from None
    model.compile_nodes(arch["nodes"], f"{where}.nodes")
    return model


def _module(spec: Mapping[str, Any], where: str) -> nn.Module:
    kind = spec["type"]
    if kind == CONTAINER:
        return _Container()
    bound = check_layer_arguments(kind, spec.get("args", []), spec.get("kwargs", {}), where)
    try:
        return _LAYERS[kind](**bound)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise GraphError(f"cannot build {kind}: {str(exc)[:200]}", where) from None


#: The class of each allowed layer: names from the contract's static allowlist only, never
#: from a spec.
_LAYERS: dict[str, type[nn.Module]] = {name: getattr(nn, name) for name in ALLOWED_LAYERS}


class GraphModel(nn.Module):
    """A model run by interpreting a graph spec's nodes; its submodules are the rebuilt
    layers and containers."""

    def __init__(self) -> None:
        super().__init__()
        self._steps: list[_Step] = []
        self._inputs: list[tuple[str, str, Any]] = []

    def compile_nodes(self, nodes: list[Mapping[str, Any]], where: str) -> None:
        """Resolve every node's target once.

        Raises:
            GraphError: A ``param`` node naming no tensor of the model.
        """
        for i, node in enumerate(nodes):
            at = f"{where}[{i}]"
            op, target = node["op"], str(node.get("target"))
            args = list(node.get("args", []))
            if op == "placeholder":
                self._inputs.append((node["name"], target, args[0] if args else _REQUIRED))
                continue
            call: Any = target
            if op == "module":
                call = self.get_submodule(target)
            elif op == "function":
                call = FUNCTIONS[target]
            elif op == "param":
                call = self._tensor(target, f"{at}.target")
            self._steps.append(
                _Step(node["name"], op, call, args, dict(node.get("kwargs", {})), at)
            )

    def _tensor(self, path: str, where: str) -> str:
        """``path`` if it names a parameter or buffer of the model (looked up again at each
        call: loading the weights replaces the tensors)."""
        owner, _, attr = path.rpartition(".")
        try:
            module = self.get_submodule(owner)
        except AttributeError:
            module = None
        if module is None or (attr not in module._parameters and attr not in module._buffers):
            raise GraphError(f"{path!r} is no parameter or buffer of the model", where)
        return path

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Bind the inputs to the placeholders, then run the nodes in order."""
        env = self._bind(args, kwargs)
        *steps, output = self._steps  # checked: the last node, and only it, is the output
        for step in steps:
            a = _resolve(step.args, env)
            kw = {k: _resolve(v, env) for k, v in step.kwargs.items()}
            env[step.name] = self._run(step, a, kw)
        return _resolve(output.args, env)[0]

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        env: dict[str, Any] = {}
        if len(args) > len(self._inputs):
            raise TypeError(f"the model takes {len(self._inputs)} inputs, got {len(args)}")
        for i, (name, target, default) in enumerate(self._inputs):
            if i < len(args):
                env[name] = args[i]
            elif target in kwargs:
                env[name] = kwargs[target]
            elif default is not _REQUIRED:
                env[name] = _resolve(default, env)
            else:
                raise TypeError(f"the model's input {target!r} is missing")
        return env

    def _run(self, step: _Step, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if step.op == "param":
            owner, _, attr = step.call.rpartition(".")
            return getattr(self.get_submodule(owner), attr)
        if step.op == "method":
            if not args or not isinstance(args[0], Tensor):
                raise GraphError(
                    f"method {step.call!r} applies to a tensor, got {type(args[0]).__name__}"
                    if args
                    else f"method {step.call!r} needs its tensor",
                    step.field,
                )
            assert step.call in GRAPH_METHODS
            return getattr(args[0], step.call)(*args[1:], **kwargs)
        return step.call(*args, **kwargs)


_REQUIRED = object()


def _resolve(value: Any, env: Mapping[str, Any]) -> Any:
    """A node argument with references replaced by values and tuples, slices and ellipses
    rebuilt."""
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    if isinstance(value, Mapping):
        ((key, inner),) = value.items()
        if key == "node":
            return env[inner]
        if key == "tuple":
            return tuple(_resolve(v, env) for v in inner)
        if key == "slice":
            return slice(*(_resolve(v, env) for v in inner))
        return Ellipsis
    return value
