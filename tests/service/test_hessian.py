"""Loss-Hessian jobs (``metric: "hessian"``) through the API and a real worker: trace, vᵀHv and
the top eigenvalues equal the local engine's and a ``torch.func.hessian`` reference in float64;
bad input is a problem naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch.func import functional_call, hessian

from fimntk import engine
from tests.service.conftest import assert_problem, auth, st_bytes, upload, wait_job
from tests.service.models import BATCH, Uploaded, upload_all

pytestmark = pytest.mark.timeout(300)

LOSSES = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y, reduction="sum"),
    "mse": lambda out, y: 0.5 * (out - y).pow(2).sum(),
}
CASES = [
    ("cross_entropy", "dense"),
    ("cross_entropy", "blockdiag"),
    ("cross_entropy", "diag"),
    ("cross_entropy", "implicit"),
    ("mse", "dense"),
    ("mse", "implicit"),
]


@pytest.fixture(scope="module")
def data(client: TestClient, users: dict[str, str]) -> dict[str, Any]:
    """The shared model and classification data, and regression targets ``(n, 3)``."""
    up = upload_all(client, users["alice"])
    regression = torch.randn(up.inputs.shape[0], 3, generator=torch.Generator().manual_seed(5))
    blob = upload(client, users["alice"], st_bytes({"inputs": up.inputs, "targets": regression}))
    return {"up": up, "regression": regression, "regression_blob": blob}


def _targets(data: dict[str, Any], loss: str) -> tuple[torch.Tensor, str]:
    up: Uploaded = data["up"]
    if loss == "mse":
        return data["regression"].double(), data["regression_blob"]
    return up.targets, up.dataset


def _spec(data: dict[str, Any], loss: str, rep: str) -> dict[str, Any]:
    up: Uploaded = data["up"]
    ops: list[dict[str, Any]] = [
        {"op": "vTMv", "v": up.v},
        {"op": "lanczos_eigenpairs", "k": 2, "n_iter": 45},
    ]
    if rep == "implicit":
        ops.append({"op": "hutchinson_trace", "n_samples": 100, "seed": 1})
    else:
        ops += [{"op": "trace"}, {"op": "get_diag"}]
    if rep == "dense":
        ops.append({"op": "eigenpairs", "k": 2})
    return {
        "model": up.spec_model,
        "dataset": {"blob": _targets(data, loss)[1], "batch_size": BATCH},
        "metric": "hessian",
        "representation": rep,
        "loss": loss,
        "dtype": "float64",
        "operations": ops,
    }


def _reference(up: Uploaded, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """``∇²_θ loss(f_θ(X), Y)`` by ``torch.func.hessian`` over the flat parameters, float64."""
    model = copy.deepcopy(up.model).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split([s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return LOSSES[loss](functional_call(model, params, (up.inputs.double(),)), targets)

    return hessian(f)(theta)


def _blocks(up: Uploaded, H: torch.Tensor, rep: str) -> torch.Tensor:
    """The dense reference restricted to what ``rep`` keeps."""
    if rep in ("dense", "implicit"):
        return H
    mask = torch.zeros_like(H, dtype=torch.bool)
    start = 0
    for module in (up.model[0], up.model[2]):
        size = sum(p.numel() for p in module.parameters())
        mask[start : start + size, start : start + size] = True
        start += size
    kept = torch.where(mask, H, torch.zeros_like(H))
    return torch.diag(torch.diagonal(H)) if rep == "diag" else kept


@pytest.fixture(scope="module")
def submitted(
    client: TestClient, users: dict[str, str], worker: Any, data: dict[str, Any]
) -> dict[tuple[str, str], str]:
    ids = {}
    for loss, rep in CASES:
        response = client.post(
            "/v1/jobs", json=_spec(data, loss, rep), headers=auth(users["alice"])
        )
        assert response.status_code == 202, response.text
        ids[(loss, rep)] = response.json()["id"]
    return ids


def _tensor(client: TestClient, key: str, value: dict[str, Any]) -> torch.Tensor:
    from safetensors.torch import load

    response = client.get(value["href"], headers=auth(key))
    assert response.status_code == 200
    return load(response.content)["value"]


@pytest.mark.parametrize(("loss", "rep"), CASES, ids=[f"{loss}-{r}" for loss, r in CASES])
def test_hessian_job_matches_engine_and_torch_func(
    client: TestClient,
    users: dict[str, str],
    data: dict[str, Any],
    submitted: dict[tuple[str, str], str],
    loss: str,
    rep: str,
) -> None:
    key, up = users["alice"], data["up"]
    job = wait_job(client, key, submitted[(loss, rep)])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["stage"] == "done"
    result = client.get(f"/v1/jobs/{job['id']}/result", headers=auth(key)).json()
    out = {entry["op"]: entry["outputs"] for entry in result["operations"]}
    targets = _targets(data, loss)[0]
    H = _blocks(up, _reference(up, targets, loss), rep)
    v = up.vector.double()
    local = engine.Hessian(
        copy.deepcopy(up.model).double(),
        torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(up.inputs.double(), targets), batch_size=BATCH
        ),
        rep,
        loss=LOSSES[loss],
    )
    lc = engine.LayerCollection.from_model(up.model)
    tol = {"rtol": 1e-9, "atol": 1e-10}
    served_vhv = torch.tensor(out["vTMv"]["value"], dtype=torch.float64)
    torch.testing.assert_close(served_vhv, v @ H @ v, **tol)
    torch.testing.assert_close(served_vhv, local.vTMv(engine.PVector(lc, vector_repr=v)), **tol)
    # Largest algebraic eigenvalues (the Hessian is indefinite: not the largest magnitude).
    top = torch.linalg.eigvalsh(H).flip(0)[:2]
    lanczos = _tensor(client, key, out["lanczos_eigenpairs"]["eigenvalues"])
    torch.testing.assert_close(lanczos, top, rtol=1e-6, atol=1e-8)
    if rep == "implicit":
        estimate = out["hutchinson_trace"]
        assert abs(estimate["estimate"] - float(H.trace())) < 5 * estimate["stderr"] + 1e-9
        return
    torch.testing.assert_close(
        torch.tensor(out["trace"]["value"], dtype=torch.float64), H.trace(), **tol
    )
    torch.testing.assert_close(local.trace(), H.trace(), **tol)
    diag = _tensor(client, key, out["get_diag"]["value"])
    torch.testing.assert_close(diag, torch.diagonal(H), **tol)
    if rep == "dense":
        evals = _tensor(client, key, out["eigenpairs"]["eigenvalues"])
        torch.testing.assert_close(evals, top, rtol=1e-9, atol=1e-10)


def test_bad_hessian_input_names_the_field(
    client: TestClient, users: dict[str, str], data: dict[str, Any]
) -> None:
    key, up = users["alice"], data["up"]

    def post(**changes: Any) -> Any:
        spec = _spec(data, "cross_entropy", "dense") | changes
        return client.post("/v1/jobs", json=spec, headers=auth(key))

    assert_problem(post(loss="hinge"), 422, "loss")
    assert_problem(post(loss=None), 422, "loss")
    assert_problem(post(representation="kfac"), 422, "representation")
    assert_problem(post(shards=2), 422, "shards")
    assert_problem(
        post(operations=[{"op": "solve", "v": up.v, "regul": 1e-3}]), 422, "operations[0].op"
    )
    assert_problem(
        post(representation="implicit", operations=[{"op": "trace"}]), 422, "operations[0].op"
    )
    short = upload(client, key, st_bytes({"vector": torch.randn(5)}))
    assert_problem(post(operations=[{"op": "vTMv", "v": short}]), 422, "operations[0].v")
    fim = _spec(data, "cross_entropy", "dense") | {"metric": "fim"}
    assert_problem(client.post("/v1/jobs", json=fim, headers=auth(key)), 422, "loss")


def test_wrong_targets_for_the_loss_fail_naming_the_loss(
    client: TestClient, users: dict[str, str], worker: Any, data: dict[str, Any]
) -> None:
    """Cross-entropy over float (regression) targets: a failed job with a 422 problem."""
    key = users["alice"]
    spec = _spec(data, "cross_entropy", "dense")
    spec["dataset"]["blob"] = data["regression_blob"]
    response = client.post("/v1/jobs", json=spec, headers=auth(key))
    assert response.status_code == 202, response.text
    job = wait_job(client, key, response.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["status"] == 422 and job["error"]["field"] == "loss", job["error"]
