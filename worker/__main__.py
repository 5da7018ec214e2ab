"""``python -m fimntk.worker``: one worker configured from ``FIMNTK_*`` variables (the container's
entry point; ``fimntk worker`` offers the same with command-line options)."""

from __future__ import annotations

from fimntk.core.config import Settings
from fimntk.worker.compute_worker import run_worker


def main() -> None:
    """Run a worker on ``FIMNTK_REDIS_URL`` and ``FIMNTK_QUEUE_NAME`` until SIGTERM."""
    settings = Settings()
    if not settings.redis_url:
        raise SystemExit("python -m fimntk.worker: set FIMNTK_REDIS_URL")
    run_worker(settings.redis_url, [settings.queue_name], settings)


if __name__ == "__main__":
    main()
