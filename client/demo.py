"""``fimntk demo``: the laptop example of the README, end to end: a small MLP and a DataLoader
shipped with :class:`fimntk.client.Client`, one-shot calls and kept handles, each printed beside the
engine computed in-process, as numbered steps and then one table. Without ``--url`` it starts
``fimntk serve`` in the background on a free port over a fresh data directory
(``~/.cache/fimntk/demo`` by default), whose ``logs/`` folder keeps the server's own output.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

_SIZES = (4, 16, 3)
_N_EXAMPLES = 64
_START_TIMEOUT_S = 120.0


def safetensors_bytes(tensors: dict[str, tuple[list[int], list[float]]]) -> bytes:
    """Serialise float32 tensors as safetensors, without torch.

    Args:
        tensors: ``name -> (shape, flat values)``.
    """
    header: dict[str, object] = {}
    data = bytearray()
    for name, (shape, values) in tensors.items():
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + bytes(data)


@contextlib.contextmanager
def local_server(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Start ``fimntk serve`` on a free port over a fresh ``data_dir``; its output goes to
    ``<data_dir>/logs/serve.log``, so the terminal shows only the demo."""
    key = "fk_" + secrets.token_urlsafe(32)
    with socket.socket() as sock:  # a port free now, for the server to take
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _fresh(data_dir)
    logs = data_dir / "logs"
    logs.mkdir()
    env = {**os.environ, "FIMNTK_ADMIN_KEY": key}
    env.pop("FIMNTK_REDIS_URL", None)
    url = f"http://127.0.0.1:{port}"
    print(f"Starting a local fimntk server on {url} (logs in {logs})", flush=True)
    with (logs / "serve.log").open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fimntk",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_healthy(url, process, logs)
        yield url, key
    finally:
        process.terminate()
        process.wait(timeout=30)


def _fresh(data_dir: Path) -> None:
    """Empty ``data_dir`` if an earlier demo made it; refuse any other non-empty folder."""
    marker = data_dir / ".fimntk-demo"
    if data_dir.is_dir() and any(data_dir.iterdir()) and not marker.exists():
        raise SystemExit(
            f"fimntk demo: {data_dir} is not empty and no earlier demo made it; "
            "give a new or empty --data-dir"
        )
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    marker.touch()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], logs: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"fimntk demo: the local server stopped (exit {process.returncode});"
                f" see {logs / 'serve.log'}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit(
        f"fimntk demo: the local server did not answer within {_START_TIMEOUT_S:.0f}"
        f" s; see {logs / 'serve.log'}"
    )


def run_demo(url: str | None, key: str | None, data_dir: Path | None = None) -> int:
    """Run the demo against ``url`` (or a local server over ``data_dir``).

    Args:
        url: Server URL; ``None`` starts ``fimntk serve`` locally.
        key: API key of ``url`` (default ``FIMNTK_API_KEY``).
        data_dir: Data directory of the local server, emptied first (default
            ``~/.cache/fimntk/demo``); kept afterwards with its logs.

    Returns:
        The exit status.
    """
    if url is None:
        from fimntk.client._config import cache_dir

        data_dir = data_dir or cache_dir() / "demo"
        with local_server(data_dir) as (local_url, local_key):
            status = _demo(local_url, local_key)
        print(f"Server logs: {data_dir / 'logs'}")
        return status
    key = key or os.environ.get("FIMNTK_API_KEY")
    if not key:
        raise SystemExit("fimntk demo: give --key or set FIMNTK_API_KEY")
    return _demo(url, key)


class _Steps:
    """Numbered steps on the terminal, each with its duration."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def run(self, label: str, call: Callable[[], Any]) -> Any:
        self.done += 1
        print(f"[{self.done}/{self.total}] {label} ...", flush=True)
        clock = time.monotonic()
        value = call()
        print(
            f"[{self.done}/{self.total}] {label}: done in {time.monotonic() - clock:.1f} s",
            flush=True,
        )
        return value


def _demo(url: str, key: str) -> int:
    """The README's laptop example, checked against the engine computed in-process."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fimntk.client import Client

    torch.manual_seed(0)
    # .eval() is nn.Module.eval (inference mode), not Python's eval
    model = nn.Sequential(
        nn.Linear(_SIZES[0], _SIZES[1]), nn.Tanh(), nn.Linear(_SIZES[1], _SIZES[2])
    ).eval()
    inputs = torch.randn(_N_EXAMPLES, _SIZES[0])
    loader = DataLoader(TensorDataset(inputs), batch_size=16)
    small = DataLoader(TensorDataset(inputs[:16]), batch_size=16)
    d = sum(p.numel() for p in model.parameters())
    print(
        f"Model: MLP {_SIZES[0]}-{_SIZES[1]}-{_SIZES[2]} ({d} parameters), "
        f"{_N_EXAMPLES} random inputs in batches of 16"
    )
    steps = _Steps(6)
    rows: list[tuple[str, Any, Callable[[Any], Any] | None]] = []
    with Client(url, key, timeout=600) as client:
        print(f"Server {url}: {client.health()['status']}")
        rows.append(
            (
                "trace of F, KFAC",
                steps.run(
                    "trace of the KFAC Fisher", lambda: client.trace(model, loader, rep="kfac")
                ),
                lambda e: e.FIM(model, loader, "kfac").trace(),
            )
        )
        rows.append(
            (
                "θᵀFθ, EKFAC",
                steps.run("θᵀFθ with EKFAC", lambda: client.vTMv(model, loader, rep="ekfac")),
                _ekfac_vTMv(model, loader),
            )
        )
        F = steps.run(
            "dense Fisher, kept on the server",
            lambda: client.FIM(model, loader, representation="dense"),
        )
        rows.append(
            ("trace of F, dense", F.trace(), lambda e: e.FIM(model, loader, "dense").trace())
        )
        rows.append(
            (
                "θᵀFθ, dense",
                steps.run("θᵀFθ on the kept Fisher", F.vTMv),
                lambda e: e.FIM(model, loader, "dense").vTMv(e.PVector.from_model(model)),
            )
        )
        rows.append(
            (
                "‖(F + 1e-3 I)⁻¹θ‖, dense",
                steps.run("solve on the kept Fisher", lambda: F.solve(regul=1e-3).norm()),
                lambda e: (
                    e.FIM(model, loader, "dense")
                    .solve(e.PVector.from_model(model), regul=1e-3)
                    .norm()
                ),
            )
        )
        rows.append(
            (
                "NTK top eigenvalue",
                steps.run(
                    "NTK of 16 examples, top eigenvalues",
                    lambda: client.NTK(model, small).eigenpairs(3)[0][0],
                ),
                lambda e: e.GramMatrix(model, small).eigenpairs(3)[0][0],
            )
        )
    return _report(rows, _engine())


def _report(rows: list[tuple[str, Any, Callable[[Any], Any] | None]], engine: Any) -> int:
    """Print the results as a table beside the engine's in-process values."""
    table = [("quantity", "server", "engine here", "rel. gap")]
    worst = 0.0
    for label, remote, local in rows:
        cells: list[str] = [label, f"{float(remote):.6g}", "-", "-"]
        if engine is not None and local is not None:
            reference = float(local(engine))
            gap = abs(float(remote) - reference) / max(abs(reference), 1e-12)
            worst = max(worst, gap)
            cells[2:] = [f"{reference:.6g}", f"{gap:.1e}"]
        table.append((cells[0], cells[1], cells[2], cells[3]))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    print()
    for i, row in enumerate(table):
        print(
            "  "
            + "  ".join(
                cell.ljust(w) if j == 0 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(row, widths))
            )
        )
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print()
    if engine is None:
        return 0
    if worst > 1e-3:
        print(f"Server and engine disagree (worst relative gap {worst:.1e}).", file=sys.stderr)
        return 1
    print(f"All {len(rows)} results match the engine run here (worst relative gap {worst:.1e}).")
    return 0


def _engine() -> Any:
    try:
        from fimntk import engine
    except ImportError:
        return None
    return engine


def _ekfac_vTMv(model: Any, loader: Any) -> Callable[[Any], Any]:
    def reference(engine: Any) -> Any:
        F = engine.FIM(model, loader, "ekfac")
        F.update_diag(loader)
        return F.vTMv(engine.PVector.from_model(model))

    return reference
