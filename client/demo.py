"""``fimntk demo``: the laptop example of the README, end to end: a small MLP and a DataLoader
shipped with :class:`client.Client`, one-shot calls and kept handles, each printed beside the
engine computed in-process. Without ``--url`` it starts ``fimntk serve`` in the background on a
free port with a temporary data directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

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
    """The README's laptop example, checked against the engine computed in-process."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from client import Client

    torch.manual_seed(0)
    # .eval() is nn.Module.eval (inference mode), not Python's eval
    model = nn.Sequential(nn.Linear(_SIZES[0], _SIZES[1]), nn.Tanh(),
                          nn.Linear(_SIZES[1], _SIZES[2])).eval()
    inputs = torch.randn(_N_EXAMPLES, _SIZES[0])
    loader = DataLoader(TensorDataset(inputs), batch_size=16)
    small = DataLoader(TensorDataset(inputs[:16]), batch_size=16)
    rows: list[tuple[str, Any, Callable[[Any], Any] | None]] = []
    with Client(url, key, timeout=600) as client:
        print(f"server {url}: {client.health()['status']}")
        rows.append(("trace, kfac", client.trace(model, loader, rep="kfac"),
                     lambda e: e.FIM(model, loader, "kfac").trace()))
        rows.append(("vTMv(θ), ekfac", client.vTMv(model, loader, rep="ekfac"), _ekfac_vTMv(
            model, loader)))
        F = client.FIM(model, loader, representation="dense")
        print(f"kept {F.representation!r} in job {F.job_id}")
        rows.append(("F.trace()", F.trace(), lambda e: e.FIM(model, loader, "dense").trace()))
        rows.append(("F.vTMv(θ)", F.vTMv(), lambda e: e.FIM(model, loader, "dense").vTMv(
            e.PVector.from_model(model))))
        rows.append(("|F.solve(θ, 1e-3)|", F.solve(regul=1e-3).norm(),
                     lambda e: e.FIM(model, loader, "dense").solve(
                         e.PVector.from_model(model), regul=1e-3).norm()))
        K = client.NTK(model, small)
        rows.append(("NTK top eigenvalue", K.eigenpairs(3)[0][0],
                     lambda e: e.GramMatrix(model, small).eigenpairs(3)[0][0]))
    engine = _engine()
    width = max(len(label) for label, _, _ in rows)
    worst = 0.0
    for label, remote, local in rows:
        line = f"  {label:<{width}}  server {float(remote):.6g}"
        if engine is not None and local is not None:
            reference = float(local(engine))
            gap = abs(float(remote) - reference) / max(abs(reference), 1e-12)
            worst = max(worst, gap)
            line += f"   engine in-process {reference:.6g}   rel. gap {gap:.1e}"
        print(line)
    if engine is not None and worst > 1e-3:
        print(f"server and engine disagree (relative gap {worst:.1e})", file=sys.stderr)
        return 1
    return 0


def _engine() -> Any:
    try:
        import engine
    except ImportError:
        return None
    return engine


def _ekfac_vTMv(model: Any, loader: Any) -> Callable[[Any], Any]:
    def reference(engine: Any) -> Any:
        F = engine.FIM(model, loader, "ekfac")
        F.update_diag(loader)
        return F.vTMv(engine.PVector.from_model(model))

    return reference
