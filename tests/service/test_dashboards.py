"""Dashboards over HTTP with a real worker: labels and step at submission (and their bounds),
scalars and previews stored by the worker, search with ownership, series with downsampling,
label listings, CSV export, and bad filters as 422 problems naming the position."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fimntk.contract.vocabulary import MAX_LABELS
from tests.service.conftest import auth
from tests.service.dashboard_data import STEPS, run_dashboard_jobs
from tests.service.models import N_EXAMPLES

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def jobs(client: TestClient, users: dict[str, str], worker: Any) -> dict[str, Any]:
    """Alice's KFAC and EKFAC jobs over three steps of two runs, an NTK job, and Bob's job."""
    return run_dashboard_jobs(client, users, "dash", ("seed0", "seed1"))


def _submit(client: TestClient, key: str, spec: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json=spec, headers=auth(key))


def _search(client: TestClient, key: str, **body: Any) -> Any:
    return client.post("/v1/results:search", json=body, headers=auth(key))


def test_labels_and_step_on_the_job(
    client: TestClient, users: dict[str, str], jobs: dict[str, Any]
) -> None:
    job = client.get(f"/v1/jobs/{jobs['alice'][0]}", headers=auth(users["alice"])).json()
    assert job["labels"]["run"] == "seed0" and job["step"] == 0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"labels": {f"k{i}": "v" for i in range(MAX_LABELS + 1)}}, "labels"),
        ({"labels": {"bad key": "v"}}, "labels"),
        ({"labels": {"k" * 65: "v"}}, "labels"),
        ({"labels": {"run": "v" * 257}}, "labels"),
        ({"labels": {"run": 3}}, "labels"),
        ({"step": -1}, "step"),
        ({"step": 1.5}, "step"),
    ],
)
def test_label_and_step_bounds(
    client: TestClient, users: dict[str, str], changes: dict[str, Any], field: str
) -> None:
    spec = {
        "model": {
            "weights": "sha256:" + "a" * 64,
            "architecture": {"kind": "builder", "name": "mlp"},
        },
        "metric": "fim",
        "representation": "kfac",
        "dataset": {"name": "x"},
        **changes,
    }
    response = _submit(client, users["alice"], spec)
    assert response.status_code == 422, response.text
    assert response.json()["field"].startswith(field)


def test_search_filters_with_scalars_and_labels(
    client: TestClient, users: dict[str, str], jobs: dict[str, Any]
) -> None:
    body = _search(
        client,
        users["alice"],
        filter="labels.run = 'seed0' AND rep IN ('kfac','ekfac') AND step >= 10",
        order_by=["rep", "step"],
    ).json()
    items = body["items"]
    assert [(r["rep"], r["step"]) for r in items] == [
        ("ekfac", 10),
        ("ekfac", 20),
        ("kfac", 10),
        ("kfac", 20),
    ]
    row = items[0]
    assert row["labels"] == {"experiment": "dash", "run": "seed0", "note": "<b>x</b>'; --"}
    assert row["variant"] == "classif_logits" and row["metric"] == "fim"
    assert row["n"] == N_EXAMPLES
    assert len(_search(client, users["alice"], filter=f"n = {N_EXAMPLES}").json()["items"]) > 0
    assert _search(client, users["alice"], filter=f"n > {N_EXAMPLES}").json()["items"] == []
    for key in (
        "trace",
        "lambda_max",
        "lambda_min",
        "effective_rank",
    ):
        assert key in row["scalars"], row["scalars"]
    assert row["scalars"]["lambda_max"] >= row["scalars"]["lambda_min"]
    trace = row["scalars"]["trace"]
    above = _search(
        client, users["alice"], filter=f"scalars.trace > {trace * 0.999} AND labels.run = 'seed0'"
    ).json()
    assert row["id"] in {r["id"] for r in above["items"]}
    below = _search(
        client, users["alice"], filter=f"scalars.trace < {trace * 0.5} AND id = '{row['id']}'"
    ).json()
    assert below["items"] == []
    hostile = _search(
        client,
        users["alice"],
        filter="labels.note = '<b>x</b>''; --' AND labels.experiment = 'dash'",
    ).json()
    assert len(hostile["items"]) == 12
    like = _search(client, users["alice"], filter="labels.run LIKE 'seed%' AND rep = 'kfac'").json()
    assert len(like["items"]) == 6


def test_search_pages(client: TestClient, users: dict[str, str], jobs: dict[str, Any]) -> None:
    seen: list[str] = []
    token = None
    while True:
        body = _search(
            client,
            users["alice"],
            filter="labels.experiment = 'dash'",
            page_size=5,
            page_token=token,
        ).json()
        seen += [r["id"] for r in body["items"]]
        token = body["next_page_token"]
        if token is None:
            break
    assert sorted(seen) == sorted(jobs["alice"])


def test_ownership_in_search_series_labels_and_previews(
    client: TestClient, users: dict[str, str], jobs: dict[str, Any]
) -> None:
    mine = _search(client, users["bob"], filter="labels.experiment = 'dash'").json()["items"]
    assert [r["id"] for r in mine] == [jobs["bob"]]
    everyone = _search(client, users["admin"], filter="labels.experiment = 'dash'", page_size=500)
    assert {jobs["bob"], *jobs["alice"]} <= {r["id"] for r in everyone.json()["items"]}
    runs = client.get("/v1/labels/run/values", headers=auth(users["bob"])).json()["items"]
    assert runs == []
    series = client.get(
        "/v1/series",
        params={"key": "trace", "filter": "labels.experiment = 'dash'"},
        headers=auth(users["bob"]),
    ).json()
    assert [p[2] for s in series["series"] for p in s["points"]] == [jobs["bob"]]
    other = client.get(
        f"/v1/jobs/{jobs['alice'][0]}/previews/eigenvalues", headers=auth(users["bob"])
    )
    assert other.status_code == 404


def test_series_grouped_and_downsampled(
    client: TestClient, users: dict[str, str], jobs: dict[str, Any]
) -> None:
    params = {
        "key": "trace",
        "x": "step",
        "group_by": "labels.run,rep",
        "filter": "metric = 'fim' AND labels.experiment = 'dash'",
    }
    body = client.get("/v1/series", params=params, headers=auth(users["alice"])).json()
    names = sorted(s["name"] for s in body["series"])
    assert names == ["seed0 · ekfac", "seed0 · kfac", "seed1 · ekfac", "seed1 · kfac"]
    for line in body["series"]:
        assert [p[0] for p in line["points"]] == list(STEPS)
    down = client.get(
        "/v1/series", params={**params, "max_points": 2}, headers=auth(users["alice"])
    ).json()
    for line, full in zip(down["series"], body["series"], strict=True):
        assert len(line["points"]) == 2
        assert line["points"][0][1] == pytest.approx(full["points"][0][1])
        assert line["points"][1][1] == pytest.approx(
            (full["points"][1][1] + full["points"][2][1]) / 2
        )
    rows = client.get(
        "/v1/series", params={**params, "format": "rows"}, headers=auth(users["alice"])
    ).json()
    assert len(rows) == 12 and set(rows[0]) == {"labels.run", "rep", "x", "y", "job_id"}


def test_labels_and_values(client: TestClient, users: dict[str, str], jobs: dict[str, Any]) -> None:
    keys = {
        i["value"]: i["jobs"]
        for i in client.get("/v1/labels", headers=auth(users["alice"])).json()["items"]
    }
    assert keys["run"] >= 13 and keys["experiment"] >= 13
    values = client.get(
        "/v1/labels/run/values", params={"prefix": "seed"}, headers=auth(users["alice"])
    ).json()
    assert [(i["value"], i["jobs"]) for i in values["items"]] == [("seed0", 6), ("seed1", 6)]


def test_previews(client: TestClient, users: dict[str, str], jobs: dict[str, Any]) -> None:
    key = users["alice"]
    eig = client.get(f"/v1/jobs/{jobs['alice'][0]}/previews/eigenvalues", headers=auth(key)).json()
    assert len(eig["values"]) == 3 and eig["values"][0] >= eig["values"][-1]
    density = client.get(
        f"/v1/jobs/{jobs['alice'][0]}/previews/spectral_density", headers=auth(key)
    ).json()
    assert len(density["grid"]) == len(density["density"]) > 0
    layers = client.get(f"/v1/jobs/{jobs['alice'][0]}/previews/layers", headers=auth(key)).json()[
        "layers"
    ]
    assert [entry["kind"] for entry in layers] == ["kfac", "kfac"], layers
    assert len(layers[0]["a"]) == 5 and len(layers[0]["g"]) == 6  # (4 + bias) and 6 outputs
    trace = _search(client, key, filter=f"id = '{jobs['alice'][0]}'").json()["items"][0]["scalars"][
        "trace"
    ]
    assert sum(entry["trace"] for entry in layers) == pytest.approx(trace, rel=1e-4)
    gram = client.get(f"/v1/jobs/{jobs['ntk']}/previews/gram", headers=auth(key)).json()
    assert gram["size"] == 3 * N_EXAMPLES and gram["classes"] == 3
    assert len(gram["cells"]) == 3 * N_EXAMPLES and len(gram["class_block_means"]) == 3
    missing = client.get(f"/v1/jobs/{jobs['ntk']}/previews/layers", headers=auth(key))
    assert missing.status_code == 404 and missing.json()["field"] == "kind"
    bad = client.get(f"/v1/jobs/{jobs['ntk']}/previews/nope", headers=auth(key))
    assert bad.status_code == 422


def test_csv_export(client: TestClient, users: dict[str, str], jobs: dict[str, Any]) -> None:
    response = client.get(
        "/v1/results.csv", params={"filter": "labels.run = 'seed1'"}, headers=auth(users["alice"])
    )
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 6 and {r["labels.run"] for r in rows} == {"seed1"}
    assert float(rows[0]["scalars.trace"]) > 0


@pytest.mark.parametrize(
    ("request_", "field", "words"),
    [
        (
            ("post", "/v1/results:search", {"json": {"filter": "rep = 'a' OR rep = 'b'"}}),
            "filter",
            "position 10",
        ),
        (
            ("post", "/v1/results:search", {"json": {"order_by": ["labels.run"]}}),
            "order_by",
            "cannot order",
        ),
        (("post", "/v1/results:search", {"json": {"page_size": 501}}), "page_size", ""),
        (("post", "/v1/results:search", {"json": {"tags": {}}}), "tags", ""),
        (
            ("get", "/v1/series", {"params": {"key": "trace", "filter": "step = 'x'"}}),
            "filter",
            "position 7",
        ),
        (
            ("get", "/v1/series", {"params": {"key": "trace", "group_by": "nope"}}),
            "group_by",
            "nope",
        ),
        (("get", "/v1/series", {"params": {"key": "trace", "max_points": 0}}), "max_points", ""),
        (("get", "/v1/series", {"params": {"key": "trace", "colour": "red"}}), "colour", "unknown"),
        (("get", "/v1/results.csv", {"params": {"filter": "foo = 1"}}), "filter", "unknown name"),
    ],
)
def test_bad_queries_are_problems(
    client: TestClient,
    users: dict[str, str],
    request_: tuple[str, str, dict[str, Any]],
    field: str,
    words: str,
) -> None:
    method, path, kwargs = request_
    response = client.request(method.upper(), path, headers=auth(users["alice"]), **kwargs)
    assert response.status_code == 422, response.text
    body = response.json()
    assert field in body["field"] and words in body["detail"], body


def test_bad_page_token(client: TestClient, users: dict[str, str]) -> None:
    response = _search(client, users["alice"], page_token="not-a-token")
    assert response.status_code == 400 and response.json()["field"] == "page_token"
