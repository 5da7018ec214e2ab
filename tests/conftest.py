"""Test-wide settings: one torch thread (tiny tensors; avoids oversubscribing 2 cores), and the
queue the service tests use.

``FIMNTK_TEST_REDIS=fakeredis`` is the fast lane (``make test-api``): the service and client
tests then run on fakeredis's TCP server, started here in this process, so that the API can be
developed without starting a Redis server. Otherwise they use the Redis at
``FIMNTK_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import pytest
import torch

torch.set_num_threads(1)

_fake_server: Any = None


def pytest_configure(config: pytest.Config) -> None:
    """Start the in-process queue of the fast lane before any test module reads its URL."""
    global _fake_server
    if os.environ.get("FIMNTK_TEST_REDIS") != "fakeredis" or _fake_server is not None:
        return
    from fakeredis import TcpFakeServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _fake_server = TcpFakeServer(("127.0.0.1", port))
    _fake_server.daemon_threads = True
    threading.Thread(target=_fake_server.serve_forever, daemon=True, name="fakeredis").start()
    os.environ["FIMNTK_TEST_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _fake_server is not None:
        _fake_server.shutdown()
        _fake_server.server_close()
