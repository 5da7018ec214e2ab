"""Scale-out: one job on one worker against the same job in shards on two workers.

    python -m bench.scale [--seconds 90] [--kinds kfac ekfac diag ntk]

Starts a loopback deployment (API and workers as processes, each worker one thread:
``OMP_NUM_THREADS=1``; :mod:`bench.loopback_stack`), sizes each job so that one worker takes
about ``--seconds`` (calibrated on a small run), then times submit → succeeded for

* one worker, ``shards=1`` (the job as it ran before sharding), and
* two workers, ``shards=2`` (the NTK: two blocks' factors, then its three upper tiles),

on an MLP 512-1024-1024-10 (d = 1,586,186; the NTK's has one output) with generated inputs.
Targets on 2 idle cores: 1.6× for the additive representations (KFAC, diagonal, NTK) and 1.4×
for EKFAC (two rounds, a reduce and the eigendecompositions in between). Prints a markdown
table and writes ``bench/out/scale.csv``.

Closing note — what to expect for 8 GPUs on 2 boxes, ResNet-50 KFAC factors over 50,000
ImageNet images (:func:`resnet50_model` prints it). With ``N`` examples, ``w`` workers,
``r`` examples/s per GPU, a one-round job takes

.. math::

    T_w = t_q + \\frac{B_{model} + B_{data}/w}{\\beta_{fetch}} + \\frac{N}{w r}
          + \\frac{w\\,B_{partial}}{\\beta_{reduce}} + t_{eig},

against ``T_1 = N/r + t_eig^{(1)}``: the queue round trips ``t_q`` (~0.1 s per stage), each
shard's fetch of the model (ResNet-50: 25.6 M parameters, 102 MB) and of its share of the data
(50,000 × 224² × 3 float32: 30 GB, 3.8 GB per shard at 1.25 GB/s on 10 GbE: 3 s), its
computation, the reduce reading every partial (KFAC factors of ResNet-50: about 180 M numbers,
90 M packed, 720 MB in float64 per shard: 5.8 GB for 8 shards, 4.6 s, plus about 1 s to add)
and the eigendecompositions the final task needs (KFAC ``trace``/``mv`` need none; ``solve``
factors each damped pair serially, ~15 s on one GPU; EKFAC spreads them over the workers by
cost, ~2.5 s). At r ≈ 400 images/s per A100 for KFAC factors, ``T_1`` = 125 s and
``T_8`` ≈ 0.3 + 3.1 + 15.6 + 5.6 = 24.6 s: about 5.1× (64 % efficiency) for the factors, 3.5×
when the final task solves (15 s of serial factorizations on both sides). KAISA reports
82-88 % on 4 GPUs because it all-reduces the factors over NVLink/InfiniBand and keeps the data
local; here, data already on each box and float32 partials (half the reduce bytes) would bring
8 GPUs to about 6.6×.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import math
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save
from torch import nn

from bench.loopback_stack import Stack, deployment, make_user

OUT = Path(__file__).resolve().parent / "out"
WIDTHS = (512, 1024, 1024, 10)
#: The NTK's model has one output: its Gram (n, n) costs about 2.5 k flops per entry to contract
#: (memory-bound with 10 outputs, whose c² entries share one input product).
NTK_WIDTHS = (512, 1024, 1024, 1)
#: Speed-up targets with two workers, by job kind.
TARGETS = {"kfac": 1.6, "diag": 1.6, "ntk": 1.6, "ekfac": 1.4}
#: Shards of the two-worker run, by job kind.
SHARDS = {"kfac": 2, "diag": 2, "ntk": 2, "ekfac": 2}
#: Examples of the calibration run, by job kind (a few seconds on one core).
CALIBRATION = {"kfac": 2000, "diag": 300, "ntk": 2000, "ekfac": 1500}
BATCH = 100
#: Largest NTK: its (1, n, 1, n) float32 Gram is 1 GB at n = 16,000 (held twice while the
#: tiles are mirrored).
MAX_NTK_EXAMPLES = 16_000


def _widths(kind: str) -> tuple[int, ...]:
    return NTK_WIDTHS if kind == "ntk" else WIDTHS


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    widths = _widths(kind)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _architecture(kind: str) -> dict[str, Any]:
    widths = _widths(kind)
    layers: list[dict[str, Any]] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append({"type": "Linear", "args": [a, b]})
        if i < len(widths) - 2:
            layers.append({"type": "ReLU"})
    return {"kind": "sequential", "layers": layers}


def _put(http: httpx.Client, tensors: dict[str, torch.Tensor]) -> str:
    body = save({k: v.contiguous() for k, v in tensors.items()})
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    http.put(f"/v1/blobs/{digest}", content=body).raise_for_status()
    return digest


def _spec(weights: str, dataset: str, kind: str, shards: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"weights": weights, "architecture": _architecture(kind)},
        "dataset": {"blob": dataset, "batch_size": BATCH},
        "metric": "ntk" if kind == "ntk" else "fim",
        "operations": [{"op": "trace"}],
        "shards": shards,
        "timeout_s": 3600,
    }
    if kind != "ntk":
        spec["representation"] = kind
    return spec


def _run(stack: Stack, http: httpx.Client, spec: dict[str, Any]) -> float:
    """Seconds from submit to succeeded."""
    started = time.perf_counter()
    response = http.post("/v1/jobs", json=spec)
    response.raise_for_status()
    job_id = response.json()["id"]
    stack.jobs.add(job_id)
    while True:
        job = http.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            break
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
    return time.perf_counter() - started


def _dataset(http: httpx.Client, n: int) -> str:
    gen = torch.Generator().manual_seed(n)
    return _put(http, {"inputs": torch.randn(n, WIDTHS[0], generator=gen)})


def _sized(kind: str, seconds: float, calibrated_s: float) -> int:
    """Examples for a run of ``seconds``: linear in n, quadratic for the NTK (its tiles)."""
    n0 = CALIBRATION[kind]
    ratio = seconds / max(calibrated_s, 1e-3)
    n = min(n0 * math.sqrt(ratio), MAX_NTK_EXAMPLES) if kind == "ntk" else n0 * ratio
    return max(BATCH * SHARDS[kind], int(n) // (BATCH * SHARDS[kind]) * BATCH * SHARDS[kind])


def measure(kinds: list[str], seconds: float) -> list[dict[str, Any]]:
    """Time each kind with one worker (one shard) and two workers (shards)."""
    rows: list[dict[str, Any]] = []
    with deployment(1) as stack:
        key, _ = make_user(stack)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=stack.url, headers=headers, timeout=120) as http:
            sizes: dict[str, tuple[int, str]] = {}
            for kind in kinds:
                weights = _put(http, dict(_model(kind).state_dict()))
                small = _dataset(http, CALIBRATION[kind])
                calibrated = _run(stack, http, _spec(weights, small, kind, 1))
                n = _sized(kind, seconds, calibrated)
                sizes[kind] = (n, _dataset(http, n))
                one = _run(stack, http, _spec(weights, sizes[kind][1], kind, 1))
                rows.append({"kind": kind, "n": n, "one_worker_s": round(one, 1)})
                print(f"{kind}: n={n}, one worker {one:.1f} s", flush=True)
            stack.add_worker()
            for row in rows:
                kind = row["kind"]
                weights = _put(http, dict(_model(kind).state_dict()))
                spec = _spec(weights, sizes[kind][1], kind, SHARDS[kind])
                two = _run(stack, http, spec)
                row |= {
                    "shards": SHARDS[kind],
                    "two_workers_s": round(two, 1),
                    "speedup": round(row["one_worker_s"] / two, 2),
                    "target": TARGETS[kind],
                }
                print(f"{kind}: two workers {two:.1f} s", flush=True)
    return rows


def resnet50_model(
    gpus: int = 8,
    examples: int = 50_000,
    rate: float = 400.0,
    fetch_gb_s: float = 1.25,
    partial_gb: float = 0.72,
    eig_serial_s: float = 15.0,
) -> dict[str, float]:
    """The speed-up model of the module docstring for ResNet-50 KFAC factors.

    Returns:
        Seconds on one GPU, on ``gpus`` GPUs (factors only, and with a serial solve), and the
        speed-ups.
    """
    model_gb = 25.6e6 * 4 / 1e9
    data_gb = examples * 224 * 224 * 3 * 4 / 1e9
    compute = examples / rate
    fetch = (model_gb + data_gb / gpus) / fetch_gb_s
    reduce = gpus * partial_gb / fetch_gb_s + 1.0
    sharded = 0.3 + fetch + compute / gpus + reduce
    return {
        "one_gpu_s": round(compute, 1),
        "sharded_s": round(sharded, 1),
        "speedup": round(compute / sharded, 2),
        "speedup_with_serial_solve": round((compute + eig_serial_s) / (sharded + eig_serial_s), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="one-worker time per job")
    parser.add_argument("--kinds", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    args = parser.parse_args()
    rows = measure(args.kinds, args.seconds)
    print("\n| job | n | shards | 1 worker (s) | 2 workers (s) | speed-up | target |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        met = "met" if r["speedup"] >= r["target"] else "missed"
        print(
            f"| {r['kind']} | {r['n']} | {r['shards']} | {r['one_worker_s']} | "
            f"{r['two_workers_s']} | {r['speedup']}× | {r['target']}× ({met}) |"
        )
    print(f"\nResNet-50 KFAC, 8 GPUs on 2 boxes (model): {resnet50_model()}")
    OUT.mkdir(exist_ok=True)
    with (OUT / "scale.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
