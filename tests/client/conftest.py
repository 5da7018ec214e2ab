"""Fixtures of the client tests: the real app served over HTTP (uvicorn in a thread) on a
private queue of the real Redis, one real worker process, a user, and a counter of the bytes
the server receives in uploads.

The worker knows the lab builders of :mod:`tests.client.builders`, as a lab's would.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
import redis
import torch
import uvicorn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk.client import Client
from fimntk.core.config import Settings
from fimntk.service.embedded import free_port
from fimntk.service.main import create_app
from tests.service.conftest import REDIS_URL, start_worker, stop_worker

ADMIN_KEY = "client-test-admin-key-0123456789"
BUILDER_MODULES = '["tests.client.builders"]'
N_EXAMPLES = 12
BATCH = 5


class UploadCounter:
    """ASGI middleware counting blob uploads the server receives (requests and body bytes)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests = 0
        self.bytes = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "PUT"
            and scope["path"].startswith("/v1/blobs/")
        ):
            await self.app(scope, receive, send)
            return
        self.requests += 1

        async def counting_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                self.bytes += len(message.get("body", b""))
            return message

        await self.app(scope, counting_receive, send)

    def snapshot(self) -> tuple[int, int]:
        """``(requests, bytes)`` so far."""
        return self.requests, self.bytes


@dataclass
class Server:
    """The running service."""

    url: str
    settings: Settings
    uploads: UploadCounter
    keys: dict[str, str]


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
def server(tmp_path_factory: pytest.TempPathFactory, redis_client: redis.Redis) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("fimntk-client-data")
    settings = Settings(
        data_dir=data_dir,
        redis_url=REDIS_URL,
        queue_name=f"fimntk-client-test-{uuid.uuid4().hex[:12]}",
        admin_key=ADMIN_KEY,
        max_jobs_in_flight=50,
        default_job_timeout_s=120,
        builder_modules=["tests.client.builders"],
        log_format="text",
        log_level="WARNING",
    )
    uploads = UploadCounter(create_app(settings))
    port = free_port()
    config = uvicorn.Config(
        uploads, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    with mock.patch.dict(
        os.environ, {"FIMNTK_BUILDER_MODULES": BUILDER_MODULES, "FIMNTK_LOG_LEVEL": "WARNING"}
    ):
        worker = start_worker(settings, data_dir / "worker.log")
    url = f"http://127.0.0.1:{port}"
    keys = {"admin": ADMIN_KEY}
    with Client(url, ADMIN_KEY, progress=False) as admin:
        keys["alice"] = admin.create_user("alice")["api_key"]
    try:
        yield Server(url, settings, uploads, keys)
    finally:
        stop_worker(worker)
        http.should_exit = True
        thread.join(timeout=20)
        _cleanup_redis(redis_client, settings.queue_name)


def _cleanup_redis(redis_client: redis.Redis, queue_name: str) -> None:
    """Delete the keys of this session's queue and of its jobs, nothing else."""
    doomed = list(redis_client.scan_iter(match=f"rq:*{queue_name}*"))
    if doomed:
        redis_client.delete(*doomed)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, server.keys["alice"], progress=False, timeout=120) as c:
        yield c


@pytest.fixture
def admin(server: Server) -> Iterator[Client]:
    with Client(server.url, server.keys["admin"], progress=False, timeout=120) as c:
        yield c


def make_model(seed: int = 0) -> nn.Sequential:
    """A small MLP, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()


def make_loader(with_targets: bool = True, n: int = N_EXAMPLES) -> DataLoader:
    """Seeded inputs (and class targets), in batches of :data:`BATCH`."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(n, 4, generator=gen)
    targets = torch.randint(0, 3, (n,), generator=gen)
    parts = (inputs, targets) if with_targets else (inputs,)
    return DataLoader(TensorDataset(*parts), batch_size=BATCH)
