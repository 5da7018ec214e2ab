"""The graph and Hugging Face spec allowlists (contract.graph, contract.hf) against torch and
the worker's tables."""

from __future__ import annotations

import pytest
import torch

from fimntk.contract.arguments import ArgumentError
from fimntk.contract.graph import GRAPH_FUNCTIONS, GRAPH_METHODS, RESERVED_NAMES, check_graph
from fimntk.contract.hf import HF_HEADS, check_hf
from fimntk.contract.library import check_library
from fimntk.worker.graph import FUNCTIONS


def test_every_allowed_method_is_a_tensor_method_that_writes_nothing() -> None:
    for name in GRAPH_METHODS:
        assert callable(getattr(torch.Tensor, name)), name
        assert not name.endswith("_") and not name.startswith("_"), name
    assert not {"to", "cuda", "cpu", "type", "copy_", "data_ptr", "numpy"} & GRAPH_METHODS


def test_the_worker_maps_exactly_the_allowed_functions() -> None:
    assert set(FUNCTIONS) == GRAPH_FUNCTIONS
    for name, function in FUNCTIONS.items():
        assert name.rpartition(".")[2] == function.__name__, name


def test_every_head_is_an_auto_class() -> None:
    transformers = pytest.importorskip("transformers")
    for head in HF_HEADS:
        assert hasattr(getattr(transformers, head), "from_config"), head


def _graph(**node: object) -> dict[str, object]:
    return {
        "kind": "graph",
        "nodes": [
            {"name": "x", "op": "placeholder", "target": "x"},
            {"name": "y", **node},
            {"name": "out", "op": "output", "args": [{"node": "y"}]},
        ],
    }


@pytest.mark.parametrize(
    "node",
    [
        {
            "op": "function",
            "target": "operator.getitem",
            "args": [{"node": "x"}, {"tuple": [{"slice": [None, 2, None]}, {"ellipsis": True}, 0]}],
        },
        {"op": "method", "target": "view", "args": [{"node": "x"}, -1, 4]},
        {
            "op": "function",
            "target": "torch.cat",
            "args": [[{"node": "x"}, {"node": "x"}]],
            "kwargs": {"dim": 1},
        },
    ],
)
def test_tuples_slices_lists_and_keywords_are_accepted(node: dict[str, object]) -> None:
    check_graph(_graph(**node), "a")


@pytest.mark.parametrize(
    ("node", "field"),
    [
        ({"op": "function", "target": "builtins.eval", "args": ["1"]}, "a.nodes[1].target"),
        ({"op": "method", "target": "add", "args": [{"slice": [1, 2]}]}, "a.nodes[1].args[0]"),
        ({"op": "method", "target": "add", "args": [float("nan")]}, "a.nodes[1].args[0]"),
        ({"op": "method", "target": "add", "args": [2**40]}, "a.nodes[1].args[0]"),
        ({"op": "param", "target": "a..b"}, "a.nodes[1].target"),
        ({"op": "module", "target": "fc"}, "a.nodes[1].target"),
        ({"op": "output", "args": []}, "a.nodes[1].op"),
    ],
)
def test_bad_nodes_are_refused_naming_the_field(node: dict[str, object], field: str) -> None:
    with pytest.raises(ArgumentError) as caught:
        check_graph(_graph(**node), "a")
    assert caught.value.field == field


def test_a_module_needs_its_container_listed_first() -> None:
    graph = _graph(op="module", target="block.fc", args=[{"node": "x"}])
    graph["modules"] = [{"name": "block.fc", "type": "Linear", "args": [4, 3]}]
    with pytest.raises(ArgumentError, match="parent 'block'") as caught:
        check_graph(graph, "a")
    assert caught.value.field == "a.modules[0].name"
    graph["modules"] = [{"name": "block", "type": "Module"}, graph["modules"][0]]  # type: ignore[index]
    check_graph(graph, "a")


def test_nested_hf_config_values_are_bounded() -> None:
    arch = {"kind": "hf", "head": "AutoModel", "config": {"model_type": "gpt2"}}
    check_hf({**arch, "config": {"model_type": "gpt2", "id2label": {"0": "cat"}}}, "a")
    with pytest.raises(ArgumentError) as caught:
        check_hf({**arch, "config": {"model_type": "gpt2", "x": {"y": {"z": {"w": [1]}}}}}, "a")
    assert caught.value.field == "a.config.x.y.z.w"


@pytest.mark.parametrize(
    "arch",
    [
        _graph(op="method", target="add", args=[{"node": ["x"]}]),
        _graph(op=["method"], target="add"),
        {"kind": "graph", "modules": [{"name": "a", "type": ["Linear"]}], "nodes": []},
        {"kind": "hf", "head": ["AutoModel"], "config": {}},
        {"kind": "hf", "head": "AutoModel", "config": {"model_type": {"bert": 1}}},
    ],
    ids=["list-reference", "list-op", "list-type", "list-head", "object-model-type"],
)
def test_unhashable_values_are_refused_not_crashed(arch: dict[str, object]) -> None:
    check = check_hf if arch["kind"] == "hf" else check_graph
    with pytest.raises(ArgumentError):
        check(arch, "a")


@pytest.mark.parametrize(
    ("arch", "field"),
    [
        ({"library": "os", "name": "resnet18"}, "a.library"),
        ({"library": "timm", "name": "hf-hub:evil/model"}, "a.name"),
        ({"library": "timm", "name": "resnet18", "kwargs": {"pretrained": True}}, "a.kwargs"),
        (
            {"library": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 0}},
            "a.kwargs.num_classes",
        ),
    ],
)
def test_library_specs_outside_the_allowlist_are_refused(
    arch: dict[str, object], field: str
) -> None:
    with pytest.raises(ArgumentError) as caught:
        check_library({"kind": "library", **arch}, "a")
    assert caught.value.field == field


def test_names_of_module_attributes_are_reserved() -> None:
    assert {n for n in dir(torch.nn.Module()) if not n.startswith("_")} <= RESERVED_NAMES
    graph = _graph(op="param", target="forward")
    graph["params"] = [{"name": "forward", "shape": [2]}]
    with pytest.raises(ArgumentError, match=r"attribute of torch\.nn\.Module") as caught:
        check_graph(graph, "a")
    assert caught.value.field == "a.params[0].name"
