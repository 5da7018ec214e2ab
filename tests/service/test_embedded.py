"""``fimntk serve`` with no Redis configured: queue, worker, SQLite and API on one machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fimntk.client.demo import safetensors_bytes
from fimntk.service.embedded import free_port
from tests.service.conftest import REPO, digest_of

pytestmark = pytest.mark.timeout(180)
KEY = "embedded-admin-key-0123456789"


@pytest.mark.parametrize("queue", ["fakeredis", "redis-server"])
def test_serve_runs_a_job(tmp_path: Path, queue: str) -> None:
    if queue == "redis-server" and not any(
        (Path(p) / "redis-server").exists() for p in os.environ["PATH"].split(os.pathsep)
    ):
        pytest.skip("redis-server not on PATH")
    port = free_port()
    env = {**os.environ, "FIMNTK_ADMIN_KEY": KEY, "PYTHONPATH": str(REPO)}
    env.pop("FIMNTK_REDIS_URL", None)
    env.pop("FIMNTK_DATABASE_URL", None)
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fimntk.client.cli",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--embedded-redis",
            queue,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        ) as client:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.3)
            weights = safetensors_bytes(
                {
                    "0.weight": ([2, 3], [0.1, -0.2, 0.3, 0.4, 0.5, -0.6]),
                    "0.bias": ([2], [0.0, 0.1]),
                }
            )
            data = safetensors_bytes({"inputs": ([4, 3], [float(i) / 7 for i in range(12)])})
            for body in (weights, data):
                assert client.put(f"/v1/blobs/{digest_of(body)}", content=body).is_success
            spec = {
                "model": {
                    "weights": digest_of(weights),
                    "architecture": {
                        "kind": "sequential",
                        "layers": [{"type": "Linear", "args": [3, 2]}],
                    },
                },
                "dataset": {"blob": digest_of(data), "batch_size": 2},
                "metric": "fim",
                "representation": "dense",
                "operations": [{"op": "trace"}],
            }
            job = client.post("/v1/jobs", json=spec)
            assert job.status_code == 202, job.text
            location = job.headers["Location"]
            deadline = time.monotonic() + 90
            while (state := client.get(location, params={"wait": 5}).json())["status"] in (
                "queued",
                "running",
            ):
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            assert state["status"] == "succeeded", state["error"]
            result = client.get(f"{location}/result").json()
            assert result["operations"][0]["outputs"]["value"] > 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) is not None
        log.close()
    assert (tmp_path / "data" / "fimntk.db").exists()
