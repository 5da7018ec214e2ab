"""``fimntk demo``: upload a tiny MLP and a dataset, run a FIM job and an NTK job, print results.

Needs only httpx: the safetensors files are written in pure Python. Without ``--url`` it starts
``fimntk serve`` in the background on a free port with a temporary data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

_SIZES = (4, 16, 3)
_N_EXAMPLES = 64


def safetensors_bytes(tensors: dict[str, tuple[list[int], list[float]]]) -> bytes:
    """Serialise float32 tensors as safetensors, without torch.

    Args:
        tensors: ``name -> (shape, flat values)``.
    """
    header: dict[str, object] = {}
    data = bytearray()
    for name, (shape, values) in tensors.items():
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + bytes(data)


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _mlp_weights(rng: random.Random) -> tuple[bytes, int]:
    tensors = {}
    d = 0
    for i, (a, b) in enumerate(itertools.pairwise(_SIZES)):
        tensors[f"{2 * i}.weight"] = ([b, a], [rng.gauss(0, a**-0.5) for _ in range(a * b)])
        tensors[f"{2 * i}.bias"] = ([b], [0.0] * b)
        d += a * b + b
    return safetensors_bytes(tensors), d


def _upload(client: httpx.Client, body: bytes) -> str:
    digest = _digest(body)
    if client.head(f"/v1/blobs/{digest}").status_code != 200:
        client.put(f"/v1/blobs/{digest}", content=body).raise_for_status()
    return digest


def _run(client: httpx.Client, spec: dict[str, object], label: str) -> dict[str, object]:
    response = client.post("/v1/jobs", json=spec)
    if response.status_code >= 400:
        raise SystemExit(f"{label}: {response.json()}")
    job_url = response.headers["Location"]
    print(f"{label}: queued {job_url}")
    while True:
        job = client.get(job_url, params={"wait": 2}).json()
        p = job["progress"]
        print(f"  {job['status']:<9} {p['stage']:<12} {p['done']}/{p['total']}")
        if job["status"] in ("succeeded", "failed", "canceled"):
            break
    if job["status"] != "succeeded":
        raise SystemExit(f"{label}: {job['error']}")
    result = client.get(f"{job_url}/result").json()
    for entry in result["operations"]:
        print(f"  {entry['op']}: {entry['outputs']}")
    return result


@contextlib.contextmanager
def _local_server() -> Iterator[tuple[str, str]]:
    from service.auth import generate_key
    from service.embedded import free_port

    key = generate_key()
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "FIMNTK_ADMIN_KEY": key}
        env.pop("FIMNTK_REDIS_URL", None)
        process = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "serve", "--port", str(port),
             "--data-dir", data_dir], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                time.sleep(0.3)
            yield url, key
        finally:
            process.terminate()
            process.wait(timeout=30)


def run_demo(url: str | None, key: str | None) -> int:
    """Run the demo against ``url`` (or a local server).

    Returns:
        The exit status.
    """
    if url is None:
        with _local_server() as (local_url, local_key):
            return _demo(local_url, local_key)
    key = key or os.environ.get("FIMNTK_API_KEY")
    if not key:
        raise SystemExit("fimntk demo: give --key or set FIMNTK_API_KEY")
    return _demo(url, key)


def _demo(url: str, key: str) -> int:
    rng = random.Random(0)
    weights, d = _mlp_weights(rng)
    inputs = [rng.gauss(0, 1) for _ in range(_N_EXAMPLES * _SIZES[0])]
    dataset = safetensors_bytes({"inputs": ([_N_EXAMPLES, _SIZES[0]], inputs)})
    vector = safetensors_bytes({"vector": ([d], [rng.gauss(0, 1) for _ in range(d)])})
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        model = {"weights": _upload(client, weights),
                 "architecture": {"kind": "builder", "name": "mlp",
                                  "kwargs": {"in_features": _SIZES[0], "hidden": [_SIZES[1]],
                                             "out_features": _SIZES[2]}}}
        data = {"blob": _upload(client, dataset), "batch_size": 16}
        v = _upload(client, vector)
        _run(client, {"model": model, "dataset": data, "metric": "fim",
                      "representation": "kfac", "keep": True,
                      "operations": [{"op": "trace"}, {"op": "vTMv", "v": v}]}, "FIM (kfac)")
        _run(client, {"model": model, "dataset": {**data, "subset": 16}, "metric": "ntk",
                      "operations": [{"op": "trace"}, {"op": "eigenpairs", "k": 3}]}, "NTK")
    return 0
