"""``fimntk serve``: the whole service on one machine with nothing else installed.

Without ``FIMNTK_REDIS_URL`` it starts a local queue (a ``redis-server`` found on ``PATH``,
else fakeredis's embedded TCP server), one worker process, SQLite in the data directory and the
API, then prints the URL and the admin key. Its logs go to ``<data_dir>/logs/`` (``api.log``,
``worker.log``); warnings are also shown on the terminal. With ``FIMNTK_REDIS_URL`` it serves
only the API of the distributed setup, and ``fimntk worker`` runs on each GPU box.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from redis import Redis
from redis.exceptions import RedisError

from fimntk.core.config import Settings
from fimntk.core.logs import configure_logging
from fimntk.service.auth import generate_key
from fimntk.service.main import create_app
from fimntk.service.worker_supervisor import supervised_worker

_log = logging.getLogger(__name__)
_START_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free at the time of the call."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_for_redis(url: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    client = Redis.from_url(url, socket_connect_timeout=1)
    while True:
        try:
            if client.ping():
                client.close()
                return
        except RedisError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"local queue at {url} did not start") from None
        time.sleep(0.1)


@contextlib.contextmanager
def local_redis(data_dir: Path, kind: str = "auto") -> Iterator[str]:
    """Run a local Redis for the queue and yield its URL.

    Args:
        data_dir: Data directory (a ``redis-server`` keeps its files in ``<data_dir>/redis``).
        kind: ``redis-server``, ``fakeredis``, or ``auto`` (the first when on ``PATH``).
    """
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    binary = shutil.which("redis-server")
    if kind == "redis-server" or (kind == "auto" and binary):
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        workdir = data_dir / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            _wait_for_redis(url)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)
        return
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", port))
    server.daemon_threads = True  # connection threads must not hold up the exit
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="fakeredis")
    thread.start()
    try:
        _wait_for_redis(url)
        yield url
    finally:
        server.shutdown()
        server.server_close()


def run_embedded(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: Path | None = None,
    redis_kind: str = "auto",
) -> None:
    """Serve the API; without a configured Redis, also a local queue and a worker.

    Args:
        host: Interface to listen on.
        port: Port to listen on.
        data_dir: Data directory (``FIMNTK_DATA_DIR`` or ``./fimntk-data`` when omitted).
        redis_kind: Local queue to start: ``auto``, ``redis-server`` or ``fakeredis``.
    """
    # uvicorn re-raises SIGTERM after its graceful shutdown: turn it into SystemExit so that
    # the worker and the local queue are stopped on the way out.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    settings = Settings(data_dir=data_dir) if data_dir else Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    admin_key = settings.admin_key or kept_admin_key(settings.data_dir)
    if settings.redis_url:
        configure_logging(settings.log_format, settings.log_level)
        _serve(settings.model_copy(update={"admin_key": admin_key}), host, port, admin_key)
        return
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    configure_logging(
        settings.log_format, settings.log_level, logs / "api.log", console_level="WARNING"
    )
    with local_redis(settings.data_dir, redis_kind) as redis_url:
        embedded = settings.model_copy(update={"redis_url": redis_url, "admin_key": admin_key})
        with supervised_worker(embedded, redis_url, logs / "worker.log"):
            _serve(embedded, host, port, admin_key, logs)


def kept_admin_key(data_dir: Path) -> str:
    """The generated admin key, kept in ``<data_dir>/admin.key`` (mode 0600) and reused by
    every later ``fimntk serve`` on that data directory.

    Args:
        data_dir: The data directory.

    Returns:
        The key read from the file, or a new one written there.
    """
    path = data_dir / "admin.key"
    if path.exists():
        path.chmod(0o600)
        key = path.read_text().strip()
        if key:
            return key
    key = generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(
    settings: Settings, host: str, port: int, admin_key: str, logs: Path | None = None
) -> None:
    app = create_app(settings)
    url = f"http://{host}:{port}"
    print(f"fimntk serving on {url}  (docs: {url}/docs)", flush=True)
    print(f"admin key: {admin_key}", flush=True)
    print(f"data dir: {settings.data_dir.resolve()}", flush=True)
    if logs is not None:
        print(f"logs: {logs.resolve()} (api.log, worker.log; warnings also here)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
