"""Jobs with a real worker: keep and reuse, cancel, idempotency, ownership, listing, and bad
input found at submission (422) or by the worker (failed job with a 422 problem)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from fimntk.core.config import Settings
from tests.service.conftest import assert_problem, auth, st_bytes, upload, wait_job
from tests.service.models import ARCH, BATCH, Uploaded, make_model, upload_all

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def data(client: TestClient, users: dict[str, str]) -> Uploaded:
    return upload_all(client, users["alice"])


def _spec(up: Uploaded, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": up.spec_model,
        "metric": "fim",
        "representation": "kfac",
        "dataset": {"blob": up.dataset, "batch_size": BATCH},
        "operations": [{"op": "trace"}],
    }
    return spec | changes


def _submit(client: TestClient, key: str, spec: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/jobs", json=spec, headers=auth(key) | headers)


# -- keep and reuse --------------------------------------------------------------------------


def test_keep_and_reuse(
    client: TestClient, users: dict[str, str], worker: Any, data: Uploaded
) -> None:
    key = users["alice"]
    first = _submit(client, key, _spec(data, keep=True, representation="dense")).json()
    first = wait_job(client, key, first["id"])
    assert first["status"] == "succeeded" and first["kept"]
    kept = client.get(f"/v1/jobs/{first['id']}/result", headers=auth(key)).json()
    assert kept["representation_artifact"].endswith("/representation")
    assert client.get(kept["representation_artifact"], headers=auth(key)).status_code == 200

    by_id = _submit(
        client,
        key,
        {"reuse": first["id"], "operations": [{"op": "trace"}, {"op": "vTMv", "v": data.v}]},
    )
    assert by_id.status_code == 202, by_id.text
    by_id_job = wait_job(client, key, by_id.json()["id"])
    assert by_id_job["status"] == "succeeded", by_id_job["error"]
    assert by_id_job["reused_from"] == first["id"]
    result = client.get(f"/v1/jobs/{by_id_job['id']}/result", headers=auth(key)).json()
    assert result["reused_from"] == first["id"]
    assert result["operations"][0]["outputs"] == kept["operations"][0]["outputs"]

    identical = _submit(client, key, _spec(data, representation="dense")).json()
    assert identical["reused_from"] == first["id"]
    assert wait_job(client, key, identical["id"])["status"] == "succeeded"

    conflicting = _submit(client, key, {"reuse": first["id"], "metric": "ntk"})
    assert_problem(conflicting, 422, "metric")
    other = _submit(client, users["bob"], {"reuse": first["id"]})
    assert_problem(other, 422, "reuse")


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_queued_and_running(
    client: TestClient, users: dict[str, str], worker: Any, data: Uploaded, settings: Settings
) -> None:
    key = users["alice"]
    big = torch.randn(20_000, 4)
    (settings.datasets_dir / "big.safetensors").write_bytes(st_bytes({"inputs": big}))
    slow = _spec(data, representation="diag", dataset={"name": "big", "batch_size": 1})
    running = _submit(client, key, slow).json()
    deadline = time.monotonic() + 60
    while True:
        job = client.get(f"/v1/jobs/{running['id']}", headers=auth(key)).json()
        if job["status"] == "running" and job["progress"]["done"] > 0:
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["progress"]["total"] == 20_000
    assert job["progress"]["stage"] == "diag"

    queued = _submit(client, key, _spec(data)).json()
    canceled = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=auth(key))
    assert canceled.status_code == 202
    assert canceled.json()["status"] == "canceled"

    stop = client.post(f"/v1/jobs/{running['id']}/cancel", headers=auth(key))
    assert stop.status_code == 202
    started = time.monotonic()
    job = wait_job(client, key, running["id"], timeout=20)
    assert job["status"] == "canceled"
    assert time.monotonic() - started < 10
    assert client.get(f"/v1/jobs/{running['id']}/result", headers=auth(key)).status_code == 409
    again = client.post(f"/v1/jobs/{running['id']}/cancel", headers=auth(key))
    assert again.json()["status"] == "canceled"
    # The worker survives and serves the next job.
    after = _submit(client, key, _spec(data)).json()
    assert wait_job(client, key, after["id"])["status"] == "succeeded"


# -- idempotency -----------------------------------------------------------------------------


def test_idempotent_resubmission(
    client: TestClient, users: dict[str, str], worker: Any, data: Uploaded
) -> None:
    key = users["alice"]
    first = _submit(client, key, _spec(data), **{"Idempotency-Key": "abc-1"})
    assert first.status_code == 202
    second = _submit(client, key, _spec(data), **{"Idempotency-Key": "abc-1"})
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["Location"] == first.headers["Location"]
    different = _submit(
        client, key, _spec(data, representation="diag"), **{"Idempotency-Key": "abc-1"}
    )
    assert_problem(different, 409, "Idempotency-Key")
    # The key is per user.
    bob_data = upload_all(client, users["bob"])
    bob = _submit(client, users["bob"], _spec(bob_data), **{"Idempotency-Key": "abc-1"})
    assert bob.status_code == 202
    assert bob.json()["id"] != first.json()["id"]
    wait_job(client, users["bob"], bob.json()["id"])
    wait_job(client, key, first.json()["id"])


# -- ownership and listing -------------------------------------------------------------------


def test_ownership(client: TestClient, users: dict[str, str], worker: Any, data: Uploaded) -> None:
    alice, bob = users["alice"], users["bob"]
    job = wait_job(
        client,
        alice,
        _submit(client, alice, _spec(data, operations=[{"op": "get_diag"}])).json()["id"],
    )
    assert job["status"] == "succeeded"
    result = client.get(f"/v1/jobs/{job['id']}/result", headers=auth(alice)).json()
    href = result["operations"][0]["outputs"]["value"]["href"]
    for url in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/result", href):
        assert client.get(url, headers=auth(bob)).status_code == 404
        assert client.get(url, headers=auth(users["admin"])).status_code == 200
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(bob)), 404, "job_id")
    # Bob cannot use a blob only Alice uploaded.
    private = upload(client, alice, st_bytes(make_model(seed=99).state_dict()))
    spec = _spec(data, model={"weights": private, "architecture": ARCH})
    assert_problem(_submit(client, bob, spec), 422, "model.weights")
    listed = client.get("/v1/jobs", headers=auth(bob)).json()["items"]
    assert all(item["owner"] != job["owner"] for item in listed)
    everyone = client.get("/v1/jobs", params={"limit": 200}, headers=auth(users["admin"]))
    assert job["id"] in {item["id"] for item in everyone.json()["items"]}


def test_list_filters_and_pagination(
    client: TestClient, users: dict[str, str], worker: Any, data: Uploaded
) -> None:
    key = users["alice"]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, "metric": "fim"}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params, headers=auth(key)).json()
        assert all(item["metric"] == "fim" for item in page["items"])
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) > 3
    kfac = client.get(
        "/v1/jobs",
        params={
            "representation": "kfac",
            "status": "succeeded",
            "model": data.spec_model["weights"],
        },
        headers=auth(key),
    ).json()["items"]
    assert kfac and all(i["representation"] == "kfac" for i in kfac)
    future = client.get(
        "/v1/jobs", params={"created_after": "2999-01-01T00:00:00Z"}, headers=auth(key)
    ).json()
    assert future["items"] == []
    assert_problem(
        client.get("/v1/jobs", params={"cursor": "!!"}, headers=auth(key)), 400, "cursor"
    )


# -- bad input at submission -----------------------------------------------------------------


def test_bad_input_at_submission(client: TestClient, users: dict[str, str], data: Uploaded) -> None:
    key = users["alice"]
    post = lambda spec: _submit(client, key, spec)  # noqa: E731
    bad_layer = {
        **data.spec_model,
        "architecture": {
            "kind": "sequential",
            "layers": [
                {"type": "Linear", "args": [4, 6]},
                {"type": "Sequential", "layers": [{"type": "Evil"}]},
            ],
        },
    }
    assert_problem(
        post(_spec(data, model=bad_layer)), 422, "model.architecture.layers[1].layers[0].type"
    )
    bad_builder = {**data.spec_model, "architecture": {"kind": "builder", "name": "os.system"}}
    assert_problem(post(_spec(data, model=bad_builder)), 422, "model.architecture.name")
    assert_problem(post(_spec(data, dataset={"name": "../etc/passwd"})), 422, "dataset.name")
    assert_problem(post(_spec(data, dataset={"name": "missing"})), 422, "dataset.name")
    assert_problem(
        post(_spec(data, operations=[{"op": "eigenpairs", "k": 2}])), 422, "operations[0].op"
    )
    assert_problem(
        post(_spec(data, metric="ntk", representation=None, operations=[{"op": "get_diag"}])),
        422,
        "operations[0].op",
    )
    assert_problem(
        post(_spec(data, operations=[{"op": "trace"}, {"op": "mv", "v": data.v_ntk}])),
        422,
        "operations[1].v",
    )
    assert_problem(post(_spec(data, operations=[{"op": "frobnicate"}])), 422, "operations[0]")
    truncated = upload(client, key, st_bytes(make_model().state_dict())[:-10])
    assert_problem(
        post(_spec(data, model={**data.spec_model, "weights": truncated})), 422, "model.weights"
    )
    assert_problem(
        post(_spec(data, dataset={"blob": data.spec_model["weights"]})), 422, "dataset.blob"
    )
    assert_problem(post(_spec(data, representation="fancy")), 422, "representation")
    assert_problem(post({"metric": "fim"}), 422, "body")
    assert_problem(post(_spec(data, timeout_s=10**9)), 422, "timeout_s")
    assert_problem(client.get("/v1/jobs/j_nope", headers=auth(key)), 404, "job_id")


# -- bad input found by the worker -----------------------------------------------------------


def _failed(
    client: TestClient, key: str, spec: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    response = _submit(client, key, spec)
    assert response.status_code == 202, response.text
    job = wait_job(client, key, response.json()["id"])
    assert job["status"] == "failed"
    assert not (settings.artifacts_dir / job["id"]).exists()  # nothing half-written
    return job["error"]


def test_bad_input_found_by_worker(
    client: TestClient, users: dict[str, str], worker: Any, data: Uploaded, settings: Settings
) -> None:
    key = users["alice"]
    wrong = {
        "kind": "sequential",
        "layers": [
            {"type": "Linear", "args": [4, 7]},
            {"type": "Tanh"},
            {"type": "Linear", "args": [7, 3]},
        ],
    }
    error = _failed(
        client, key, _spec(data, model={**data.spec_model, "architecture": wrong}), settings
    )
    assert error["status"] == 422 and error["field"] == "model.weights"
    assert "0.weight: shape [6, 4] in weights, [7, 4] in architecture" in error["detail"]
    assert "2.weight" in error["detail"]

    nan_state = make_model().state_dict()
    nan_state["0.bias"][2] = float("nan")
    nan = upload(client, key, st_bytes(nan_state))
    error = _failed(
        client, key, _spec(data, model={"weights": nan, "architecture": ARCH}), settings
    )
    assert error["field"] == "model.weights" and "0.bias" in error["detail"]

    bad_args = {"kind": "sequential", "layers": [{"type": "Linear", "args": ["four", 6]}]}
    response = _submit(
        client, key, _spec(data, model={**data.spec_model, "architecture": bad_args})
    )
    assert response.status_code == 422  # constructor arguments are checked at submit
    assert response.json()["field"] == "model.architecture.layers[0].args[0]"

    error = _failed(
        client,
        key,
        _spec(data, metric="ntk", representation=None, operations=[{"op": "mv", "v": data.v}]),
        settings,
    )
    assert error["field"] == "operations[0].v"
