"""Describe any traceable model as a graph spec (:mod:`fimntk.contract.graph`).

``torch.fx`` traces the model with built-in ``torch.nn`` layers as leaves; each node becomes a
JSON node whose target is a name of the contract's allowlist, each leaf layer is described from
its constructor arguments (as a sequential spec describes it), each custom module becomes a
container, and the tensors custom modules hold themselves are listed with their shapes. The
server rebuilds the modules and interprets the nodes; the probe batch then checks that it
computes what the model computes.
"""

from __future__ import annotations

import functools
import importlib
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from fimntk.contract.graph import CONTAINER, GRAPH_FUNCTIONS, GRAPH_METHODS


class GraphTraceError(Exception):
    """A model that ``torch.fx`` cannot trace, or a node outside the allowlist."""


#: In-place operators ``x += y`` traced as themselves: the graph computes them out of place
#: (the probe batch catches a model whose result depended on the aliasing).
_IN_PLACE = {
    operator.iadd: "operator.add",
    operator.isub: "operator.sub",
    operator.imul: "operator.mul",
    operator.itruediv: "operator.truediv",
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer with built-in layers as leaves, containers traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
        return not isinstance(m, containers) and super().is_leaf_module(m, module_qualified_name)


@functools.cache
def _function_names() -> dict[Callable[..., Any], str]:
    """The callable of each allowlisted function name, reversed (the names are the contract's
    static list)."""
    names: dict[Callable[..., Any], str] = dict(_IN_PLACE)
    for name in GRAPH_FUNCTIONS:  # allowlist: the contract's static names, never user input
        module, _, attr = name.rpartition(".")
        names[getattr(importlib.import_module(module), attr)] = name
    return names


def describe_graph(
    model: nn.Module, describe_layer: Callable[[nn.Module, str], dict[str, Any]]
) -> dict[str, Any]:
    """The graph spec of ``model`` (without its dtype).

    Args:
        model: The model.
        describe_layer: ``{"type", "kwargs"}`` of a built-in layer at a path, or raises.

    Raises:
        GraphTraceError: What could not be traced or described, naming the node or module.
    """
    tracer = _Tracer()
    training = model.training
    model.eval()  # nn.Module.eval: traced as the server runs it (self.training is a constant)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises anything on data-dependent code
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise GraphTraceError(f"torch.fx cannot trace it ({lines[0][:200]})") from None
    finally:
        model.train(training)
    modules, params = _modules(model, tracer, describe_layer)
    names: dict[fx.Node, str] = {}
    nodes = []
    for i, node in enumerate(graph.nodes):
        names[node] = node.name if _NAME.match(node.name) else f"node{i}"
        nodes.append({"name": names[node], **_node(node, names)})
    return {"kind": "graph", "modules": modules, "params": params, "nodes": nodes}


def _modules(
    model: nn.Module,
    tracer: fx.Tracer,
    describe_layer: Callable[[nn.Module, str], dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    modules: list[dict[str, Any]] = []
    params: list[dict[str, Any]] = []
    leaves: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{leaf}.") for leaf in leaves):
            continue  # inside a built-in layer: the layer rebuilds it
        if name and tracer.is_leaf_module(module, name):
            leaves.append(name)
            modules.append({"name": name, **describe_layer(module, name)})
            continue
        if name:
            modules.append({"name": name, "type": CONTAINER})
        prefix = f"{name}." if name else ""
        for attr, p in module._parameters.items():
            if p is not None:
                params.append({"name": prefix + attr, "shape": list(p.shape)})
        for attr, b in module._buffers.items():
            if b is not None:
                if attr in module._non_persistent_buffers_set:
                    raise GraphTraceError(
                        f"buffer {prefix + attr} is not persistent (not in the state dict)"
                    )
                params.append({"name": prefix + attr, "shape": list(b.shape), "buffer": True})
    return modules, params


def _node(node: fx.Node, names: dict[fx.Node, str]) -> dict[str, Any]:
    where = f"node {node.name!r} ({node.op} {_target_text(node.target)})"
    encode = functools.partial(_encode, names=names, where=where)
    args = [encode(a) for a in node.args]
    kwargs = {k: encode(v) for k, v in node.kwargs.items() if k != "inplace"}
    if node.op == "placeholder":
        return {"op": "placeholder", "target": node.target, "args": args}
    if node.op == "output":
        return {"op": "output", "args": args}
    if node.op == "call_module":
        return {"op": "module", "target": node.target, "args": args, "kwargs": kwargs}
    if node.op == "get_attr":
        return {"op": "param", "target": node.target}
    if node.op == "call_method" and node.target in GRAPH_METHODS:
        return {"op": "method", "target": node.target, "args": args, "kwargs": kwargs}
    if node.op == "call_function":
        if node.target is getattr and node.args[1:] == ("shape",):
            return {"op": "method", "target": "size", "args": args[:1]}
        name = _function_names().get(node.target)  # type: ignore[arg-type]
        if name is not None:
            return {"op": "function", "target": name, "args": args, "kwargs": kwargs}
    raise GraphTraceError(
        f"{where} is outside the server's allowlist; rewrite it with an allowed function "
        "(torch.flatten, torch.cat, operator.add, torch.nn.functional.relu, ...) or method "
        "(view, reshape, permute, transpose, mean, size, ...)"
    )


def _target_text(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _encode(value: Any, names: dict[fx.Node, str], where: str) -> Any:
    """A node argument as JSON: references, literals, tuples, slices, ellipses."""
    if isinstance(value, fx.Node):
        return {"node": names[value]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_encode(v, names, where) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, names, where) for v in value]}
    if isinstance(value, slice):
        return {"slice": [_encode(v, names, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    kind = "a dtype or device" if isinstance(value, torch.dtype | torch.device) else "a value"
    raise GraphTraceError(
        f"{where} takes {kind} the graph spec cannot carry ({type(value).__name__}): "
        "compute it from the inputs, or register a builder"
    )
