"""Watching the service: ``/readyz``, Prometheus ``/metrics``, JSON logs carrying request and
job ids, and the admin status behind ``fimntk status``."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fimntk.core import logs
from fimntk.core.config import Settings
from tests.service.conftest import ADMIN_KEY, auth, wait_job
from tests.service.models import BATCH, upload_all
from tests.service.prod import wait_for

pytestmark = pytest.mark.timeout(120)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture(scope="module")
def finished_job(
    client: TestClient, users: dict[str, str], worker: subprocess.Popen[bytes]
) -> dict[str, Any]:
    key = users["alice"]
    data = upload_all(client, key)
    spec = {
        "model": data.spec_model,
        "metric": "fim",
        "representation": "diag",
        "dataset": {"blob": data.dataset, "batch_size": BATCH},
        "operations": [{"op": "trace"}],
    }
    client.get("/metrics")  # start counting job durations before the job ends
    job = client.post("/v1/jobs", json=spec, headers=auth(key)).json()
    return wait_job(client, key, job["id"])


def test_readyz(
    client: TestClient,
    finished_job: dict[str, Any],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wait_for(lambda: client.get("/readyz").status_code == 200, 30, 0.5, "ready")
    body = client.get("/readyz").json()
    assert body["status"] == "ready"
    assert {"database", "queue", "storage", "workers"} <= set(body["checks"])
    assert body["checks"]["workers"]["live"] >= 1
    monkeypatch.setattr(client.app.state.fimntk.settings, "min_free_bytes", 2**62)
    full = client.get("/readyz")
    assert full.status_code == 503
    assert "free" in full.json()["checks"]["storage"]["detail"]


def test_metrics(client: TestClient, finished_job: dict[str, Any]) -> None:
    client.get("/v1/jobs/nope", headers=auth(ADMIN_KEY))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    route = (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404"))
    assert samples[("fimntk_http_requests_total", route)] >= 1
    assert (
        samples[
            (
                "fimntk_http_request_duration_seconds_count",
                (("method", "GET"), ("route", "/v1/jobs/{job_id}")),
            )
        ]
        >= 1
    )
    assert ("fimntk_queue_depth", ()) in samples
    assert samples[("fimntk_jobs", (("status", "succeeded"),))] >= 1
    assert (
        samples[("fimntk_workers", (("state", "idle"),))]
        + samples[("fimntk_workers", (("state", "busy"),))]
        >= 1
    )
    assert samples[("fimntk_dependency_up", (("dependency", "redis"),))] == 1
    durations = (("metric", "fim"), ("representation", "diag"), ("status", "succeeded"))
    assert samples[("fimntk_job_duration_seconds_count", durations)] >= 1


def test_admin_status(
    client: TestClient, users: dict[str, str], finished_job: dict[str, Any]
) -> None:
    assert client.get("/v1/admin/status", headers=auth(users["alice"])).status_code == 403
    response = client.get("/v1/admin/status", headers=auth(ADMIN_KEY))
    assert response.status_code == 200, response.text
    status = response.json()
    assert status["queue"]["reachable"] and status["queue"]["depth"] >= 0
    assert status["jobs"]["succeeded"] >= 1
    assert set(status["jobs"]) == {"queued", "running", "succeeded", "failed", "canceled"}
    worker = status["workers"][0]
    assert worker["state"] in ("idle", "busy") and worker["last_heartbeat"]
    assert isinstance(status["recent_failures"], list)
    assert status["reaper"]["max_detection_s"] > 0


def test_request_ids_in_json_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fimntk.service.access"):
        response = client.get("/v1/jobs", headers=auth(ADMIN_KEY) | {"X-Request-ID": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    record = next(r for r in caplog.records if r.name == "fimntk.service.access")
    logs.ContextFilter().filter(record)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["request_id"] == "req-42"
    assert line["route"] == "/v1/jobs" and line["status"] == 200 and "duration_ms" in line
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32


def test_worker_logs_are_json_with_job_ids(
    finished_job: dict[str, Any], settings: Settings
) -> None:
    log = Path(settings.data_dir / "worker.log").read_text().splitlines()
    lines = [json.loads(line) for line in log if line.startswith("{")]
    assert lines, log[:5]
    ends = [
        line
        for line in lines
        if line.get("job_id") == finished_job["id"]
        and line["message"].startswith(f"job {finished_job['id']} ended")
    ]
    assert ends and ends[0]["status"] == "succeeded" and ends[0]["duration_s"] > 0
