"""Malicious graph and Hugging Face specs (issue 15): every one is refused 422 at submission,
naming the field, before anything is built or run."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fimntk.contract.graph import MAX_NODES
from tests.service.conftest import auth
from tests.service.models import Uploaded, upload_all

GRAPH: dict[str, Any] = {
    "kind": "graph",
    "modules": [{"name": "fc", "type": "Linear", "args": [4, 3]}],
    "nodes": [
        {"name": "x", "op": "placeholder", "target": "x"},
        {"name": "fc", "op": "module", "target": "fc", "args": [{"node": "x"}]},
        {"name": "y", "op": "function", "target": "torch.tanh", "args": [{"node": "fc"}]},
        {"name": "output", "op": "output", "args": [{"node": "y"}]},
    ],
}
HF: dict[str, Any] = {
    "kind": "hf",
    "head": "AutoModelForSequenceClassification",
    "config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1},
}

LIBRARY: dict[str, Any] = {
    "kind": "library",
    "library": "torchvision",
    "name": "resnet18",
    "kwargs": {"num_classes": 3},
}


def _set(base: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    arch = copy.deepcopy(base)
    target = arch
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return arch


N = "model.architecture.nodes"
MALICIOUS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-function": (_set(GRAPH, ("nodes", 2, "target"), "os.system"), f"{N}[2].target"),
    "code-in-target": (
        _set(GRAPH, ("nodes", 2, "target"), "__import__('os').system"),
        f"{N}[2].target",
    ),
    "dunder-method": (
        _set(_set(GRAPH, ("nodes", 2, "op"), "method"), ("nodes", 2, "target"), "__class__"),
        f"{N}[2].target",
    ),
    "in-place-method": (
        _set(_set(GRAPH, ("nodes", 2, "op"), "method"), ("nodes", 2, "target"), "add_"),
        f"{N}[2].target",
    ),
    "quote-in-module-target": (
        _set(GRAPH, ("nodes", 1, "target"), "fc'); import os; ('"),
        f"{N}[1].target",
    ),
    "quote-in-node-name": (_set(GRAPH, ("nodes", 2, "name"), "y'\nimport os"), f"{N}[2].name"),
    "keyword-named-class": (
        _set(GRAPH, ("nodes", 2, "kwargs"), {"__class__": 1}),
        f"{N}[2].kwargs",
    ),
    "out-keyword": (
        _set(GRAPH, ("nodes", 2, "kwargs"), {"out": {"node": "x"}}),
        f"{N}[2].kwargs",
    ),
    "python-keyword-as-placeholder": (
        _set(GRAPH, ("nodes", 0, "target"), "**kwargs"),
        f"{N}[0].target",
    ),
    "forward-reference": (
        _set(GRAPH, ("nodes", 1, "args"), [{"node": "y"}]),
        f"{N}[1].args[0]",
    ),
    "path-string-argument": (
        _set(GRAPH, ("nodes", 2, "args"), [{"node": "fc"}, "/etc/passwd"]),
        f"{N}[2].args[1]",
    ),
    "url-string-argument": (
        _set(GRAPH, ("nodes", 2, "kwargs"), {"approximate": "https://evil.example"}),
        f"{N}[2].kwargs.approximate",
    ),
    "unknown-module-type": (
        _set(GRAPH, ("modules", 0, "type"), "os.path"),
        "model.architecture.modules[0].type",
    ),
    "factory-argument": (
        _set(GRAPH, ("modules", 0, "kwargs"), {"device": "cuda"}),
        "model.architecture.modules[0].kwargs",
    ),
    "module-shadowing-forward": (
        _set(GRAPH, ("modules", 0, "name"), "forward"),
        "model.architecture.modules[0].name",
    ),
    "dunder-tensor-name": (
        _set(GRAPH, ("params",), [{"name": "__dict__", "shape": [1]}]),
        "model.architecture.params[0].name",
    ),
    "deep-literal": (
        _set(GRAPH, ("nodes", 2, "args"), [{"node": "fc"}, [[[[[[1]]]]]]]),
        f"{N}[2].args[1][0][0][0][0][0]",
    ),
    "auto-map": (
        _set(HF, ("config", "auto_map"), {"AutoModel": "evil.EvilModel"}),
        "model.architecture.config.auto_map",
    ),
    "remote-code": (
        _set(HF, ("config", "trust_remote_code"), True),
        "model.architecture.config.trust_remote_code",
    ),
    "unknown-model-type": (
        _set(HF, ("config", "model_type"), "evil"),
        "model.architecture.config.model_type",
    ),
    "url-in-config": (
        _set(HF, ("config", "tokenizer_class"), "https://evil.example/tok"),
        "model.architecture.config.tokenizer_class",
    ),
    "path-in-private-key": (
        _set(HF, ("config", "_name_or_path"), "/etc"),
        "model.architecture.config",
    ),
    "unknown-head": (_set(HF, ("head",), "from_pretrained"), "model.architecture.head"),
    "library-path-name": (_set(LIBRARY, ("name",), "../../evil"), "model.architecture.name"),
    "library-pretrained-weights": (
        _set(LIBRARY, ("kwargs",), {"weights": "IMAGENET1K_V1"}),
        "model.architecture.kwargs",
    ),
}


@pytest.fixture(scope="module")
def data(client: TestClient, users: dict[str, str]) -> Uploaded:
    return upload_all(client, users["alice"])


def _submit(client: TestClient, key: str, up: Uploaded, arch: dict[str, Any]) -> Any:
    spec = {
        "model": {"weights": up.spec_model["weights"], "architecture": arch},
        "dataset": {"blob": up.dataset, "batch_size": 4},
        "metric": "fim",
        "representation": "diag",
    }
    return client.post("/v1/jobs", json=spec, headers=auth(key))


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_a_malicious_spec_is_refused_naming_its_field(
    client: TestClient, users: dict[str, str], data: Uploaded, case: str
) -> None:
    arch, field = MALICIOUS[case]
    before = client.get("/v1/jobs", headers=auth(users["alice"])).json()["items"]
    response = _submit(client, users["alice"], data, arch)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == field, body
    assert len(response.content) < 2000 and "Traceback" not in body["detail"]
    after = client.get("/v1/jobs", headers=auth(users["alice"])).json()["items"]
    assert len(after) == len(before)  # nothing queued, so nothing built or run


def test_an_oversized_graph_is_refused(
    client: TestClient, users: dict[str, str], data: Uploaded
) -> None:
    relu = {"op": "function", "target": "torch.relu", "args": [{"node": "x"}]}
    nodes = [GRAPH["nodes"][0], *({"name": f"n{i}", **relu} for i in range(MAX_NODES))]
    arch = {**GRAPH, "nodes": [*nodes, {"name": "output", "op": "output", "args": []}]}
    response = _submit(client, users["alice"], data, arch)
    assert response.status_code == 422, response.text[:500]
    assert "model.architecture" in response.json()["field"]


def test_a_well_formed_graph_is_accepted(
    client: TestClient, users: dict[str, str], data: Uploaded
) -> None:
    graph = {**GRAPH, "modules": [{"name": "0", "type": "Module"}, *GRAPH["modules"]]}
    response = _submit(client, users["alice"], data, graph)
    assert response.status_code == 202, response.text
