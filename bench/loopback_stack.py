"""A throwaway deployment on loopback for the service benchmarks: the API (``python -m
fimntk.service`` under uvicorn) and workers (``python -m fimntk.worker``) as processes, on a
private queue of the Redis at ``FIMNTK_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``),
SQLite in a temporary directory. Only the processes and keys it creates are removed."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from fimntk.service.embedded import free_port

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-key-0123456789"


@dataclass
class Stack:
    """A running deployment."""

    url: str
    env: dict[str, str]
    data_dir: Path
    api: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    jobs: set[str] = field(default_factory=set)

    def add_worker(self) -> None:
        """Start one more worker and wait until it beats."""
        log = (self.data_dir / f"worker{len(self.workers)}.log").open("ab")
        self.workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "fimntk.worker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                preexec_fn=lambda: os.nice(WORKER_NICE),
            )
        )
        want = len(self.workers)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = httpx.get(
                f"{self.url}/v1/admin/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            ).json()
            if len(status["workers"]) >= want:
                return
            time.sleep(0.2)
        raise RuntimeError("worker did not start")


#: Scheduling niceness of the workers: on a box whose cores the API shares with the workers, the
#: API's short requests go first and the batch computations take the rest (as
#: ``docker-compose.yml`` gives the workers lower CPU shares).
WORKER_NICE = int(os.environ.get("FIMNTK_BENCH_WORKER_NICE", "10"))


@contextlib.contextmanager
def deployment(workers: int = 1, **env: str) -> Iterator[Stack]:
    """Start the API and ``workers`` workers; stop them on exit."""
    redis_url = os.environ.get("FIMNTK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    queue = f"fimntk-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="fimntk-bench-") as tmp:
        data_dir = Path(tmp)
        port = free_port()
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "FIMNTK_DATA_DIR": tmp,
            "FIMNTK_REDIS_URL": redis_url,
            "FIMNTK_QUEUE_NAME": queue,
            "FIMNTK_ADMIN_KEY": ADMIN_KEY,
            "FIMNTK_PORT": str(port),
            "FIMNTK_HOST": "127.0.0.1",
            "FIMNTK_LOG_LEVEL": "WARNING",
            "FIMNTK_MAX_JOBS_IN_FLIGHT": "1000000",
            "FIMNTK_MIN_FREE_BYTES": "0",
            "OMP_NUM_THREADS": "1",
            **env,
        }
        log = (data_dir / "api.log").open("ab")
        api = subprocess.Popen(
            [sys.executable, "-m", "fimntk.service"],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        stack = Stack(f"http://127.0.0.1:{port}", full_env, data_dir, api)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{stack.url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or api.poll() is not None:
                    raise RuntimeError(f"API did not start; see {data_dir / 'api.log'}")
                time.sleep(0.1)
            for _ in range(workers):
                stack.add_worker()
            yield stack
        finally:
            for process in [*stack.workers, api]:
                process.terminate()
            for process in [*stack.workers, api]:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            client = redis.Redis.from_url(redis_url)
            names = [*client.scan_iter(match=f"*{queue}*")]
            names += [f"rq:{kind}:{j}" for j in stack.jobs for kind in ("job", "results")]
            for chunk in range(0, len(names), 1000):
                client.delete(*names[chunk : chunk + 1000])


def make_user(stack: Stack) -> tuple[str, dict[str, str]]:
    """Create a user; its key and the model/dataset digests of a tiny job."""
    import hashlib

    import torch
    from safetensors.torch import save
    from torch import nn

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    key = httpx.post(f"{stack.url}/v1/users", json={"name": "bench"}, headers=admin).json()[
        "api_key"
    ]
    headers = {"Authorization": f"Bearer {key}"}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    blobs = {}
    for name, tensors in (
        ("weights", model.state_dict()),
        ("dataset", {"inputs": torch.randn(12, 4)}),
    ):
        body = save({k: v.contiguous() for k, v in tensors.items()})
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        httpx.put(f"{stack.url}/v1/blobs/{digest}", content=body, headers=headers)
        blobs[name] = digest
    return key, blobs


TINY_ARCH = {
    "kind": "sequential",
    "layers": [
        {"type": "Linear", "args": [4, 6]},
        {"type": "Tanh"},
        {"type": "Linear", "args": [6, 3]},
    ],
}


def tiny_spec(blobs: dict[str, str]) -> dict[str, object]:
    """A trivial job: the trace of the diagonal FIM of a 51-parameter MLP on 12 examples."""
    return {
        "model": {"weights": blobs["weights"], "architecture": TINY_ARCH},
        "metric": "fim",
        "representation": "diag",
        "dataset": {"blob": blobs["dataset"], "batch_size": 12},
        "operations": [{"op": "trace"}],
    }
