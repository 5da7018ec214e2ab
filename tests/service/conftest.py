"""Fixtures of the service tests: an app on a private queue of the real Redis, real worker
processes, users, and helpers to upload safetensors blobs.

Each session uses its own queue name and data directory, so parallel runs do not collide; at
the end only the keys of that queue and of the jobs it created are deleted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from fimntk.core.config import Settings
from fimntk.service.main import create_app

REDIS_URL = os.environ.get("FIMNTK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_KEY = "test-admin-key-0123456789"
MAX_UPLOAD = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


def st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Safetensors bytes of ``tensors``."""
    return save({k: v.contiguous() for k, v in tensors.items()})


def digest_of(body: bytes) -> str:
    """The blob digest of ``body``."""
    return "sha256:" + hashlib.sha256(body).hexdigest()


def auth(key: str) -> dict[str, str]:
    """Authorization header for ``key``."""
    return {"Authorization": f"Bearer {key}"}


def upload(client: TestClient, key: str, body: bytes) -> str:
    """Upload ``body`` as a blob and return its digest."""
    digest = digest_of(body)
    response = client.put(f"/v1/blobs/{digest}", content=body, headers=auth(key))
    assert response.status_code in (200, 201), response.text
    return digest


def wait_job(client: TestClient, key: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """Long-poll a job until it is terminal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 5}, headers=auth(key)).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str | None]:
    """``None`` (SQLite in the data directory), or with ``FIMNTK_TEST_DATABASE=postgresql`` a
    fresh PostgreSQL database for the session: the whole suite then runs on PostgreSQL."""
    if os.environ.get("FIMNTK_TEST_DATABASE", "sqlite") != "postgresql":
        yield None
        return
    from tests.service.prod import postgres_database, postgres_unavailable

    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(f"FIMNTK_TEST_DATABASE=postgresql but {reason}")
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def settings(
    tmp_path_factory: pytest.TempPathFactory, redis_client: redis.Redis, database_url: str | None
) -> Settings:
    data_dir = tmp_path_factory.mktemp("fimntk-data")
    (data_dir / "datasets").mkdir()
    return Settings(
        data_dir=data_dir,
        redis_url=REDIS_URL,
        queue_name=f"fimntk-test-{uuid.uuid4().hex[:12]}",
        admin_key=ADMIN_KEY,
        max_upload_bytes=MAX_UPLOAD,
        max_jobs_in_flight=50,
        default_job_timeout_s=120,
        database_url=database_url,
    )


@pytest.fixture(scope="session")
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client
    _cleanup_redis(redis_client, settings)


def _cleanup_redis(redis_client: redis.Redis, settings: Settings) -> None:
    """Delete the keys of this session's queue and jobs, nothing else."""
    names = list(redis_client.scan_iter(match=f"rq:*{settings.queue_name}*"))
    names += list(redis_client.scan_iter(match="rq:*j_*"))
    from fimntk.core.storage.records import JobFilter, SqlRecordStore

    records = SqlRecordStore(settings.resolved_database_url)
    ours = {r.id for r in records.list_jobs(JobFilter(), None, 10_000)[0]}
    records.close()
    doomed = [
        n for n in names if settings.queue_name in n.decode() or any(j in n.decode() for j in ours)
    ]
    if doomed:
        redis_client.delete(*doomed)


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """Start ``fimntk worker`` on the session's queue."""
    env = {
        **os.environ,
        "FIMNTK_DATA_DIR": str(settings.data_dir),
        "FIMNTK_DATABASE_URL": settings.resolved_database_url,
        "FIMNTK_REDIS_URL": REDIS_URL,
        "FIMNTK_QUEUE_NAME": settings.queue_name,
        "PYTHONPATH": str(REPO),
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fimntk", "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    """Stop a worker started by :func:`start_worker`."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def worker(settings: Settings, client: TestClient) -> Iterator[subprocess.Popen[bytes]]:
    process = start_worker(settings, settings.data_dir / "worker.log")
    yield process
    stop_worker(process)


@pytest.fixture(scope="session")
def users(client: TestClient) -> dict[str, str]:
    """API keys of users ``alice`` and ``bob``, and of the admin."""
    keys = {"admin": ADMIN_KEY}
    for name in ("alice", "bob"):
        response = client.post("/v1/users", json={"name": name}, headers=auth(ADMIN_KEY))
        assert response.status_code == 201, response.text
        keys[name] = response.json()["api_key"]
    return keys


def assert_problem(response: Any, status: int, field: str) -> dict[str, Any]:
    """A problem+json answer with ``status`` naming ``field``; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["field"] == field, body
    return body
