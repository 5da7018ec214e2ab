"""Jacobian jobs (``metric: "jacobian"``, the PushForward/PullBack map) through the API and a
real worker: ``jvp``, ``vjp`` and ``to_torch`` equal the ``torch.func`` Jacobian in float64; bad
input is a problem naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from tests import reference
from tests.service.conftest import assert_problem, auth, st_bytes, upload, wait_job
from tests.service.models import BATCH, Uploaded, upload_all

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def data(client: TestClient, users: dict[str, str]) -> dict[str, Any]:
    """The shared model and data, and a function-space vector ``u`` ``(c, n)``."""
    up = upload_all(client, users["alice"])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(up.inputs.double()), batch_size=BATCH
    )
    model = copy.deepcopy(up.model).double()
    jac = reference.jacobian(model, loader).permute(1, 0, 2)  # torch.func, (c, n, d)
    u = torch.randn(jac.shape[:2], generator=torch.Generator().manual_seed(6))
    blob = upload(client, users["alice"], st_bytes({"vector": u}))
    return {"up": up, "jac": jac, "u": u, "u_blob": blob}


def _spec(data: dict[str, Any], rep: str) -> dict[str, Any]:
    up: Uploaded = data["up"]
    ops: list[dict[str, Any]] = [{"op": "jvp", "v": up.v}, {"op": "vjp", "v": data["u_blob"]}]
    if rep == "dense":
        ops.append({"op": "to_torch"})
    return {
        "model": up.spec_model,
        "dataset": {"blob": up.dataset, "batch_size": BATCH},
        "metric": "jacobian",
        "representation": rep,
        "dtype": "float64",
        "operations": ops,
    }


def _tensor(client: TestClient, key: str, value: dict[str, Any]) -> torch.Tensor:
    from safetensors.torch import load

    response = client.get(value["href"], headers=auth(key))
    assert response.status_code == 200
    return load(response.content)["value"]


@pytest.mark.parametrize("rep", ["dense", "implicit"])
def test_jacobian_job_matches_torch_func(
    client: TestClient, users: dict[str, str], worker: Any, data: dict[str, Any], rep: str
) -> None:
    key = users["alice"]
    response = client.post("/v1/jobs", json=_spec(data, rep), headers=auth(key))
    assert response.status_code == 202, response.text
    job = wait_job(client, key, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    result = client.get(f"/v1/jobs/{job['id']}/result", headers=auth(key)).json()
    out = {entry["op"]: entry["outputs"] for entry in result["operations"]}
    jac, tol = data["jac"], {"rtol": 1e-9, "atol": 1e-10}
    v = data["up"].vector.double()
    torch.testing.assert_close(_tensor(client, key, out["jvp"]["value"]), jac @ v, **tol)
    pulled = torch.einsum("kid,ki->d", jac, data["u"].double())
    torch.testing.assert_close(_tensor(client, key, out["vjp"]["value"]), pulled, **tol)
    if rep == "dense":
        torch.testing.assert_close(_tensor(client, key, out["to_torch"]["value"]), jac, **tol)


def test_bad_jacobian_input_names_the_field(
    client: TestClient, users: dict[str, str], data: dict[str, Any]
) -> None:
    key, up = users["alice"], data["up"]

    def post(rep: str = "dense", **changes: Any) -> Any:
        return client.post("/v1/jobs", json=_spec(data, rep) | changes, headers=auth(key))

    assert_problem(post(representation="kfac"), 422, "representation")
    assert_problem(post(shards=2), 422, "shards")
    assert_problem(post(operations=[{"op": "trace"}]), 422, "operations[0].op")
    assert_problem(post("implicit", operations=[{"op": "to_torch"}]), 422, "operations[0].op")
    assert_problem(post(operations=[{"op": "mv", "v": up.v}]), 422, "operations[0].op")
    short = upload(client, key, st_bytes({"vector": torch.randn(5)}))
    assert_problem(post(operations=[{"op": "jvp", "v": short}]), 422, "operations[0].v")
