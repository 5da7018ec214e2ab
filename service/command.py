"""``fimntk serve``: its arguments and its run. The client's command line offers it when the
server extra is installed; this module imports nothing heavy until the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "serve"
HELP = "run API, queue and worker on this machine"
EXAMPLE = "fimntk serve --port 8000 --data-dir /srv/fimntk"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fimntk serve``."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", help="data directory (default: FIMNTK_DATA_DIR)")
    parser.add_argument(
        "--embedded-redis",
        choices=["auto", "redis-server", "fakeredis"],
        default="auto",
        help="local queue when FIMNTK_REDIS_URL is unset",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until stopped (see :func:`fimntk.service.embedded.run_embedded`)."""
    from fimntk.service.embedded import run_embedded

    data_dir = Path(args.data_dir) if args.data_dir else None
    run_embedded(args.host, args.port, data_dir, args.embedded_redis)
    return 0
