"""Prometheus metrics and the per-request middleware (request id, access log, timings).

Served at ``/metrics`` in the text exposition format:

* ``fimntk_http_requests_total{method,route,status}`` and
  ``fimntk_http_request_duration_seconds{method,route}``: one per route template, so job ids
  never become labels.
* ``fimntk_queue_depth``, ``fimntk_jobs{status}``, ``fimntk_workers{state}``,
  ``fimntk_shards_in_flight``,
  ``fimntk_dependency_up{dependency}``: read from Redis and the database at scrape time.
* ``fimntk_job_duration_seconds{metric,representation,status}``: start-to-end time of every
  job finished since the API started, read from the database at scrape time.

Each application owns its registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fimntk.contract.vocabulary import IN_FLIGHT_STATUSES, TERMINAL_STATUSES
from fimntk.core import logs
from fimntk.core.errors import QueueUnavailableError
from fimntk.core.queue import JobQueue
from fimntk.core.shards import shards_in_flight
from fimntk.core.storage.records import RecordStore, utcnow

_access = logging.getLogger("fimntk.service.access")
_STATUSES = (*IN_FLIGHT_STATUSES, *sorted(TERMINAL_STATUSES))
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_JOB_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    7200,
    21600,
    86400,
)


class ServiceMetrics:
    """The metrics of one application.

    Args:
        records: The record store (jobs by status, finished jobs' durations).
        queue: The job queue (depth, live workers).
    """

    def __init__(self, records: RecordStore, queue: JobQueue) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fimntk_http_requests",
            "HTTP requests answered.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "fimntk_http_request_duration_seconds",
            "Time to answer HTTP requests.",
            ("method", "route"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "fimntk_job_duration_seconds",
            "Start-to-end time of finished jobs.",
            ("metric", "representation", "status"),
            buckets=_JOB_BUCKETS,
            registry=None,
        )  # collected by _LiveCollector, after it reads new finished jobs
        self._live = _LiveCollector(records, queue, self)
        self.registry.register(self._live)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


class _LiveCollector(Collector):
    """Gauges read from Redis and the database at each scrape; feeds the job histogram."""

    def __init__(self, records: RecordStore, queue: JobQueue, metrics: ServiceMetrics) -> None:
        self.records = records
        self.queue = queue
        self.metrics = metrics
        self._lock = threading.Lock()
        self._watermark: datetime = utcnow()  # jobs finishing from now on

    def describe(self) -> Iterator[Metric]:
        """Nothing up front: registering must not query Redis or the database."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "fimntk_dependency_up", "Whether a dependency answers.", labels=["dependency"]
        )
        queue_ok = True
        try:
            depth: int | None = self.queue.depth()
            workers = self.queue.live_workers()
        except QueueUnavailableError:
            queue_ok, depth, workers = False, None, {}
        up.add_metric(["redis"], float(queue_ok))
        if depth is not None:
            yield GaugeMetricFamily("fimntk_queue_depth", "Jobs waiting on the queue.", value=depth)
        by_state = GaugeMetricFamily(
            "fimntk_workers", "Live workers (by heartbeat).", labels=["state"]
        )
        for state in ("idle", "busy"):
            by_state.add_metric([state], sum(w.get("state") == state for w in workers.values()))
        yield by_state
        if queue_ok:
            yield GaugeMetricFamily(
                "fimntk_shards_in_flight",
                "Shard tasks of sharded jobs running now (by heartbeat).",
                value=shards_in_flight(workers),
            )
        database_ok = True
        try:
            counts = self.records.count_by_status()
            self._observe_finished()
        except Exception:  # any database failure: report it as down
            database_ok, counts = False, None
        up.add_metric(["database"], float(database_ok))
        yield up
        yield from self.metrics.job_duration.collect()
        if counts is not None:
            jobs = GaugeMetricFamily("fimntk_jobs", "Jobs by status.", labels=["status"])
            for status in _STATUSES:
                jobs.add_metric([status], counts.get(status, 0))
            yield jobs

    def _observe_finished(self) -> None:
        """Put the jobs finished since the last scrape into the duration histogram."""
        with self._lock:
            for job in self.records.finished_since(self._watermark):
                assert job.finished_at is not None
                self._watermark = max(self._watermark, job.finished_at)
                if job.started_at is None:
                    continue
                seconds = (job.finished_at - job.started_at).total_seconds()
                self.metrics.job_duration.labels(
                    job.metric, job.representation or "none", job.status
                ).observe(seconds)


class RequestMiddleware:
    """Give each request an id (``X-Request-ID``, kept when the client sent one), log one JSON
    access line, and count it in the metrics.

    Args:
        app: The ASGI app to wrap.
        metrics: Where requests are counted.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(scope["method"], route, status, seconds)
            if route not in ("/metrics", "/healthz", "/readyz"):
                _access.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={
                        "request_id": rid,
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 2),
                    },
                )
            logs.request_id.reset(token)
