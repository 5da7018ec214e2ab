"""The graph spec: a model as a JSON DAG of allowlisted operations, checked without torch.

The client traces a model with ``torch.fx`` (built-in ``torch.nn`` layers as leaves) and sends::

    {"kind": "graph",
     "modules": [{"name": "conv1", "type": "Conv2d", "kwargs": {...}},   # named_modules order
                 {"name": "block", "type": "Module"}, ...],             # "Module": a container
     "params": [{"name": "block.scale", "shape": [8]}],                 # tensors of containers
     "nodes": [{"name": "x", "op": "placeholder", "target": "x"},
               {"name": "conv1", "op": "module", "target": "conv1", "args": [{"node": "x"}]},
               {"name": "add", "op": "function", "target": "operator.add",
                "args": [{"node": "conv1"}, {"node": "x"}]},
               {"name": "output", "op": "output", "args": [{"node": "add"}]}]}

The server rebuilds real modules from :data:`~fimntk.contract.arguments.LAYER_ARGUMENTS` (so
per-layer hooks see real ``nn.Linear``/``nn.Conv2d``) and runs the nodes with its own
interpreter: a node's ``target`` is looked up in a static table (:data:`GRAPH_FUNCTIONS`,
:data:`GRAPH_METHODS`), never imported, evaluated or compiled. A node argument is a literal
(``null``, a boolean, a bounded number, a short identifier-like string, a list, or
``{"tuple": [...]}``, ``{"slice": [start, stop, step]}``, ``{"ellipsis": true}``) or a reference
``{"node": name}`` to an earlier node.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fimntk.contract.arguments import ArgumentError, check_layer_arguments
from fimntk.contract.vocabulary import ALLOWED_LAYERS

#: Most nodes of a graph.
MAX_NODES = 10_000
#: Most modules (containers included) of a graph.
MAX_GRAPH_MODULES = 4096
#: Most tensors held directly by containers.
MAX_GRAPH_PARAMS = 1024
#: Most positional plus keyword arguments of one node.
MAX_NODE_ARGS = 16
#: Most entries of a list or tuple argument, and deepest nesting of them.
MAX_LITERAL_LEN = 64
MAX_LITERAL_DEPTH = 4
#: Largest absolute integer literal (sizes, dimensions, indices).
MAX_INT = 2**31
#: Most dotted segments of a module or parameter path.
MAX_PATH_SEGMENTS = 16
#: The type of a module that only holds others (a custom module traced through).
CONTAINER = "Module"

#: Attributes of ``torch.nn.Module`` (with ``smart_apply``, which ``transformers`` adds to it,
#: and those of the server's graph model): a module or tensor of that name would shadow a
#: method, so the server could not place it.
RESERVED_NAMES = frozenset(
    [
        "T_destination",
        "add_module",
        "apply",
        "bfloat16",
        "buffers",
        "call_super_init",
        "children",
        "compile",
        "compile_nodes",
        "cpu",
        "cuda",
        "double",
        "dump_patches",
        "eval",
        "extra_repr",
        "float",
        "forward",
        "get_buffer",
        "get_extra_state",
        "get_parameter",
        "get_submodule",
        "half",
        "ipu",
        "load_state_dict",
        "modules",
        "mtia",
        "named_buffers",
        "named_children",
        "named_modules",
        "named_parameters",
        "parameters",
        "register_backward_hook",
        "register_buffer",
        "register_forward_hook",
        "register_forward_pre_hook",
        "register_full_backward_hook",
        "register_full_backward_pre_hook",
        "register_load_state_dict_post_hook",
        "register_load_state_dict_pre_hook",
        "register_module",
        "register_parameter",
        "register_state_dict_post_hook",
        "register_state_dict_pre_hook",
        "requires_grad_",
        "set_extra_state",
        "set_submodule",
        "share_memory",
        "smart_apply",
        "state_dict",
        "to",
        "to_empty",
        "train",
        "training",
        "type",
        "xpu",
        "zero_grad",
    ]
)

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,63}$")
_STRING = re.compile(r"^[A-Za-z0-9_\-]{0,32}$")

#: Functions a ``function`` node may call, by the name the server maps to the callable.
GRAPH_FUNCTIONS = frozenset(
    {
        *(
            f"operator.{n}"
            for n in ("add", "sub", "mul", "truediv", "floordiv", "matmul", "neg", "getitem")
        ),
        *(
            f"torch.{n}"
            for n in (
                "flatten",
                "cat",
                "stack",
                "add",
                "sub",
                "mul",
                "matmul",
                "bmm",
                "relu",
                "sigmoid",
                "tanh",
                "exp",
                "sqrt",
                "rsqrt",
                "mean",
                "sum",
                "softmax",
                "transpose",
                "permute",
                "reshape",
                "squeeze",
                "unsqueeze",
                "chunk",
                "split",
            )
        ),
        *(
            f"torch.nn.functional.{n}"
            for n in (
                "relu",
                "relu6",
                "gelu",
                "silu",
                "elu",
                "leaky_relu",
                "softplus",
                "sigmoid",
                "tanh",
                "hardswish",
                "softmax",
                "log_softmax",
                "dropout",
                "linear",
                "conv2d",
                "layer_norm",
                "avg_pool2d",
                "max_pool2d",
                "adaptive_avg_pool2d",
                "pad",
                "normalize",
            )
        ),
    }
)

#: Tensor methods a ``method`` node may call (none in place, none changing device or dtype).
GRAPH_METHODS = frozenset(
    {
        "view",
        "reshape",
        "flatten",
        "permute",
        "transpose",
        "contiguous",
        "mean",
        "sum",
        "size",
        "dim",
        "unsqueeze",
        "squeeze",
        "chunk",
        "split",
        "softmax",
        "relu",
        "sigmoid",
        "tanh",
        "exp",
        "pow",
        "sqrt",
        "matmul",
        "add",
        "sub",
        "mul",
        "div",
        "neg",
        "t",
        "view_as",
        "reshape_as",
        "expand_as",
    }
)

#: Keyword arguments no node may pass: writing into a tensor (``out``, ``inplace``) could change
#: the weights.
_REFUSED_KWARGS = frozenset({"out", "inplace"})

NODE_OPS = ("placeholder", "module", "function", "method", "param", "output")


def _fix(what: str) -> str:
    return (
        f"{what}; use an allowlisted alternative (functions: torch.flatten, torch.cat, "
        "operator.add, torch.nn.functional.relu, ...; methods: view, reshape, permute, ...), "
        "or register a builder on the server for this model"
    )


def check_graph(arch: Mapping[str, Any], where: str) -> None:
    """Check a graph architecture: names, module arguments, node kinds and targets, references
    and literals, and the size caps. Plain Python, no torch: run by the API and again by the
    worker before it builds anything.

    Args:
        arch: The raw ``model.architecture`` (``kind == "graph"``).
        where: Field path of the architecture.

    Raises:
        ArgumentError: Naming the first offending field and what to do.
    """
    modules = _list(arch.get("modules", []), f"{where}.modules", MAX_GRAPH_MODULES)
    params = _list(arch.get("params", []), f"{where}.params", MAX_GRAPH_PARAMS)
    nodes = _list(arch.get("nodes"), f"{where}.nodes", MAX_NODES)
    kinds = _check_modules(modules, f"{where}.modules")
    _check_params(params, kinds, f"{where}.params")
    _check_nodes(nodes, kinds, f"{where}.nodes")


def _list(value: Any, where: str, cap: int) -> Sequence[Any]:
    if not isinstance(value, list):
        raise ArgumentError("expected a list", where)
    if len(value) > cap:
        raise ArgumentError(f"more than {cap} entries", where)
    return value


def check_path(path: Any, where: str) -> str:
    """A dotted module path whose segments are plain identifiers or indices.

    Raises:
        ArgumentError: Another string (dunder, quote, empty segment...).
    """
    if not isinstance(path, str) or not path:
        raise ArgumentError("expected a dotted module path", where)
    segments = path.split(".")
    if len(segments) > MAX_PATH_SEGMENTS or not all(_SEGMENT.match(s) for s in segments):
        raise ArgumentError(
            "a path is at most 16 dotted segments of letters, digits and '_' (not leading)",
            where,
        )
    reserved = RESERVED_NAMES.intersection(segments)
    if reserved:
        raise ArgumentError(
            f"{sorted(reserved)[0]!r} is an attribute of torch.nn.Module: rename it", where
        )
    return path


def _check_modules(modules: Sequence[Any], where: str) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for i, module in enumerate(modules):
        at = f"{where}[{i}]"
        if not isinstance(module, Mapping):
            raise ArgumentError("expected an object", at)
        name = check_path(module.get("name"), f"{at}.name")
        if name in kinds:
            raise ArgumentError(f"module {name!r} is listed twice", f"{at}.name")
        parent = name.rpartition(".")[0]
        if parent and kinds.get(parent) != CONTAINER:
            raise ArgumentError(
                f"the parent {parent!r} must be listed before as a {CONTAINER!r}", f"{at}.name"
            )
        kind = module.get("type")
        if kind == CONTAINER:
            if module.get("args") or module.get("kwargs"):
                raise ArgumentError("a container takes no arguments", at)
        elif isinstance(kind, str) and kind in ALLOWED_LAYERS and kind != "Sequential":
            check_layer_arguments(kind, module.get("args", []), module.get("kwargs", {}), at)
        else:
            raise ArgumentError(
                _fix(f"module type {_short(kind)} is not an allowed torch.nn layer"), f"{at}.type"
            )
        kinds[name] = kind
    return kinds


def _check_params(params: Sequence[Any], kinds: Mapping[str, str], where: str) -> None:
    seen: set[str] = set()
    for i, param in enumerate(params):
        at = f"{where}[{i}]"
        if not isinstance(param, Mapping):
            raise ArgumentError("expected an object", at)
        name = check_path(param.get("name"), f"{at}.name")
        owner = name.rpartition(".")[0]
        if (owner and kinds.get(owner) != CONTAINER) or name in kinds or name in seen:
            raise ArgumentError(
                "a tensor belongs to a listed container (or the model) under a new name",
                f"{at}.name",
            )
        seen.add(name)
        shape = param.get("shape")
        if not isinstance(shape, list) or len(shape) > 8:
            raise ArgumentError("expected a shape: a list of at most 8 sizes", f"{at}.shape")
        for j, size in enumerate(shape):
            _int(size, f"{at}.shape[{j}]", 0, 1 << 24)
        if param.get("buffer", False) not in (True, False):
            raise ArgumentError("expected true or false", f"{at}.buffer")


def _check_nodes(nodes: Sequence[Any], kinds: Mapping[str, str], where: str) -> None:
    defined: set[str] = set()
    for i, node in enumerate(nodes):
        at = f"{where}[{i}]"
        if not isinstance(node, Mapping):
            raise ArgumentError("expected an object", at)
        name, op, target = node.get("name"), node.get("op"), node.get("target")
        if not isinstance(name, str) or not _NAME.match(name) or name in defined:
            raise ArgumentError("expected a new identifier (letters, digits, '_')", f"{at}.name")
        if not isinstance(op, str) or op not in NODE_OPS:
            raise ArgumentError(_fix(f"node kind {_short(op)} is not one of {NODE_OPS}"), at)
        last = i == len(nodes) - 1
        if (op == "output") != last:
            raise ArgumentError("the last node, and only it, is the 'output'", f"{at}.op")
        _check_target(op, target, kinds, f"{at}.target", name)
        args, kwargs = node.get("args", []), node.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, Mapping):
            raise ArgumentError("args is a list and kwargs an object", at)
        if len(args) + len(kwargs) > MAX_NODE_ARGS:
            raise ArgumentError(f"more than {MAX_NODE_ARGS} arguments", at)
        if op in ("param", "output") and kwargs:
            raise ArgumentError(f"a {op!r} node takes no keyword arguments", f"{at}.kwargs")
        for j, value in enumerate(args):
            check_literal(value, defined, f"{at}.args[{j}]", 0)
        for key, value in kwargs.items():
            if not isinstance(key, str) or not _NAME.match(key) or key in _REFUSED_KWARGS:
                raise ArgumentError(
                    f"keyword {_short(key)} is not allowed (an identifier; not out, inplace)",
                    f"{at}.kwargs",
                )
            check_literal(value, defined, f"{at}.kwargs.{key}", 0)
        defined.add(name)
    if not nodes:
        raise ArgumentError("a graph needs an 'output' node", where)


def _check_target(op: str, target: Any, kinds: Mapping[str, str], where: str, node: str) -> None:
    if op == "output":
        if target is not None:
            raise ArgumentError("an 'output' node has no target", where)
        return
    if op == "placeholder":
        if not isinstance(target, str) or not _NAME.match(target):
            raise ArgumentError("expected the model input's name (an identifier)", where)
        return
    if op == "module":
        path = check_path(target, where)
        if kinds.get(path) in (None, CONTAINER):
            raise ArgumentError(
                _fix(f"node {node!r} calls {_short(path)}, not a listed layer"), where
            )
        return
    if op == "param":
        check_path(target, where)
        return
    table = GRAPH_FUNCTIONS if op == "function" else GRAPH_METHODS
    if not isinstance(target, str) or target not in table:  # never a free attribute name
        raise ArgumentError(_fix(f"node {node!r}: {op} {_short(target)} is not allowed"), where)


def check_literal(value: Any, defined: set[str], where: str, depth: int) -> None:
    """Check a node argument: a bounded literal or a reference to an earlier node.

    Raises:
        ArgumentError: Anything else.
    """
    if depth > MAX_LITERAL_DEPTH:
        raise ArgumentError(f"arguments nest more than {MAX_LITERAL_DEPTH} deep", where)
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        _int(value, where, -MAX_INT, MAX_INT)
        return
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > 1e30:
            raise ArgumentError("expected a finite number within ±1e30", where)
        return
    if isinstance(value, str):
        if not _STRING.match(value):
            raise ArgumentError(
                "a string argument is at most 32 letters, digits, '_' or '-'", where
            )
        return
    if isinstance(value, list):
        _check_items(value, defined, where, depth)
        return
    if isinstance(value, Mapping) and len(value) == 1:
        ((key, inner),) = value.items()
        if key == "node":
            if not isinstance(inner, str) or inner not in defined:
                raise ArgumentError(f"{_short(inner)} is not an earlier node", where)
            return
        if key == "tuple" and isinstance(inner, list):
            _check_items(inner, defined, where, depth)
            return
        if key == "slice" and isinstance(inner, list) and len(inner) == 3:
            for j, bound in enumerate(inner):
                if bound is not None:
                    check_literal(bound, defined, f"{where}.slice[{j}]", depth + 1)
            return
        if key == "ellipsis" and inner is True:
            return
    raise ArgumentError(
        "expected null, a boolean, a number, a short string, a list, or an object "
        "{'node'|'tuple'|'slice'|'ellipsis': ...}",
        where,
    )


def _check_items(items: list[Any], defined: set[str], where: str, depth: int) -> None:
    if len(items) > MAX_LITERAL_LEN:
        raise ArgumentError(f"more than {MAX_LITERAL_LEN} entries", where)
    for j, item in enumerate(items):
        check_literal(item, defined, f"{where}[{j}]", depth + 1)


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ArgumentError(f"expected an integer in [{lo}, {hi}]", where)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
