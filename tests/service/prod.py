"""Helpers of the production tests: a private PostgreSQL database, a private redis-server that
can be stopped and restarted, and worker processes with extra settings.

Everything here starts its own processes and databases and removes only those.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis

from fimntk.core.config import Settings
from fimntk.service.embedded import free_port

POSTGRES_ADMIN_URL = os.environ.get(
    "FIMNTK_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REPO = Path(__file__).resolve().parents[2]


def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used by the tests, or ``None`` when it can."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {str(exc).strip()}"
    return None


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database ``fimntk_test_<random>``, dropped afterwards; yields its URL."""
    import psycopg

    name = f"fimntk_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class RedisServer:
    """A ``redis-server`` of the test's own, on a free port, in a private directory.

    Args:
        directory: Working directory (append-only files live there).
        appendonly: Whether to persist with an append-only file.
    """

    def __init__(self, directory: Path, appendonly: bool) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary = binary
        self.directory = directory
        self.appendonly = appendonly
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it answers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
                "--maxmemory-policy",
                "noeviction",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM: with append-only persistence the file is synced)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment of a worker process sharing ``settings``."""
    env = {
        **os.environ,
        "FIMNTK_DATA_DIR": str(settings.data_dir),
        "FIMNTK_DATABASE_URL": settings.resolved_database_url,
        "FIMNTK_REDIS_URL": settings.redis_url or "",
        "FIMNTK_QUEUE_NAME": settings.queue_name,
        "FIMNTK_HEARTBEAT_TTL_S": str(settings.heartbeat_ttl_s),
        "FIMNTK_LOG_FORMAT": settings.log_format,
        "PYTHONPATH": str(REPO),
    }
    if settings.artifact_url:
        env["FIMNTK_ARTIFACT_URL"] = settings.artifact_url
    if settings.s3_endpoint_url:
        env["FIMNTK_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env | extra


def start_worker(settings: Settings, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    """Start ``python -m fimntk.worker`` with ``settings`` (and extra environment)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fimntk.worker"],
            env=worker_env(settings, **extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM a process started here, SIGKILL it past ``timeout``; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def wait_for(predicate: object, timeout: float, interval: float = 0.1, what: str = "") -> None:
    """Poll ``predicate()`` until true, failing the test past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def cleanup_queue(client: redis.Redis, queue_name: str, job_ids: list[str]) -> None:
    """Delete the keys of one queue, its workers' heartbeats and the given jobs."""
    names = list(client.scan_iter(match=f"rq:*{queue_name}*"))
    names += list(client.scan_iter(match=f"fimntk:*{queue_name}*"))
    for job_id in job_ids:
        names += list(client.scan_iter(match=f"rq:*{job_id}*"))
    if names:
        client.delete(*names)
