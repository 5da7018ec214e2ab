"""``fimntk worker``: its arguments and its run. The client's command line offers it when the
server extra is installed; this module imports nothing heavy until the command runs.
"""

from __future__ import annotations

import argparse

NAME = "worker"
HELP = "run one worker (one per GPU)"
EXAMPLE = "fimntk worker --redis-url redis://queue-box:6379/0 --device cuda:1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fimntk worker``."""
    parser.add_argument("--redis-url", help="Redis URL (default: FIMNTK_REDIS_URL)")
    parser.add_argument(
        "--queue",
        action="append",
        dest="queues",
        help="queue name, repeatable (default: FIMNTK_QUEUE_NAME)",
    )
    parser.add_argument("--device", help="e.g. cuda:0 (default: FIMNTK_DEVICE, else auto)")
    parser.add_argument("--data-dir", help="data directory (default: FIMNTK_DATA_DIR)")
    parser.add_argument("--name", help="worker name, unique per Redis")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--max-jobs", type=int, help="exit after this many jobs")


def run(args: argparse.Namespace) -> int:
    """Run a worker until it is stopped (see :func:`fimntk.worker.compute_worker.run_worker`)."""
    import logging

    from fimntk.core.config import Settings
    from fimntk.worker.compute_worker import run_worker

    settings = Settings(data_dir=args.data_dir) if args.data_dir else Settings()
    redis_url = args.redis_url or settings.redis_url
    if not redis_url:
        raise SystemExit("fimntk worker: give --redis-url or set FIMNTK_REDIS_URL")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_worker(
        redis_url,
        args.queues or [settings.queue_name],
        settings,
        device=args.device,
        name=args.name,
        burst=args.burst,
        max_jobs=args.max_jobs,
    )
    return 0
