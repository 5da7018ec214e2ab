"""``python -m service``: the API of the distributed setup (the container's entry point).

Reads ``FIMNTK_*`` variables (``FIMNTK_REDIS_URL`` is required), logs JSON lines, and serves
on ``FIMNTK_HOST``/``FIMNTK_PORT`` (default ``0.0.0.0:8000``). The schema is migrated on start.
"""

from __future__ import annotations

import os

import uvicorn

from service.config import Settings
from service.logs import configure_logging
from service.main import create_app


def main() -> None:
    """Serve the API until SIGTERM (uvicorn finishes the requests in flight)."""
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    uvicorn.run(app, host=os.environ.get("FIMNTK_HOST", "0.0.0.0"),
                port=int(os.environ.get("FIMNTK_PORT", "8000")), log_config=None,
                access_log=False, timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
