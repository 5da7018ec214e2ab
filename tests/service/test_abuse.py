"""Issue 19: every class of bad input against real processes, with memory measured.

``fimntk serve`` runs as a child process (the API under uvicorn, its own Redis, a supervised
worker process), driven over HTTP. Each group of bad requests must be answered with a 4xx
problem naming the field (or a job failing with a problem), never a 500, a trace or a path;
afterwards ``/healthz`` answers, a trivial job succeeds, and the resident memory of the API and
of the worker has grown by less than 50 MiB. ``/metrics`` must count no 5xx at the end, a
client that hangs up mid-upload included.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from tests.service.conftest import REPO, digest_of, st_bytes
from tests.service.models import ARCH, make_model

ADMIN = "abuse-admin-key-0123456789"
MIB = 2**20
#: Largest growth of resident memory allowed per group.
MAX_GROWTH = 50 * MIB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _worker_pid(serve_pid: int) -> int | None:
    """The ``fimntk worker`` child of the serve process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == serve_pid and b"worker" in cmdline:
            return int(entry.name)
    return None


class Service:
    """A running ``fimntk serve`` and a user of it."""

    def __init__(self, process: subprocess.Popen[bytes], url: str) -> None:
        self.process = process
        self.http = httpx.Client(base_url=url, timeout=60)
        self.admin = {"Authorization": f"Bearer {ADMIN}"}
        name = f"abuser-{os.getpid()}"
        response = self.http.post("/v1/users", json={"name": name}, headers=self.admin)
        assert response.status_code == 201, response.text
        self.key = {"Authorization": f"Bearer {response.json()['api_key']}"}
        gen = torch.Generator().manual_seed(0)
        self.weights = self.upload(st_bytes(make_model().state_dict()))
        self.dataset = self.upload(
            st_bytes(
                {
                    "inputs": torch.randn(12, 4, generator=gen),
                    "targets": torch.randint(0, 3, (12,), generator=gen),
                }
            )
        )

    def upload(self, body: bytes) -> str:
        digest = digest_of(body)
        response = self.http.put(f"/v1/blobs/{digest}", content=body, headers=self.key)
        assert response.status_code in (200, 201), response.text
        return digest

    def spec(self, architecture: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "model": {"weights": self.weights, "architecture": architecture or ARCH},
            "dataset": {"blob": self.dataset, "batch_size": 4},
            "metric": "fim",
            "representation": "diag",
            "operations": [{"op": "trace"}],
            **extra,
        }

    def wait(self, job_id: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.http.get(f"/v1/jobs/{job_id}", params={"wait": 5}, headers=self.key)
            body = dict(job.json())
            if body["status"] in ("succeeded", "failed", "canceled"):
                return body
        raise AssertionError(f"job {job_id} did not end")

    def worker_pid(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pid = _worker_pid(self.process.pid)
            if pid is not None:
                return pid
            time.sleep(0.2)
        raise AssertionError("no worker process")

    def still_serving(self) -> None:
        assert self.http.get("/healthz").status_code == 200
        response = self.http.post("/v1/jobs", json=self.spec(), headers=self.key)
        assert response.status_code == 202, response.text
        assert self.wait(response.json()["id"])["status"] == "succeeded"

    def group(self, run: Callable[[], None]) -> tuple[int, int]:
        """Run a group of bad requests; the growth of the API's and the worker's memory."""
        self.still_serving()  # the worker has run a job: its baseline includes torch's
        api, worker = self.process.pid, self.worker_pid()
        before = _rss(api), _rss(worker)
        run()
        self.still_serving()
        assert _worker_pid(api) == worker, "the worker died and was replaced"
        return _rss(api) - before[0], _rss(worker) - before[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data_dir = tmp_path_factory.mktemp("abuse")
    port = _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FIMNTK_") or key == "FIMNTK_TEST_REDIS"
    }
    env |= {
        "FIMNTK_ADMIN_KEY": ADMIN,
        "FIMNTK_MAX_UPLOAD_BYTES": str(64 * MIB),
        "PYTHONPATH": str(REPO),
    }
    log = (data_dir / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "fimntk", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, (data_dir / "serve.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "fimntk serve did not become ready"
        time.sleep(0.3)
    try:
        yield Service(process, url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _refused(response: httpx.Response, status: int, field: str | None = None) -> None:
    assert response.status_code == status, response.text[:500]
    assert len(response.content) < 4000  # never an echo of the input
    body = response.json()
    assert "Traceback" not in body.get("detail", "")
    if field is not None:
        assert str(body.get("field", "")).startswith(field), body


def test_layer_and_builder_arguments(service: Service) -> None:
    def run() -> None:
        layers = [
            {"type": "Linear", "args": [32768, 32768], "kwargs": {"device": "cpu"}},
            {"type": "Linear", "args": [8, 3], "kwargs": {"device": "cuda:0"}},
            {"type": "Linear", "args": [8, 3], "kwargs": {"_weight": [1.0]}},
            {"type": "Linear", "args": [10**30, 3]},
            {"type": "GroupNorm", "args": [0, 4]},
            {"type": "Embedding", "args": [10, 3], "kwargs": {"padding_idx": 100}},
            {"type": "Linear", "args": [4, 8], "kwargs": {"junk": "x" * 100_000}},
        ]
        for layer in layers:
            arch = {"kind": "sequential", "layers": [layer]}
            response = service.http.post("/v1/jobs", json=service.spec(arch), headers=service.key)
            _refused(response, 422, "model.architecture.layers[0]")
        nested: list[dict[str, Any]] = [{"type": "Linear", "args": [4, 3]}]
        for _ in range(300):
            nested = [{"type": "Sequential", "layers": nested}]
        arch = {"kind": "sequential", "layers": nested}
        response = service.http.post("/v1/jobs", json=service.spec(arch), headers=service.key)
        _refused(response, 422)
        mlp = {
            "kind": "builder",
            "name": "mlp",
            "kwargs": {"in_features": 4, "hidden": [8] * 40_000, "out_features": 3},
        }
        response = service.http.post("/v1/jobs", json=service.spec(mlp), headers=service.key)
        _refused(response, 422, "model.architecture.kwargs.hidden")
        assert service.http.get("/v1/jobs", headers=service.key).status_code == 200
        assert service.http.get("/v1/jobs", headers=service.admin).status_code == 200

    api, worker = service.group(run)
    assert api < MAX_GROWTH and worker < MAX_GROWTH, (api, worker)


def test_large_bodies_and_strings(service: Service) -> None:
    def run() -> None:
        junk = b"{" + b" " * (50 * MIB) + b"}"
        response = service.http.post(
            "/v1/jobs", content=junk, headers={"content-type": "application/json"}
        )
        _refused(response, 413)
        response = service.http.post(
            "/v1/jobs", json={**service.spec(), "reuse": "x" * 1_000_000}, headers=service.key
        )
        assert response.status_code in (413, 422) and len(response.content) < 4000
        for name in ("bad\x85name", "bad\u2028name", "x" * 10_000):
            response = service.http.post("/v1/users", json={"name": name}, headers=service.admin)
            _refused(response, 422)
        for params in ({"op": "trace"}, {"cursor": "A" * 200}, {"limit": 10**9}):
            response = service.http.get("/v1/jobs", params=params, headers=service.key)
            assert 400 <= response.status_code < 500, response.text
        for field, spec in (
            ("dataset.seed", service.spec(dataset={"blob": service.dataset, "seed": 10**30})),
            ("seed", service.spec(metric="fim_mc", seed=10**30)),
        ):
            response = service.http.post("/v1/jobs", json=spec, headers=service.key)
            assert response.status_code == 422 and field in response.text

    api, worker = service.group(run)
    assert api < MAX_GROWTH and worker < MAX_GROWTH, (api, worker)


def _header_blob(entries: int) -> bytes:
    """A valid safetensors file listing ``entries`` one-element tensors."""
    header = {
        f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        for i in range(entries)
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * entries)


def test_safetensors_headers(service: Service) -> None:
    def run() -> None:
        for i in range(4):  # 100 000 entries each: refused, and nothing of them kept
            digest = service.upload(_header_blob(100_000 + i))
            spec = service.spec()
            spec["model"]["weights"] = digest
            response = service.http.post("/v1/jobs", json=spec, headers=service.key)
            _refused(response, 422, "model.weights")
        meta = json.dumps(
            {"__metadata__": [], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
        ).encode()
        gap = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
        for raw in (meta, gap):
            digest = service.upload(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
            spec = service.spec()
            spec["model"]["weights"] = digest
            response = service.http.post("/v1/jobs", json=spec, headers=service.key)
            _refused(response, 422, "model.weights")

    api, worker = service.group(run)
    assert api < MAX_GROWTH and worker < MAX_GROWTH, (api, worker)


def test_a_client_hanging_up_mid_upload_is_no_server_error(service: Service) -> None:
    def run() -> None:
        body = os.urandom(8 * MIB)
        digest = digest_of(body)
        port = int(str(service.http.base_url).rsplit(":", 1)[1].rstrip("/"))
        with socket.create_connection(("127.0.0.1", port)) as s:
            head = (
                f"PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {service.key['Authorization']}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            s.sendall(head.encode() + body[: 2 * MIB])
            time.sleep(0.5)  # the server is now streaming the body to disk
        response = service.http.head(f"/v1/blobs/{digest}", headers=service.key)
        assert response.status_code == 404  # nothing half-written was kept

    api, worker = service.group(run)
    assert api < MAX_GROWTH and worker < MAX_GROWTH, (api, worker)
    metrics = service.http.get("/metrics", headers=service.admin).text
    errors = [
        line
        for line in metrics.splitlines()
        if line.startswith("fimntk_http_requests_total")
        and 'status="5' in line
        and 'route="/readyz"' not in line  # 503 while the worker started: as it should
    ]
    assert not errors, errors


def test_a_representation_past_memory_is_a_problem_and_the_worker_lives(
    service: Service,
) -> None:
    available = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    hidden = int(1.5 * math.sqrt(available / 4) / 8) + 1  # dense: 2.25× the memory
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    buffer = io.BytesIO(st_bytes(model.state_dict()))
    arch = {
        "kind": "sequential",
        "layers": [
            {"type": "Linear", "args": [4, hidden]},
            {"type": "Tanh"},
            {"type": "Linear", "args": [hidden, 3]},
        ],
    }

    def run() -> None:
        spec = service.spec(arch, representation="dense")
        spec["model"]["weights"] = service.upload(buffer.getvalue())
        response = service.http.post("/v1/jobs", json=spec, headers=service.key)
        assert response.status_code == 202, response.text
        job = service.wait(response.json()["id"])
        assert job["status"] == "failed"
        assert job["error"]["type"].endswith("out-of-memory"), job["error"]
        assert job["error"]["needed_bytes"] > job["error"]["available_bytes"]

    api, worker = service.group(run)
    assert api < MAX_GROWTH and worker < MAX_GROWTH, (api, worker)
