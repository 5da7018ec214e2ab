"""``python -m fimntk.service``: the API of the distributed setup (the container's entry point).

Reads ``FIMNTK_*`` variables (``FIMNTK_REDIS_URL`` is required), logs JSON lines, and serves
on ``FIMNTK_HOST``/``FIMNTK_PORT`` (default ``0.0.0.0:8000``). The schema is migrated on start.
"""

from __future__ import annotations

import os

import uvicorn
from fastapi import FastAPI

from fimntk.service.config import Settings
from fimntk.service.logs import configure_logging
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
    options = {
        "host": os.environ.get("FIMNTK_HOST", "0.0.0.0"),
        "port": int(os.environ.get("FIMNTK_PORT", "8000")),
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 30,
    }
    if workers > 1:
        uvicorn.run("fimntk.service.__main__:app", factory=True, workers=workers, **options)
    else:
        uvicorn.run(app(), **options)


if __name__ == "__main__":
    main()
