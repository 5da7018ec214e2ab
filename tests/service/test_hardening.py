"""Issue 19: bounds before cost and every user mistake a 4xx naming the field (API side).

Each test submits what the probe sent and checks the answer, then that the service still
answers and runs a trivial job.
"""

from __future__ import annotations

import base64
import math
import sys
import types
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from fimntk.core.config import Settings
from fimntk.engine.memory import CHEAPER
from fimntk.service.main import create_app
from fimntk.service.validation import lab_builders
from fimntk.worker.memory_check import available_bytes
from fimntk.worker.models import load_builders
from tests.service.conftest import ADMIN_KEY, auth, st_bytes, upload, wait_job
from tests.service.models import ARCH, Uploaded, upload_all


@pytest.fixture(scope="module")
def data(client: TestClient, users: dict[str, str]) -> Uploaded:
    return upload_all(client, users["alice"])


def _spec(up: Uploaded, architecture: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    model = {**up.spec_model, "architecture": architecture or ARCH}
    return {
        "model": model,
        "dataset": {"blob": up.dataset, "batch_size": 4},
        "metric": "fim",
        "representation": "diag",
        "operations": [{"op": "trace"}],
        **extra,
    }


def _still_serving(client: TestClient, key: str, up: Uploaded) -> None:
    assert client.get("/healthz").status_code == 200
    response = client.post("/v1/jobs", json=_spec(up), headers=auth(key))
    assert response.status_code == 202, response.text
    assert wait_job(client, key, response.json()["id"])["status"] == "succeeded"


def _refused(response: Any, status: int, field: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field, body
    assert len(response.content) < 2000  # never an echo of the input
    assert "Traceback" not in body["detail"] and "/" not in body["detail"]
    return body


@pytest.mark.parametrize(
    ("layer", "field"),
    [
        ({"type": "Linear", "args": [8192, 8192], "kwargs": {"device": "cpu"}}, "kwargs"),
        ({"type": "Linear", "args": [8, 3], "kwargs": {"device": "cuda:0"}}, "kwargs"),
        ({"type": "Linear", "args": [8, 3], "kwargs": {"dtype": "float64"}}, "kwargs"),
        ({"type": "Linear", "args": [10**30, 3]}, "args[0]"),
        ({"type": "GroupNorm", "args": [0, 4]}, "args[0]"),
        ({"type": "Embedding", "args": [10, 3], "kwargs": {"padding_idx": 100}}, None),
    ],
)
def test_layer_arguments_refused_at_submit(
    client: TestClient, users: dict[str, str], data: Uploaded, layer: dict[str, Any], field: str
) -> None:
    arch = {"kind": "sequential", "layers": [layer]}
    response = client.post("/v1/jobs", json=_spec(data, arch), headers=auth(users["alice"]))
    where = "model.architecture.layers[0]" + (f".{field}" if field else "")
    _refused(response, 422, where)


def test_deep_nesting_and_long_hidden_refused(
    client: TestClient, users: dict[str, str], worker: Any, data: Uploaded
) -> None:
    key = users["alice"]
    layers: list[dict[str, Any]] = [{"type": "Linear", "args": [4, 3]}]
    for _ in range(255):
        layers = [{"type": "Sequential", "layers": layers}]
    response = client.post(
        "/v1/jobs", json=_spec(data, {"kind": "sequential", "layers": layers}), headers=auth(key)
    )
    assert response.status_code == 422, response.text[:500]
    assert "nested more than 32" in response.text
    assert len(response.content) < 4000
    assert client.get("/v1/jobs", headers=auth(key)).status_code == 200
    assert client.get("/v1/jobs", headers=auth(ADMIN_KEY)).status_code == 200

    mlp = {
        "kind": "builder",
        "name": "mlp",
        "kwargs": {"in_features": 4, "hidden": [8] * 40_000, "out_features": 3},
    }
    _refused(
        client.post("/v1/jobs", json=_spec(data, mlp), headers=auth(key)),
        422,
        "model.architecture.kwargs.hidden",
    )
    _still_serving(client, key, data)


def test_bodies_are_bounded_before_authentication(
    client: TestClient, users: dict[str, str], worker: Any, data: Uploaded, settings: Settings
) -> None:
    big = b"{" + b" " * (settings.max_body_bytes + 10) + b"}"
    response = client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413  # no key: still refused on size, before auth
    assert response.json()["type"].endswith("payload-too-large")

    def chunks() -> Any:
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b" " * 65536

    response = client.post("/v1/jobs", content=chunks(), headers=auth(users["alice"]))
    assert response.status_code == 413

    key = users["alice"]
    response = client.post(
        "/v1/jobs", json={**_spec(data), "reuse": "x" * 100_000}, headers=auth(key)
    )
    assert response.status_code == 422 and len(response.content) < 2000
    junk = {"type": "Linear", "args": [4, 8], "kwargs": {"junk": "x" * 1_000_000}}
    arch = {"kind": "sequential", "layers": [junk]}
    response = client.post("/v1/jobs", json=_spec(data, arch), headers=auth(key))
    assert response.status_code == 422 and len(response.content) < 2000
    _still_serving(client, key, data)


def test_user_names_unique_and_printable(client: TestClient) -> None:
    admin = auth(ADMIN_KEY)
    for bad in ["eve\x85", "eve\u2028x", "eve\x07"]:
        response = client.post("/v1/users", json={"name": bad}, headers=admin)
        assert response.status_code == 422, bad
    assert client.post("/v1/users", json={"name": "carol-19"}, headers=admin).status_code == 201
    response = client.post("/v1/users", json={"name": "carol-19"}, headers=admin)
    assert response.status_code == 409 and response.json()["field"] == "name"


def test_unknown_query_parameters_are_422(client: TestClient, users: dict[str, str]) -> None:
    response = client.get("/v1/jobs", params={"op": "trace"}, headers=auth(users["alice"]))
    assert response.status_code == 422 and response.json()["field"] == "op"
    assert client.get("/v1/jobs", params={"limit": 5}, headers=auth(users["alice"])).is_success


def test_builder_name_collision_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("lab_builders_issue19")
    module.BUILDERS = {"resnet": lambda: None}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(ValueError, match="already taken"):
        load_builders([module.__name__])
    with pytest.raises(ValueError, match="already taken"):
        lab_builders((module.__name__,))


@pytest.mark.parametrize(
    "raw",
    [
        b'"x"',
        b"[null, 1]",
        b"[1, 2]",
        b"[" * 150 + b"]" * 150,
        b"\xff" * 600,
    ],
)
def test_crafted_cursors_are_400(client: TestClient, users: dict[str, str], raw: bytes) -> None:
    cursor = base64.urlsafe_b64encode(raw).decode()
    response = client.get("/v1/jobs", params={"cursor": cursor[:512]}, headers=auth(users["alice"]))
    assert response.status_code in (400, 422), response.text
    assert response.json()["field"] == "cursor"


@pytest.mark.parametrize("where", ["subset", "mc"])
def test_huge_seeds_are_422(
    client: TestClient, users: dict[str, str], data: Uploaded, where: str
) -> None:
    spec = _spec(data)
    if where == "subset":
        spec["dataset"] |= {"subset": 4, "seed": 10**30}
        field = "dataset.seed"
    else:
        spec |= {"metric": "fim_mc", "seed": 10**30}
        field = "seed"
    response = client.post("/v1/jobs", json=spec, headers=auth(users["alice"]))
    assert response.status_code == 422
    assert field in response.text and len(response.content) < 2000


def test_a_representation_past_memory_fails_with_the_bytes_not_a_500(
    client: TestClient, users: dict[str, str], worker: Any, data: Uploaded, settings: Settings
) -> None:
    # A dense Fisher of 4·d² bytes, 2.25 times the memory this host has available.
    hidden = int(1.5 * math.sqrt(available_bytes(torch.device("cpu")) / 4) / 8) + 1
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    arch = {
        "kind": "sequential",
        "layers": [
            {"type": "Linear", "args": [4, hidden]},
            {"type": "Tanh"},
            {"type": "Linear", "args": [hidden, 3]},
        ],
    }
    key = users["alice"]
    roomy = settings.model_copy(update={"max_upload_bytes": 256 * 2**20})
    with TestClient(create_app(roomy)) as big:
        weights = upload(big, key, st_bytes(model.state_dict()))
    spec = _spec(data, arch, representation="dense")
    spec["model"]["weights"] = weights
    response = client.post("/v1/jobs", json=spec, headers=auth(key))
    assert response.status_code == 202, response.text
    job = wait_job(client, key, response.json()["id"])
    assert job["status"] == "failed"
    error = job["error"]
    assert error["type"].endswith("out-of-memory") and error["status"] == 507
    assert error["needed_bytes"] > error["available_bytes"] > 0
    assert error["alternative"] in CHEAPER[1:]  # a representation cheaper than dense
    _still_serving(client, key, data)
