"""``Client.Hessian`` / ``AsyncClient.Hessian``: a kept loss Hessian whose ``vTMv``, ``mv``,
``trace`` and ``eigenvalues`` equal the local engine's ``Hessian`` with the same loss."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from fimntk import engine
from fimntk.client import AsyncClient, Client, DataError, RemoteHessian
from tests.client.conftest import Server, make_loader, make_model
from tests.client.test_end_to_end import assert_engine_equal

pytestmark = pytest.mark.timeout(300)


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def _v(model: torch.nn.Module) -> engine.PVector:
    d = sum(p.numel() for p in model.parameters())
    flat = torch.randn(d, generator=torch.Generator().manual_seed(4))
    return engine.PVector(engine.LayerCollection.from_model(model), vector_repr=flat)


def test_hessian_handle_equals_the_engine(client: Client) -> None:
    model, loader = make_model(), make_loader()
    H = client.Hessian(model, loader, "dense", loss="cross_entropy")
    assert isinstance(H, RemoteHessian) and H.representation == "dense"
    ref = engine.Hessian(model, loader, "dense", loss=_ce)
    v = _v(model)
    assert_engine_equal(H.vTMv(v), ref.vTMv(v))
    assert_engine_equal(H.mv(v), ref.mv(v))
    assert_engine_equal(H.trace(), ref.trace())
    assert_engine_equal(H.get_diag(), ref.get_diag())
    # As the engine's Lanczos gives them (float64), the largest algebraic eigenvalues.
    local = engine.estimators.lanczos_eigenpairs(ref, k=2).eigenvalues
    top = torch.linalg.eigvalsh(ref.to_torch().double()).flip(0)[:2]
    torch.testing.assert_close(H.eigenvalues(2), local, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(H.eigenvalues(2), top, rtol=1e-4, atol=1e-5)


def test_implicit_hessian_handle_and_async_client(server: Server, client: Client) -> None:
    model, loader = make_model(seed=3), make_loader()
    ref = engine.Hessian(model, loader, "dense", loss=_ce)
    v = _v(model)

    async def main() -> None:
        async with AsyncClient(server.url, server.keys["alice"], progress=False) as aclient:
            H = await aclient.Hessian(model, loader, "implicit", loss="cross_entropy")
            assert_engine_equal(await H.vTMv(v), ref.vTMv(v))
            top = torch.linalg.eigvalsh(ref.to_torch().double()).flip(0)[:1]
            torch.testing.assert_close(await H.eigenvalues(1), top, rtol=1e-4, atol=1e-5)

    asyncio.run(main())


def test_hessian_arguments_are_checked_before_upload(client: Client) -> None:
    model, loader = make_model(), make_loader()
    with pytest.raises(DataError, match="loss must be one of"):
        client.Hessian(model, loader, "dense", loss="hinge")
    with pytest.raises(DataError, match="needs targets"):
        client.Hessian(model, make_loader(with_targets=False), "dense", loss="mse")
