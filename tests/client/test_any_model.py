"""Any model from a laptop (issue 15): custom modules and tiny transformers go through
``Client`` with no server-side registration, and every number equals the engine run locally;
a spec that diverged from the model fails its probe."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk import engine
from fimntk.client import Client, JobFailedError, ModelNotSupportedError
from fimntk.client import _shipping as sh
from tests.any_models import custom_models, tiny_transformer

pytestmark = pytest.mark.timeout(300)
RTOL, ATOL = 1e-4, 1e-6


def _cases() -> dict[str, tuple[nn.Module, Any]]:
    cases: dict[str, tuple[nn.Module, Any]] = {
        name: (model, DataLoader(TensorDataset(x), batch_size=4))
        for name, (model, x) in custom_models().items()
    }
    try:
        import transformers  # noqa: F401
    except ImportError:
        return cases
    for kind in ("bert", "gpt2", "llama", "vit"):
        model, batch = tiny_transformer(kind)
        halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
        cases[kind] = (model, halves)
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_a_model_goes_through_unregistered_and_equals_the_engine(client: Client, name: str) -> None:
    model, loader = CASES[name]
    spec = sh.ship_model(model).architecture
    clock = time.monotonic()
    for rep in ("kfac", "diag", "implicit"):
        local = engine.FIM(model, loader, rep)
        torch.testing.assert_close(
            client.get_diag(model, loader, rep=rep), local.get_diag(), rtol=RTOL, atol=ATOL
        )
        torch.testing.assert_close(
            client.trace(model, loader, rep=rep), local.trace(), rtol=RTOL, atol=ATOL
        )
        torch.testing.assert_close(  # v: the model's parameters (the API counts d without buffers)
            client.vTMv(model, loader, rep=rep),
            local.vTMv(engine.PVector.from_model(model)),
            rtol=RTOL,
            atol=ATOL,
        )
    gram = client.ntk(model, loader)
    torch.testing.assert_close(
        gram.to_torch(), engine.GramMatrix(model, loader).to_torch(), rtol=RTOL, atol=ATOL
    )
    print(
        f"\n{name}: {spec['kind']} spec of {len(json.dumps(spec))} bytes, "
        f"10 jobs in {time.monotonic() - clock:.1f} s"
    )


def test_a_spec_that_diverged_fails_with_probe_mismatch(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, loader = CASES["resnet"]
    describe = sh.describe_graph

    def tampered(*args: Any) -> dict[str, Any]:
        arch = describe(*args)
        next(n for n in arch["nodes"] if n.get("target") == "operator.add")["target"] = (
            "operator.sub"
        )
        return arch

    monkeypatch.setattr(sh, "describe_graph", tampered)
    with pytest.raises(JobFailedError) as caught:
        client.trace(model, loader, rep="diag")
    assert caught.value.problem["type"] == "/problems/probe-mismatch"
    assert caught.value.field == "model.probe"


def test_an_untraceable_model_explains_how_to_register_a_builder(client: Client) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(
        ModelNotSupportedError, match=r"(?s)torch.fx cannot trace.*register_builder"
    ):
        client.trace(Branchy(), torch.randn(4, 4), rep="diag")
