"""End to end against the real Redis with a real worker process: upload, job, poll, result,
compared with the engine computed in-process, for every metric and representation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load

from fimntk import engine
from fimntk.contract.vocabulary import OPERATIONS
from tests.service.conftest import auth, wait_job
from tests.service.models import BATCH, Uploaded, upload_all

pytestmark = pytest.mark.timeout(300)

REPRESENTATIONS = [
    "dense",
    "diag",
    "blockdiag",
    "quasidiag",
    "kfac",
    "ekfac",
    "lowrank",
    "implicit",
    "mixed",
]
CASES = [(m, r) for m in ("fim", "fim_mc", "empirical_fim") for r in REPRESENTATIONS]
CASES.append(("ntk", None))


def _spec(up: Uploaded, metric: str, rep: str | None) -> dict[str, Any]:
    key = rep or "ntk"
    ops: list[dict[str, Any]] = [{"op": "trace"}]
    if "vTMv" in OPERATIONS[key]:
        ops.append({"op": "vTMv", "v": up.v_ntk if metric == "ntk" else up.v})
    if "get_diag" in OPERATIONS[key]:
        ops.append({"op": "get_diag"})
    spec: dict[str, Any] = {
        "model": up.spec_model,
        "metric": metric,
        "operations": ops,
        "dataset": {"blob": up.dataset, "batch_size": BATCH},
    }
    if rep is not None:
        spec["representation"] = rep
    if metric == "fim_mc":
        spec |= {"trials": 2, "seed": 3}
    return spec


def _reference(up: Uploaded, metric: str, rep: str | None) -> Any:
    loader = up.loader()
    if metric == "ntk":
        return engine.GramMatrix(up.model, loader)
    if metric == "fim":
        mat = engine.FIM(up.model, loader, rep)
    elif metric == "fim_mc":
        mat = engine.FIM_MonteCarlo(up.model, loader, rep, trials=2, seed=3)
    else:
        mat = engine.EmpiricalFIM(up.model, loader, rep)
    if rep == "ekfac":
        mat.update_diag(loader)
    return mat


@pytest.fixture(scope="module")
def alice_data(client: TestClient, users: dict[str, str]) -> Uploaded:
    return upload_all(client, users["alice"])


@pytest.fixture(scope="module")
def submitted(
    client: TestClient, users: dict[str, str], worker: Any, alice_data: Uploaded
) -> dict[tuple[str, str | None], str]:
    """Every case submitted at once, so the worker runs them while tests wait."""
    ids = {}
    for metric, rep in CASES:
        response = client.post(
            "/v1/jobs", json=_spec(alice_data, metric, rep), headers=auth(users["alice"])
        )
        assert response.status_code == 202, response.text
        assert response.headers["Location"] == f"/v1/jobs/{response.json()['id']}"
        ids[(metric, rep)] = response.json()["id"]
    return ids


def _download(client: TestClient, key: str, href: str) -> torch.Tensor:
    response = client.get(href, headers=auth(key))
    assert response.status_code == 200
    return load(response.content)["value"]


@pytest.mark.parametrize(("metric", "rep"), CASES, ids=[f"{m}-{r}" for m, r in CASES])
def test_job_matches_engine(
    client: TestClient,
    users: dict[str, str],
    alice_data: Uploaded,
    submitted: dict[tuple[str, str | None], str],
    metric: str,
    rep: str | None,
) -> None:
    key = users["alice"]
    job = wait_job(client, key, submitted[(metric, rep)])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["stage"] == "done"
    assert set(job["timings"]) >= {"load_s", "compute_s", "operations_s"}
    result = client.get(f"/v1/jobs/{job['id']}/result", headers=auth(key)).json()
    reference = _reference(alice_data, metric, rep)
    outputs = {entry["op"]: entry["outputs"] for entry in result["operations"]}
    torch.testing.assert_close(
        torch.tensor(outputs["trace"]["value"]), reference.trace().float(), rtol=1e-4, atol=1e-5
    )
    if "vTMv" in outputs:
        if metric == "ntk":
            v = engine.FVector(alice_data.vector_ntk)
        else:
            v = engine.PVector(
                engine.LayerCollection.from_model(alice_data.model), vector_repr=alice_data.vector
            )
        torch.testing.assert_close(
            torch.tensor(outputs["vTMv"]["value"]), reference.vTMv(v).float(), rtol=1e-4, atol=1e-5
        )
    if "get_diag" in outputs:
        diag = _download(client, key, outputs["get_diag"]["value"]["href"])
        torch.testing.assert_close(diag, reference.get_diag().float(), rtol=1e-4, atol=1e-6)


def test_implicit_offers_what_the_engine_computes(
    client: TestClient, users: dict[str, str], worker: Any, alice_data: Uploaded
) -> None:
    """``solve``, ``norm`` and ``get_diag`` on ``implicit``: the engine computes them, so the
    service accepts them (they were refused with a 422 before the wire contract held the
    operations in one place)."""
    key = users["alice"]
    spec = _spec(alice_data, "fim", "implicit")
    spec["operations"] = [
        {"op": "norm"},
        {"op": "get_diag"},
        {"op": "solve", "v": alice_data.v, "regul": 0.1},
    ]
    response = client.post("/v1/jobs", json=spec, headers=auth(key))
    assert response.status_code == 202, response.text
    job = wait_job(client, key, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    result = client.get(f"/v1/jobs/{job['id']}/result", headers=auth(key)).json()
    outputs = {entry["op"]: entry["outputs"] for entry in result["operations"]}
    reference = _reference(alice_data, "fim", "implicit")
    v = engine.PVector(
        engine.LayerCollection.from_model(alice_data.model), vector_repr=alice_data.vector
    )
    torch.testing.assert_close(
        torch.tensor(outputs["norm"]["value"]), reference.norm().float(), rtol=1e-4, atol=1e-6
    )
    diag = _download(client, key, outputs["get_diag"]["value"]["href"])
    torch.testing.assert_close(diag, reference.get_diag().float(), rtol=1e-4, atol=1e-6)
    solved = _download(client, key, outputs["solve"]["value"]["href"])
    expected = reference.solve(v, regul=0.1).get_flat_representation()
    torch.testing.assert_close(solved, expected.float(), rtol=1e-3, atol=1e-5)
