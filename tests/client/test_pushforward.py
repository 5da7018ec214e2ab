"""``Client.PushForward`` / ``AsyncClient.PushForward``: the Jacobian kept on the server as a
PushForward/PullBack map; ``jvp``, ``vjp`` and ``to_torch`` equal the local engine's
``PFMapDense`` and the ``torch.func`` Jacobian."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fimntk import engine
from fimntk.client import AsyncClient, Client, RemotePushForward
from fimntk.client.errors import ClientError
from tests import reference
from tests.client.conftest import Server, make_loader, make_model
from tests.client.test_end_to_end import assert_engine_equal

pytestmark = pytest.mark.timeout(300)


def _v(model: torch.nn.Module) -> engine.PVector:
    d = sum(p.numel() for p in model.parameters())
    flat = torch.randn(d, generator=torch.Generator().manual_seed(4))
    return engine.PVector(engine.LayerCollection.from_model(model), vector_repr=flat)


def _local(model: torch.nn.Module, loader) -> engine.PFMapDense:
    lc = engine.LayerCollection.from_model(model)
    return engine.PFMapDense(lc, generator=engine.Jacobian(model, lc), examples=loader)


@pytest.mark.parametrize("rep", ["dense", "implicit"])
def test_push_forward_handle_equals_the_engine_and_torch_func(client: Client, rep: str) -> None:
    model, loader = make_model(), make_loader()
    J = client.PushForward(model, loader, rep)
    assert isinstance(J, RemotePushForward) and J.representation == rep
    local = _local(model, loader)
    jac = reference.jacobian(model, loader).permute(1, 0, 2)  # torch.func, (c, n, d)
    v = _v(model)
    jv = J.jvp(v)
    assert_engine_equal(jv, local.jvp(v))
    torch.testing.assert_close(jv.to_torch(), jac @ v.to_torch(), rtol=1e-4, atol=1e-5)
    u = engine.FVector(torch.randn(jac.shape[:2], generator=torch.Generator().manual_seed(5)))
    back = J.vjp(u)
    assert_engine_equal(back, local.vjp(u))
    expected = torch.einsum("kid,ki->d", jac, u.to_torch())
    torch.testing.assert_close(back.to_torch(), expected, rtol=1e-4, atol=1e-5)
    if rep == "dense":
        torch.testing.assert_close(J.to_torch(), jac, rtol=1e-4, atol=1e-5)


def test_push_forward_async_and_errors(server: Server, client: Client) -> None:
    model, loader = make_model(seed=2), make_loader(with_targets=False)
    local = _local(model, loader)
    v = _v(model)

    async def main() -> None:
        async with AsyncClient(server.url, server.keys["alice"], progress=False) as aclient:
            J = await aclient.PushForward(model, loader)
            assert_engine_equal(await J.jvp(v), local.jvp(v))

    asyncio.run(main())
    with pytest.raises(ClientError, match="representation"):
        client.PushForward(model, loader, "kfac")
    J = client.PushForward(model, loader, "dense")
    with pytest.raises(ClientError, match="function space"):
        J.vjp(torch.ones(2, 3))  # not (c, n)
