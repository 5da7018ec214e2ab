"""Bounded load test on loopback: N concurrent clients submitting trivial jobs and polling
their status, against the API under uvicorn (``--api-workers`` processes).

    python -m bench.load                          # 200 clients, then 50, 60 s each
    python -m bench.load --clients 50 --seconds 5
    python -m bench.load --api-workers 1          # one API process (default: cores + 1)

Each client loops: submit a trivial job, then read its status (``GET /v1/jobs/{id}``) every
``--think`` seconds (+-50%, clients starting at random points of the first period, so that they
do not fire in lockstep) until it is terminal, then submit again. Clients speak HTTP/1.1 over
one keep-alive connection each with a few lines of asyncio instead of httpx, which costs the
shared CPU several times less per request.

Reports, for each client count: the count, p50, p99 and max latency of status reads and of
submissions as the clients saw them, the p99 the API measured itself (``inside_api_p99``,
from its Prometheus histogram: the bucket bound; of one process when there are several), the
request rate, every error (non-2xx or transport), the CPU cores used on average by the
generator, the API, the workers and the whole machine (other users included), and how late
the generator's own event loop ran (``generator_loop_lag``; latency measured while the
generator is short of CPU is partly its own). Targets: no errors, p99 status read under
50 ms; a miss says whether the CPU was saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.loopback_stack import ADMIN_KEY, Stack, deployment, make_user, tiny_spec

TARGET_P99_MS = 50.0
_LAG_TICK_S = 0.01


@dataclass
class _Samples:
    """What the clients measured during one run."""

    reads: list[float] = field(default_factory=list)
    submits: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    jobs: set[str] = field(default_factory=set)


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process and of its live descendants (uvicorn's
    worker processes)."""
    seconds = 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        seconds = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                seconds += process_cpu_s(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass  # exited meanwhile
    return seconds


def _server_buckets(stack: Stack) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of the API's request-duration histogram, by route (summed
    over methods); with several API processes, those of the one that answers."""
    text = httpx.get(f"{stack.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "fimntk_http_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                route = f"{sample.labels['method']} {sample.labels['route']}"
                le = float(sample.labels["le"])
                buckets.setdefault(route, {})
                buckets[route][le] = buckets[route].get(le, 0.0) + sample.value
    return buckets


def _server_p99_ms(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]], route: str
) -> str:
    """Upper bound of the bucket holding the 99th percentile of ``route`` between two
    scrapes: the time spent inside the API, without the network or the generator."""
    counts = {le: n - before.get(route, {}).get(le, 0.0) for le, n in after.get(route, {}).items()}
    total = counts.get(float("inf"), 0.0)
    if not total:
        return "n/a"
    le = min(le for le, n in counts.items() if n >= 0.99 * total)
    return f"<= {le * 1000:g} ms"


def _machine_busy_s() -> float:
    """CPU seconds every process of the machine used since boot (other users' included)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": _pct(values, 0.5),
        "p99_ms": _pct(values, 0.99),
        "max_ms": _pct(values, 1.0),
    }


class _Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams, reconnecting after an error.

    A few lines of HTTP instead of ``httpx``: several times less CPU per request, so that the
    generator takes less of the CPU it shares with the server it measures.

    Args:
        url: ``http://host:port`` of the API.
        key: API key sent as bearer token.
    """

    def __init__(self, url: str, key: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self._head = f"Host: {url.removeprefix('http://')}\r\nAuthorization: Bearer {key}\r\n"
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send a request; its status code and body.

        Raises:
            OSError: Connection refused or reset.
            asyncio.IncompleteReadError: The server closed the connection.
            TimeoutError: No complete answer within 30 s.
        """
        try:
            return await asyncio.wait_for(self._exchange(method, path, body), 30)
        except BaseException:
            self.close()
            raise

    async def _exchange(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
        writer.write(f"{method} {path} HTTP/1.1\r\n{self._head}{extra}\r\n".encode() + body)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
        answer = await reader.readexactly(length)
        if "connection: close" in head:
            self.close()
        return int(head.split(" ", 2)[1]), answer

    def close(self) -> None:
        """Drop the connection (the next request opens a new one)."""
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


_FAILURES = (
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    TimeoutError,
    ValueError,
    IndexError,
)


async def _client(
    url: str, key: str, spec: dict[str, object], until: float, think: float, samples: _Samples
) -> None:
    """One client: submit, poll until terminal, again. Starts at a random point of the first
    think time and waits ``think`` +-50% between requests, so that the clients do not send
    their requests in lockstep bursts."""
    body = json.dumps(spec).encode()
    http = _Connection(url, key)
    await asyncio.sleep(random.uniform(0, think))
    try:
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                status, answer = await http.request("POST", "/v1/jobs", body)
            except _FAILURES as exc:
                samples.errors[f"POST {type(exc).__name__}"] += 1
                await asyncio.sleep(think)
                continue
            samples.submits.append(time.perf_counter() - started)
            if status != 202:
                samples.errors[f"POST {status}"] += 1
                await asyncio.sleep(think)
                continue
            job_id = json.loads(answer)["id"]
            samples.jobs.add(job_id)
            while time.monotonic() < until:
                await asyncio.sleep(think * random.uniform(0.5, 1.5))
                started = time.perf_counter()
                try:
                    status, answer = await http.request("GET", f"/v1/jobs/{job_id}")
                except _FAILURES as exc:
                    samples.errors[f"GET {type(exc).__name__}"] += 1
                    continue
                samples.reads.append(time.perf_counter() - started)
                if status != 200:
                    samples.errors[f"GET {status}"] += 1
                elif json.loads(answer)["status"] in ("succeeded", "failed", "canceled"):
                    break
    finally:
        http.close()


async def _loop_lag(until: float, lag: list[float]) -> None:
    """How much later than asked the generator's event loop wakes a sleeper."""
    while time.monotonic() < until:
        started = time.perf_counter()
        await asyncio.sleep(_LAG_TICK_S)
        lag.append(time.perf_counter() - started - _LAG_TICK_S)


async def _gather(
    url: str,
    key: str,
    spec: dict[str, object],
    clients: int,
    seconds: float,
    think: float,
    samples: _Samples,
) -> None:
    until = time.monotonic() + seconds
    await asyncio.gather(
        _loop_lag(until, samples.lag),
        *(_client(url, key, spec, until, think, samples) for _ in range(clients)),
    )


def run(
    stack: Stack, key: str, spec: dict[str, object], clients: int, seconds: float, think: float
) -> dict[str, object]:
    """One load run of ``clients`` clients for ``seconds``; its report."""
    samples = _Samples()
    worker_pids = [w.pid for w in stack.workers]
    api_cpu, workers_cpu = process_cpu_s(stack.api.pid), sum(map(process_cpu_s, worker_pids))
    buckets = _server_buckets(stack)
    machine = _machine_busy_s()
    own_cpu, started = time.process_time(), time.monotonic()
    try:
        asyncio.run(_gather(stack.url, key, spec, clients, seconds, think, samples))
    finally:
        stack.jobs |= samples.jobs
    elapsed = time.monotonic() - started
    own_cpu = time.process_time() - own_cpu
    api_cpu = process_cpu_s(stack.api.pid) - api_cpu
    workers_cpu = sum(map(process_cpu_s, worker_pids)) - workers_cpu
    machine = _machine_busy_s() - machine
    after = _server_buckets(stack)
    requests = len(samples.reads) + len(samples.submits)
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": requests,
        "req_per_s": round(requests / elapsed, 1),
        "status_read": _summary(samples.reads),
        "submit": _summary(samples.submits),
        "errors": dict(samples.errors) or "none",
        "cpu_cores_used": {
            "generator": round(own_cpu / elapsed, 2),
            "api": round(api_cpu / elapsed, 2),
            "workers": round(workers_cpu / elapsed, 2),
            "whole_machine": round(machine / elapsed, 2),
            "of": os.cpu_count(),
        },
        "inside_api_p99": {
            "status_read": _server_p99_ms(buckets, after, "GET /v1/jobs/{job_id}"),
            "submit": _server_p99_ms(buckets, after, "POST /v1/jobs"),
        },
        "generator_loop_lag": {"p50_ms": _pct(samples.lag, 0.5), "p99_ms": _pct(samples.lag, 0.99)},
    }


def _verdict(report: dict[str, object]) -> str:
    """Whether the target was met and, when not, what the machine was doing meanwhile."""
    reads, lag, cpu = report["status_read"], report["generator_loop_lag"], report["cpu_cores_used"]
    assert isinstance(reads, dict) and isinstance(lag, dict) and isinstance(cpu, dict)
    met = reads["p99_ms"] < TARGET_P99_MS and report["errors"] == "none"
    text = (
        f"target (no errors, p99 status read < {TARGET_P99_MS:g} ms) {'met' if met else 'MISSED'}"
    )
    if met:
        return text
    ours = cpu["generator"] + cpu["api"] + cpu["workers"]
    if cpu["whole_machine"] >= 0.9 * cpu["of"]:
        text += (
            f"; the CPU was saturated ({cpu['whole_machine']} of {cpu['of']} cores busy, "
            f"{cpu['whole_machine'] - ours:.2f} of them by Redis, the kernel and processes "
            "outside this benchmark), so requests queued for a core"
        )
    if lag["p99_ms"] >= TARGET_P99_MS / 5:
        text += (
            f"; the generator's own event loop ran up to {lag['p99_ms']} ms late (p99), "
            "so part of the measured latency is the load generator's"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=[200, 50],
        help="client counts, one run each on the same deployment",
    )
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--think", type=float, default=0.5, help="seconds a client waits between its requests"
    )
    parser.add_argument("--workers", type=int, default=1, help="job workers")
    parser.add_argument(
        "--api-workers",
        type=int,
        default=(os.cpu_count() or 1) + 1,
        help="uvicorn API processes (default: cores + 1: a process waiting on "
        "the database or Redis leaves its core to another)",
    )
    args = parser.parse_args()
    with deployment(args.workers, FIMNTK_API_WORKERS=str(args.api_workers)) as stack:
        key, blobs = make_user(stack)
        for clients in args.clients:
            report = run(stack, key, tiny_spec(blobs), clients, args.seconds, args.think)
            print(
                f"--- {clients} clients, {args.api_workers} API process(es), "
                f"{args.workers} worker(s), {os.cpu_count()} CPU cores shared with the "
                "generator"
            )
            for name, value in report.items():
                print(f"{name:>20}: {value}")
            print(f"{'verdict':>20}: {_verdict(report)}", flush=True)


if __name__ == "__main__":
    main()
