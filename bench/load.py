"""Bounded load test on loopback: N concurrent clients submitting trivial jobs and polling
their status, against the API under uvicorn with one worker.

    python -m bench.load                      # 200 clients, 60 s
    python -m bench.load --clients 50 --seconds 5

Each client loops: submit a trivial job, then read its status (``GET /v1/jobs/{id}``) every
``--think`` seconds until it is terminal, then submit again. Reports the p50/p99 latency of
status reads and of submissions, the request rate and every error (non-2xx or transport).
Targets: no errors, p99 status read under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter

import httpx

from bench._stack import deployment, make_user, tiny_spec


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _client(url: str, key: str, spec: dict[str, object], until: float, think: float,
                  reads: list[float], submits: list[float], errors: Counter[str],
                  jobs: set[str]) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30,
                                 limits=limits) as http:
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                response = await http.post("/v1/jobs", json=spec)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                continue
            submits.append(time.perf_counter() - started)
            if response.status_code != 202:
                errors[f"POST {response.status_code}"] += 1
                await asyncio.sleep(think)
                continue
            job_id = response.json()["id"]
            jobs.add(job_id)
            while time.monotonic() < until:
                await asyncio.sleep(think)
                started = time.perf_counter()
                try:
                    response = await http.get(f"/v1/jobs/{job_id}")
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                reads.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors[f"GET {response.status_code}"] += 1
                elif response.json()["status"] in ("succeeded", "failed", "canceled"):
                    break


async def _run(url: str, key: str, spec: dict[str, object], clients: int, seconds: float,
               think: float, jobs: set[str]) -> dict[str, object]:
    reads: list[float] = []
    submits: list[float] = []
    errors: Counter[str] = Counter()
    until = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.gather(*(_client(url, key, spec, until, think, reads, submits, errors, jobs)
                           for _ in range(clients)))
    elapsed = time.monotonic() - started
    return {"clients": clients, "seconds": round(elapsed, 1),
            "requests": len(reads) + len(submits),
            "req_per_s": round((len(reads) + len(submits)) / elapsed, 1),
            "status_read_p50_ms": round(_pct(reads, 0.5), 1),
            "status_read_p99_ms": round(_pct(reads, 0.99), 1),
            "submit_p50_ms": round(_pct(submits, 0.5), 1),
            "submit_p99_ms": round(_pct(submits, 0.99), 1),
            "mean_read_ms": round(statistics.fmean(reads) * 1000, 1) if reads else None,
            "jobs_submitted": len(submits), "errors": dict(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--think", type=float, default=0.5,
                        help="seconds a client waits between its requests")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with deployment(args.workers) as stack:
        key, blobs = make_user(stack)
        jobs: set[str] = set()
        report = asyncio.run(_run(stack.url, key, tiny_spec(blobs), args.clients, args.seconds,
                                  args.think, jobs))
        stack.jobs |= jobs
    for name, value in report.items():
        print(f"{name:>20}: {value}")


if __name__ == "__main__":
    main()
