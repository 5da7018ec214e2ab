"""``python -m fimntk.service``: the API of the distributed setup (the container's entry point).

Reads ``FIMNTK_*`` variables (``FIMNTK_REDIS_URL`` is required), logs JSON lines, and serves
on ``FIMNTK_HOST``/``FIMNTK_PORT`` (default ``0.0.0.0:8000``). The schema is migrated on start.
"""

from __future__ import annotations

import os

import uvicorn
from fastapi import FastAPI

from fimntk.core.config import Settings
from fimntk.core.logs import configure_logging
from fimntk.service.main import create_app


def app() -> FastAPI:
    """The app of one API process, logging configured (uvicorn's factory with ``--workers``)."""
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    return create_app(settings)


def main() -> None:
    """Serve the API until SIGTERM (uvicorn finishes the requests in flight).

    ``FIMNTK_API_WORKERS`` (default 1) API processes share the port; each runs a reaper, and
    a revoked key stops working in the other processes within a few seconds (their key
    caches expire).
    """
    workers = int(os.environ.get("FIMNTK_API_WORKERS", "1"))
    host = os.environ.get("FIMNTK_HOST", "0.0.0.0")
    port = int(os.environ.get("FIMNTK_PORT", "8000"))
    target: str | FastAPI = "fimntk.service.__main__:app" if workers > 1 else app()
    uvicorn.run(
        target,
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
