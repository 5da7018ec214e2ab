"""Logs as one JSON object per line, carrying the request id and job id of their context.

The API sets :data:`request_id` for each request (from ``X-Request-ID`` or a new one) and the
worker sets :data:`job_id` while a job runs; every record logged meanwhile, by any library,
carries them. :func:`configure_logging` installs the formatter on the root logger.

Example line::

    {"ts": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "fimntk.service.access",
     "message": "GET /v1/jobs/j_1 200", "request_id": "9f...", "job_id": null,
     "method": "GET", "path": "/v1/jobs/j_1", "status": 200, "duration_ms": 3.1}
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)

#: Attributes of every LogRecord; anything else passed in ``extra`` goes into the JSON.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class ContextFilter(logging.Filter):
    """Copy the request and job ids of the current context onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, ids, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "job_id": getattr(record, "job_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in body:
                body[key] = value
        if record.exc_info:
            body["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure_logging(
    log_format: str = "json",
    level: str = "INFO",
    path: Path | None = None,
    console_level: str | None = None,
) -> None:
    """Send every log record to stderr (or to a file), as JSON lines or as text, with the
    context ids.

    Args:
        log_format: ``json`` or ``text``.
        level: Root level.
        path: Write the records to this file (appending) instead of stderr.
        console_level: With ``path``, also show records of this level and above on stderr, as
            short text lines (``fimntk serve`` on a laptop: warnings on the terminal, the rest
            in the data directory).
    """
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr)
        if path is None
        else logging.FileHandler(path, encoding="utf-8")
    )
    handler.addFilter(ContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s job=%(job_id)s] %(message)s"
            )
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    if path is not None and console_level is not None:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(console_level.upper())
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(console)
    root.setLevel(level.upper())
    # RQ and uvicorn install their own handlers; route them through the root one.
    for name in ("rq.worker", "rq", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
