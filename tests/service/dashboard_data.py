"""Jobs for the dashboard tests, run through a real worker: KFAC and EKFAC jobs of two runs
over three steps (trace, Lanczos eigenpairs, SLQ density), an NTK job with its Gram matrix,
and one job of another user."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.service.conftest import auth, wait_job
from tests.service.models import BATCH, Uploaded, upload_all

STEPS = (0, 10, 20)
#: A label value that would break HTML or SQL built by string formatting.
HOSTILE = "<b>x</b>'; --"


def fim_spec(up: Uploaded, **changes: Any) -> dict[str, Any]:
    """A FIM job with the operations whose results the dashboards show."""
    spec: dict[str, Any] = {
        "model": up.spec_model,
        "metric": "fim",
        "representation": "kfac",
        "dataset": {"blob": up.dataset, "batch_size": BATCH},
        "operations": [
            {"op": "trace"},
            {"op": "lanczos_eigenpairs", "k": 3},
            {"op": "slq_density", "n_probes": 2, "n_iter": 5},
        ],
    }
    return spec | changes


def run_dashboard_jobs(
    client: TestClient, users: dict[str, str], experiment: str, runs: tuple[str, str]
) -> dict[str, Any]:
    """Submit the jobs (labelled ``experiment``, runs ``runs``) and wait for them.

    Returns:
        ``{"alice": [ids], "ntk": id, "bob": id}``.
    """
    alice = upload_all(client, users["alice"])
    bob = upload_all(client, users["bob"])
    submitted = []
    for run in runs:
        for rep in ("kfac", "ekfac"):
            for step in STEPS:
                labels = {"experiment": experiment, "run": run, "note": HOSTILE}
                spec = fim_spec(alice, representation=rep, labels=labels, step=step)
                submitted.append(_submit(client, users["alice"], spec).json())
    ntk = {
        "model": alice.spec_model,
        "metric": "ntk",
        "dataset": {"blob": alice.dataset, "batch_size": BATCH},
        "operations": [{"op": "to_torch"}, {"op": "trace"}],
        "labels": {"experiment": experiment, "run": "ntk"},
        "step": 5,
    }
    submitted.append(_submit(client, users["alice"], ntk).json())
    bobs = fim_spec(bob, labels={"experiment": experiment}, step=0)
    submitted.append(_submit(client, users["bob"], bobs).json())
    owners = ["alice"] * (len(submitted) - 1) + ["bob"]
    done = {
        j["id"]: wait_job(client, users[o], j["id"]) for j, o in zip(submitted, owners, strict=True)
    }
    assert all(j["status"] == "succeeded" for j in done.values()), done
    return {
        "alice": [j["id"] for j in submitted[:-1]],
        "ntk": submitted[-2]["id"],
        "bob": submitted[-1]["id"],
    }


def _submit(client: TestClient, key: str, spec: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json=spec, headers=auth(key))
