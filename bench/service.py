"""Service overhead benchmark, on loopback against real API and worker processes.

    python -m bench.service                    # everything
    python -m bench.service --skip-upload      # no 1 GB file
    python -m bench.service --only-upload      # only the 1 GB upload

1. Submit-to-result overhead of a trivial job (the diagonal FIM trace of a 51-parameter MLP on
   12 examples) with a warm worker: median wall time of POST + long-poll GET + GET result,
   minus the median time of the same computation in-process. Target: under 50 ms.
2. Trivial jobs per second with 1 and 2 workers (``--jobs`` submitted at once, time until all
   are terminal).
3. Upload of a 1 GB safetensors file: MB/s against the disk's own write speed (1 GB written
   and fsynced in 1 MiB blocks, after the test file itself was fsynced so that its writeback
   does not slow the probe), the API's peak RSS before and after, and the CPU seconds the API
   and the client spent. The client sends 4 MiB chunks, as ``client`` does. Targets: at least
   half the disk's speed, flat memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import struct
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.loopback_stack import deployment, make_user, tiny_spec
from fimntk import engine

MIB = 1024**2
UPLOAD_CHUNK = 4 * MIB


def _in_process_ms(runs: int) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(12, 4)), batch_size=12
    )
    times = []
    for _ in range(runs + 3):
        started = time.perf_counter()
        engine.FIM(model, data, "diag").trace()
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:]) * 1000


def overhead(runs: int) -> dict[str, float]:
    """Median submit-to-result time over loopback, and the in-process time."""
    with deployment(1) as stack:
        key, blobs = make_user(stack)
        headers = {"Authorization": f"Bearer {key}"}
        spec = tiny_spec(blobs)
        times = []
        with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as http:
            for i in range(runs + 3):
                started = time.perf_counter()
                job = http.post("/v1/jobs", json=spec).json()
                stack.jobs.add(job["id"])
                status = http.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
                assert status["status"] == "succeeded", status
                http.get(f"/v1/jobs/{job['id']}/result").raise_for_status()
                if i >= 3:  # warm-up: model cache, connections
                    times.append(time.perf_counter() - started)
    service_ms = statistics.median(times) * 1000
    local_ms = _in_process_ms(runs)
    return {
        "service_median_ms": round(service_ms, 1),
        "in_process_median_ms": round(local_ms, 2),
        "overhead_median_ms": round(service_ms - local_ms, 1),
        "service_p90_ms": round(sorted(times)[int(0.9 * len(times))] * 1000, 1),
    }


def throughput(workers: int, jobs: int) -> float:
    """Trivial jobs per second with ``workers`` workers."""
    with deployment(workers) as stack:
        key, blobs = make_user(stack)
        headers = {"Authorization": f"Bearer {key}"}
        spec = tiny_spec(blobs)
        with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as http:
            started = time.perf_counter()
            ids = [http.post("/v1/jobs", json=spec).json()["id"] for _ in range(jobs)]
            stack.jobs |= set(ids)
            for job_id in ids:
                status = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
                assert status["status"] == "succeeded", status
            elapsed = time.perf_counter() - started
    return round(jobs / elapsed, 1)


def _write_safetensors(path: Path, size: int) -> str:
    """A safetensors file of about ``size`` bytes (one float32 tensor), written in 1 MiB
    blocks; its digest."""
    n = size // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    header += " " * (-len(header) % 8)
    hasher = hashlib.sha256()
    block = os.urandom(MIB)
    with path.open("wb") as out:
        head = struct.pack("<Q", len(header)) + header.encode()
        out.write(head)
        hasher.update(head)
        left = 4 * n
        while left:
            chunk = block[: min(MIB, left)]
            out.write(chunk)
            hasher.update(chunk)
            left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return "sha256:" + hasher.hexdigest()


def _disk_write_mb_s(directory: Path, size: int) -> float:
    block = os.urandom(MIB)
    path = directory / "disk-probe"
    started = time.perf_counter()
    with path.open("wb") as out:
        for _ in range(size // MIB):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return size / MIB / elapsed


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def upload(size: int) -> dict[str, float]:
    """Upload throughput and the API's peak RSS for a ``size``-byte safetensors file."""
    with deployment(0, FIMNTK_MAX_UPLOAD_BYTES=str(2 * size)) as stack:
        key, _ = make_user(stack)
        headers = {"Authorization": f"Bearer {key}"}
        with tempfile.TemporaryDirectory(dir=stack.data_dir) as tmp:
            path = Path(tmp) / "big.safetensors"
            digest = _write_safetensors(path, size)
            disk = _disk_write_mb_s(stack.data_dir, size)
            rss_before = _rss_kib(stack.api.pid, "VmHWM")

            def body() -> object:
                with path.open("rb") as f:
                    while chunk := f.read(UPLOAD_CHUNK):
                        yield chunk

            api_cpu = _cpu_s(stack.api.pid)
            client_cpu = time.process_time()
            started = time.perf_counter()
            response = httpx.put(
                f"{stack.url}/v1/blobs/{digest}",
                content=body(),
                headers=headers | {"Content-Length": str(path.stat().st_size)},
                timeout=600,
            )
            elapsed = time.perf_counter() - started
            client_cpu = time.process_time() - client_cpu
            api_cpu = _cpu_s(stack.api.pid) - api_cpu
            response.raise_for_status()
            rss_after = _rss_kib(stack.api.pid, "VmHWM")
    return {
        "size_mb": round(size / MIB),
        "upload_mb_s": round(size / MIB / elapsed, 1),
        "disk_write_mb_s": round(disk, 1),
        "api_peak_rss_before_mb": round(rss_before / 1024, 1),
        "api_peak_rss_after_mb": round(rss_after / 1024, 1),
        "api_cpu_s": round(api_cpu, 2),
        "client_cpu_s": round(client_cpu, 2),
        "seconds": round(elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--upload-mb", type=int, default=1024)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--skip-upload", action="store_true", help="leave out the upload")
    only.add_argument("--only-upload", action="store_true", help="run only the upload")
    args = parser.parse_args()
    if not args.only_upload:
        print("overhead:", overhead(args.runs), flush=True)
        for workers in (1, 2):
            print(f"jobs/s with {workers} worker(s):", throughput(workers, args.jobs), flush=True)
    if not args.skip_upload:
        print("upload:", upload(args.upload_mb * MIB), flush=True)


if __name__ == "__main__":
    main()
