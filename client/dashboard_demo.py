"""``fimntk demo --dashboard``: fill a server with a small training run and print the URL of
its dashboard.

An MLP (64-32-10) is trained for a few epochs on scikit-learn's digits (or, without
scikit-learn, on synthetic 8×8 digit-like images, said so on the terminal), in two runs of
different seeds. At every checkpoint the KFAC, EKFAC and diagonal Fisher are computed on the
server (trace, top eigenvalues by Lanczos, SLQ spectral density), labelled with the run and
stamped with the step; the last checkpoint also gets an NTK Gram matrix. Then the
dashboard's pages have something to show: dynamics over steps, spectra, per-layer curvature
and the NTK.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any

#: Epochs of training (one checkpoint before training and one after each epoch), and runs.
EPOCHS = 4
SEEDS = (0, 1)
#: Examples the Fisher is computed on, and the NTK (its Gram matrix is 10·n squared).
FISHER_EXAMPLES = 256
NTK_EXAMPLES = 24
_HIDDEN = 32
_OPERATIONS = [
    {"op": "trace"},
    {"op": "lanczos_eigenpairs", "k": 10},
    {"op": "slq_density", "n_probes": 4, "n_iter": 20},
]


def digits() -> tuple[Any, Any, str]:
    """Inputs ``(n, 64)`` in [0, 1], class targets ``(n,)``, and where they come from."""
    import torch

    try:
        datasets = importlib.import_module("sklearn.datasets")
    except ImportError:
        gen = torch.Generator().manual_seed(0)
        templates = torch.rand(10, 64, generator=gen)
        targets = torch.arange(1000) % 10
        inputs = (templates[targets] + 0.3 * torch.randn(1000, 64, generator=gen)).clamp(0, 1)
        return inputs, targets, "synthetic 8x8 digits (install scikit-learn for the real ones)"
    data = datasets.load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return inputs, torch.tensor(data.target), "scikit-learn digits"


def _architecture() -> dict[str, Any]:
    return {
        "kind": "sequential",
        "layers": [
            {"type": "Linear", "args": [64, _HIDDEN]},
            {"type": "Tanh"},
            {"type": "Linear", "args": [_HIDDEN, 10]},
        ],
    }


def fill(client: Any) -> int:
    """Train, checkpoint and submit the jobs; wait for them.

    Returns:
        The number of jobs run.
    """
    import torch
    from safetensors.torch import save
    from torch import nn

    inputs, targets, source = digits()
    print(f"Data: {source}, {len(inputs)} examples; MLP 64-{_HIDDEN}-10, {EPOCHS} epochs")
    sample = client.upload(
        save({"inputs": inputs[:FISHER_EXAMPLES], "targets": targets[:FISHER_EXAMPLES]})
    )
    small = client.upload(
        save({"inputs": inputs[:NTK_EXAMPLES], "targets": targets[:NTK_EXAMPLES]})
    )
    count = 0
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, _HIDDEN), nn.Tanh(), nn.Linear(_HIDDEN, 10))
        optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
        step = 0
        for epoch in range(EPOCHS + 1):
            if epoch:
                for batch in torch.randperm(len(inputs)).split(32):
                    optimiser.zero_grad()
                    nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
                    optimiser.step()
                    step += 1
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            weights = client.upload(save(state))
            model_spec = {"weights": weights, "architecture": _architecture()}
            with client.labels(experiment="digits-demo", run=f"seed{seed}", step=step):
                jobs = [
                    client.submit(
                        {
                            "model": model_spec,
                            "dataset": {"blob": sample, "batch_size": 64},
                            "metric": "fim",
                            "representation": rep,
                            "operations": _OPERATIONS,
                        }
                    )
                    for rep in ("kfac", "ekfac", "diag")
                ]
                if epoch == EPOCHS:
                    ntk = {
                        "model": model_spec,
                        "dataset": {"blob": small, "batch_size": NTK_EXAMPLES},
                        "metric": "ntk",
                        "operations": [{"op": "to_torch"}, {"op": "trace"}],
                    }
                    jobs.append(client.submit(ntk))
            for job in jobs:
                done = client.wait(job["id"])
                if done["status"] != "succeeded":
                    raise SystemExit(f"fimntk demo: job {job['id']} {done['status']}: {done}")
            count += len(jobs)
            print(f"run seed{seed}, step {step}: {len(jobs)} jobs done", flush=True)
    return count


def run_dashboard_demo(url: str | None, key: str | None, data_dir: Path | None) -> int:
    """Fill ``url`` (or a local server kept running until Ctrl-C) and print the dashboard URL.

    Returns:
        The exit status.
    """
    from fimntk.client import Client
    from fimntk.client.demo import local_server

    if url is not None:
        key = key or os.environ.get("FIMNTK_API_KEY")
        if not key:
            raise SystemExit("fimntk demo: give --key or set FIMNTK_API_KEY")
        with Client(url, key, timeout=600, progress=False) as client:
            fill(client)
        print(f"Dashboard: {url}/ui (sign in with your API key)")
        return 0
    from fimntk.client._config import cache_dir

    data_dir = data_dir or cache_dir() / "demo-dashboard"
    with local_server(data_dir) as (local_url, local_key):
        with Client(local_url, local_key, timeout=600, progress=False) as client:
            fill(client)
        print(f"Dashboard: {local_url}/ui  (sign in with the API key {local_key})")
        print("Press Ctrl-C to stop the server.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
