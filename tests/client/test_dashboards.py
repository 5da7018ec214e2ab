"""Labels and step from the client (per call, per block, on handles), and search and series
read back through the client against the real service."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from fimntk.client import AsyncClient, Client
from fimntk.client._base import search_rows
from tests.client.conftest import Server, make_loader, make_model

pytestmark = pytest.mark.timeout(120)


def _rows(found: Any) -> list[dict[str, Any]]:
    return found.to_dict("records") if hasattr(found, "to_dict") else list(found)


def test_labels_block_call_and_handle_then_search_and_series(client: Client) -> None:
    sweep = uuid.uuid4().hex[:8]
    model, loader = make_model(), make_loader()
    with client.labels(experiment=sweep, run="seed0"):
        for step in (0, 5):
            client.trace(model, loader, rep="diag", step=step)
        with client.labels(run="seed1", step=7):
            client.trace(model, loader, rep="diag", labels={"extra": "yes"})
        fim = client.FIM(model, loader, "diag", step=9)
    fim.trace()  # a reuse of the kept job: its labels and step carry over
    rows = _rows(client.search(f"labels.experiment = '{sweep}'", order_by=["step"]))
    stamped = [(r["labels.run"], r["step"], r["rep"]) for r in rows]
    assert (
        stamped
        == [("seed0", 0, "diag"), ("seed0", 5, "diag"), ("seed1", 7, "diag")]
        + [("seed0", 9, "diag")] * 2
    )
    assert rows[2]["labels.extra"] == "yes"
    traces = [r.get("scalars.trace") for r in rows]
    assert all(t > 0 for t in traces[:3]) and sum(t == t and t is not None for t in traces) == 4
    series = client.series(
        "trace", group_by=["labels.run"], filter=f"labels.experiment = '{sweep}'"
    )
    by_run = {s["name"]: [p[0] for p in s["points"]] for s in series["series"]}
    assert by_run == {"seed0": [0, 5, 9], "seed1": [7]}
    assert client._stamp(None, None) == {}  # the blocks left nothing behind


def test_async_search(server: Server) -> None:
    async def go() -> Any:
        async with AsyncClient(server.url, server.keys["alice"], progress=False) as c:
            return await c.search("step >= 0", limit=2)

    assert len(_rows(asyncio.run(go()))) <= 2


def test_search_rows_flatten() -> None:
    row = {"id": "j", "labels": {"run": "a"}, "scalars": {"trace": 1.0}}
    flat = _rows(search_rows([row]))
    assert flat == [{"id": "j", "labels.run": "a", "scalars.trace": 1.0}]


def test_dashboard_demo_fills_runs_over_steps(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fimntk.client import dashboard_demo

    monkeypatch.setattr(dashboard_demo, "EPOCHS", 1)
    monkeypatch.setattr(dashboard_demo, "SEEDS", (0,))
    assert dashboard_demo.fill(client) == 7  # 2 checkpoints × 3 Fishers, and the NTK
    rows = _rows(client.search("labels.experiment = 'digits-demo'", order_by=["step"]))
    assert {r["rep"] for r in rows} == {"kfac", "ekfac", "diag", None}
    steps = sorted({r["step"] for r in rows})
    assert steps[0] == 0 and steps[1] > 0
    series = client.series("lambda_max", group_by=["rep"], filter="labels.run = 'seed0'")
    assert {s["name"]: len(s["points"]) for s in series["series"]}["kfac"] == 2
