"""The ``fimntk`` command line: ``serve``, ``worker`` and ``demo``.

``fimntk serve`` runs everything on one machine (see :mod:`service.embedded`); ``fimntk worker``
runs one GPU worker (see :mod:`worker.cli`); ``fimntk demo`` runs a job end to end against a
server (started in the background when no ``--url`` is given).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from service.embedded import run_embedded

    run_embedded(args.host, args.port, Path(args.data_dir) if args.data_dir else None,
                 args.embedded_redis)
    return 0


def _worker(args: argparse.Namespace) -> int:
    import logging

    from service.config import Settings
    from worker.cli import run_worker

    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    redis_url = args.redis_url or settings.redis_url
    if not redis_url:
        raise SystemExit("fimntk worker: give --redis-url or set FIMNTK_REDIS_URL")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_worker(redis_url, args.queues or [settings.queue_name], settings, device=args.device,
               name=args.name, burst=args.burst, max_jobs=args.max_jobs)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from client.demo import run_demo

    return run_demo(args.url, args.key)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fimntk``."""
    parser = argparse.ArgumentParser(prog="fimntk", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run API, queue and worker on this machine")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", help="data directory (default: FIMNTK_DATA_DIR)")
    serve.add_argument("--embedded-redis", choices=["auto", "redis-server", "fakeredis"],
                       default="auto", help="local queue when FIMNTK_REDIS_URL is unset")
    serve.set_defaults(func=_serve)

    worker = commands.add_parser("worker", help="run one worker (one per GPU)")
    worker.add_argument("--redis-url", help="Redis URL (default: FIMNTK_REDIS_URL)")
    worker.add_argument("--queue", action="append", dest="queues",
                        help="queue name, repeatable (default: FIMNTK_QUEUE_NAME)")
    worker.add_argument("--device", help="e.g. cuda:0 (default: FIMNTK_DEVICE, else auto)")
    worker.add_argument("--data-dir", help="data directory (default: FIMNTK_DATA_DIR)")
    worker.add_argument("--name", help="worker name, unique per Redis")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--max-jobs", type=int, help="exit after this many jobs")
    worker.set_defaults(func=_worker)

    demo = commands.add_parser("demo", help="run a demo job end to end")
    demo.add_argument("--url", help="server URL (default: start 'fimntk serve' locally)")
    demo.add_argument("--key", help="API key (default: FIMNTK_API_KEY or the local admin key)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fimntk``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
