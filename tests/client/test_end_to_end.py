"""The client against the real service (real Redis, a real worker process): every one-shot call
and handle method equals the engine computed in-process; uploads happen once; Ctrl-C, task
cancellation and timeouts cancel the job on the server; errors carry the server's problem."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk import engine
from fimntk.client import (
    AsyncClient,
    Client,
    DataError,
    InvalidInputError,
    JobFailedError,
    JobTimeoutError,
    ModelNotSupportedError,
    RemoteDataset,
    register_builder,
)
from fimntk.client import _shipping as sh
from tests.client.builders import two_tower
from tests.client.conftest import BATCH, Server, make_loader, make_model

pytestmark = pytest.mark.timeout(120)
RTOL, ATOL = 1e-4, 1e-5  # float32 round-off


def _as_tensor(value: Any) -> Any:
    if isinstance(value, engine.FMatDense):
        return value.to_torch()
    if hasattr(value, "get_flat_representation"):
        return value.get_flat_representation()
    return value


def _eigvecs_close(ours: torch.Tensor, ref: torch.Tensor, axis: int) -> None:
    """Eigenvectors equal up to sign; ``axis`` indexes the eigenpairs."""
    ours, ref = ours.movedim(axis, 0).flatten(1), ref.movedim(axis, 0).flatten(1)
    signs = torch.sign((ours * ref).sum(1, keepdim=True))
    torch.testing.assert_close(ours * signs, ref, rtol=1e-3, atol=1e-4)


def assert_engine_equal(ours: Any, ref: Any) -> None:
    """Equal to float32 round-off, whatever engine type the value has."""
    if isinstance(ref, tuple):
        evals, evecs = ours
        torch.testing.assert_close(evals, ref[0], rtol=RTOL, atol=ATOL)
        _eigvecs_close(evecs, ref[1], axis=0 if evecs.dim() == 3 else 1)
        return
    assert type(ours) is type(ref)
    torch.testing.assert_close(_as_tensor(ours), _as_tensor(ref), rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def loader() -> DataLoader:
    return make_loader()


def _fim(model: nn.Module, loader: DataLoader, rep: str, metric: str = "fim") -> Any:
    if metric == "fim_mc":
        return engine.FIM_MonteCarlo(model, loader, rep, trials=2, seed=3)
    if metric == "empirical_fim":
        return engine.EmpiricalFIM(model, loader, rep)
    mat = engine.FIM(model, loader, rep)
    if rep == "ekfac":
        mat.update_diag(loader)
    return mat


def _pv(model: nn.Module, seed: int = 5) -> Any:
    lc = engine.LayerCollection.from_model(model)
    return engine.PVector.random(lc, generator=torch.Generator().manual_seed(seed))


def _fv(seed: int = 6) -> Any:
    return engine.FVector(torch.randn(3, 12, generator=torch.Generator().manual_seed(seed)))


Case = tuple[Callable[[Client, nn.Module, DataLoader], Any], Callable[[nn.Module, DataLoader], Any]]
ONE_SHOT: dict[str, Case] = {
    "trace-kfac": (
        lambda c, m, d: c.trace(m, d, rep="kfac"),
        lambda m, d: _fim(m, d, "kfac").trace(),
    ),
    "trace-dense-fim_mc": (
        lambda c, m, d: c.trace(m, d, rep="dense", metric="fim_mc", trials=2, seed=3),
        lambda m, d: _fim(m, d, "dense", "fim_mc").trace(),
    ),
    "trace-mixed-empirical": (
        lambda c, m, d: c.trace(m, d, rep="mixed", metric="empirical_fim"),
        lambda m, d: _fim(m, d, "mixed", "empirical_fim").trace(),
    ),
    "trace-ntk": (
        lambda c, m, d: c.trace(m, d, metric="ntk"),
        lambda m, d: engine.GramMatrix(m, d).trace(),
    ),
    "vTMv-ekfac-own-parameters": (
        lambda c, m, d: c.vTMv(m, d, rep="ekfac"),
        lambda m, d: _fim(m, d, "ekfac").vTMv(engine.PVector.from_model(m)),
    ),
    "vTMv-implicit": (
        lambda c, m, d: c.vTMv(m, d, _pv(m), rep="implicit"),
        lambda m, d: _fim(m, d, "implicit").vTMv(_pv(m)),
    ),
    "vTMv-ntk": (
        lambda c, m, d: c.vTMv(m, d, _fv(), metric="ntk"),
        lambda m, d: engine.GramMatrix(m, d).vTMv(_fv()),
    ),
    "mv-blockdiag": (
        lambda c, m, d: c.mv(m, d, _pv(m), rep="blockdiag"),
        lambda m, d: _fim(m, d, "blockdiag").mv(_pv(m)),
    ),
    "mv-ntk": (
        lambda c, m, d: c.mv(m, d, _fv(), metric="ntk"),
        lambda m, d: engine.GramMatrix(m, d).mv(_fv()),
    ),
    "solve-kfac": (
        lambda c, m, d: c.solve(m, d, _pv(m), regul=1e-2, rep="kfac"),
        lambda m, d: _fim(m, d, "kfac").solve(_pv(m), regul=1e-2),
    ),
    "norm-quasidiag": (
        lambda c, m, d: c.norm(m, d, rep="quasidiag"),
        lambda m, d: _fim(m, d, "quasidiag").norm(),
    ),
    "get_diag-lowrank": (
        lambda c, m, d: c.get_diag(m, d, rep="lowrank"),
        lambda m, d: _fim(m, d, "lowrank").get_diag(),
    ),
    "eigenpairs-dense": (
        lambda c, m, d: c.eigenpairs(m, d, 3, rep="dense"),
        lambda m, d: _fim(m, d, "dense").eigenpairs(3),
    ),
    "eigenpairs-ntk": (
        lambda c, m, d: c.eigenpairs(m, d, 3, metric="ntk"),
        lambda m, d: engine.GramMatrix(m, d).eigenpairs(3),
    ),
    "ntk": (lambda c, m, d: c.ntk(m, d), lambda m, d: engine.GramMatrix(m, d)),
}


@pytest.mark.parametrize("case", list(ONE_SHOT))
def test_one_shot_calls_equal_the_engine(
    client: Client, model: nn.Module, loader: DataLoader, case: str
) -> None:
    call, reference = ONE_SHOT[case]
    assert_engine_equal(call(client, model, loader), reference(model, loader))


def test_a_float64_model_is_computed_in_float64(client: Client) -> None:
    model = make_model().double()
    inputs, targets = make_loader().dataset.tensors
    loader = DataLoader(TensorDataset(inputs.double(), targets), batch_size=5)
    ours = client.trace(model, loader, rep="kfac")
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, _fim(model, loader, "kfac").trace(), rtol=1e-12, atol=0)


def test_shards_split_the_job_and_equal_the_engine(client: Client) -> None:
    model = make_model().double()
    inputs, targets = make_loader().dataset.tensors
    loader = DataLoader(TensorDataset(inputs.double(), targets), batch_size=5)
    ours = client.get_diag(model, loader, rep="kfac", shards=3)
    job = _newest_job(client)
    assert job["spec"]["shards"] == 3 and job["progress"]["shards"] == 3
    torch.testing.assert_close(ours, _fim(model, loader, "kfac").get_diag(), rtol=1e-10, atol=0)


def _newest_job(client: Client) -> dict[str, Any]:
    return client.jobs(limit=1)["items"][0]


def test_fim_handle_methods_reuse_the_kept_representation(
    client: Client, model: nn.Module, loader: DataLoader, tmp_path: Any
) -> None:
    F = client.FIM(model, loader, representation="ekfac")
    assert F.job["kept"] and F.representation == "ekfac"
    ref = _fim(model, loader, "ekfac")
    v = _pv(model)
    assert_engine_equal(F.trace(), ref.trace())
    assert _newest_job(client)["reused_from"] == F.job_id
    assert_engine_equal(F.vTMv(v), ref.vTMv(v))
    assert_engine_equal(F.vTMv(), ref.vTMv(engine.PVector.from_model(model)))
    assert_engine_equal(F.mv(v), ref.mv(v))
    assert_engine_equal(F.solve(v, regul=1e-3), ref.solve(v, regul=1e-3))
    assert_engine_equal(F.norm(), ref.norm())
    assert_engine_equal(F.get_diag(), ref.get_diag())
    assert_engine_equal(F.to_torch(), ref.to_torch())
    assert _newest_job(client)["reused_from"] == F.job_id
    downloaded = F.download(tmp_path / "F.safetensors")
    assert isinstance(downloaded, engine.PMatEKFAC)
    torch.testing.assert_close(downloaded.to_torch(), ref.to_torch(), rtol=RTOL, atol=ATOL)
    dense = client.FIM(model, loader, "dense")
    assert_engine_equal(dense.eigenpairs(2), _fim(model, loader, "dense").eigenpairs(2))


def test_ntk_handle_methods(
    client: Client, model: nn.Module, loader: DataLoader, tmp_path: Any
) -> None:
    K = client.NTK(model, loader)
    ref = engine.GramMatrix(model, loader)
    assert_engine_equal(K.trace(), ref.trace())
    assert_engine_equal(K.norm(), ref.norm())
    assert_engine_equal(K.mv(_fv()), ref.mv(_fv()))
    assert_engine_equal(K.vTMv(_fv()), ref.vTMv(_fv()))
    assert_engine_equal(K.eigenpairs(4), ref.eigenpairs(4))
    assert_engine_equal(K.to_torch(), ref.to_torch())
    assert _newest_job(client)["reused_from"] == K.job_id
    assert_engine_equal(K.download(tmp_path / "K.safetensors"), ref)


def test_the_second_call_on_the_same_model_uploads_nothing(client: Client, server: Server) -> None:
    model, loader = make_model(seed=11), make_loader()
    first = client.vTMv(model, loader, rep="diag")
    requests, sent = server.uploads.snapshot()
    again = client.vTMv(model, loader, rep="diag")
    client.trace(model, loader, rep="kfac")
    client.FIM(model, loader, "diag").vTMv()
    assert server.uploads.snapshot() == (requests, sent)
    torch.testing.assert_close(again, first)


def test_a_registered_builder_model_equals_the_engine(client: Client, loader: DataLoader) -> None:
    torch.manual_seed(2)
    model = register_builder("two_tower", two_tower)(4, 3, hidden=7).eval()
    assert_engine_equal(
        client.trace(model, loader, rep="kfac"), _fim(model, loader, "kfac").trace()
    )


def test_without_the_engine_results_are_plain_tensors(
    client: Client, model: nn.Module, loader: DataLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = _pv(model)
    ref = _fim(model, loader, "dense").mv(v).get_dict_representation()
    gram = engine.GramMatrix(model, loader).to_torch()
    monkeypatch.setattr(sh, "engine_module", lambda: None)
    plain = client.mv(model, loader, v.get_flat_representation(), rep="dense")
    assert list(plain) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name, layer in (("0.weight", "0"), ("0.bias", "0"), ("2.weight", "2"), ("2.bias", "2")):
        index = 0 if name.endswith("weight") else 1
        torch.testing.assert_close(plain[name], ref[layer][index], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(client.ntk(model, loader), gram, rtol=RTOL, atol=ATOL)


def test_server_datasets_and_uploaded_datasets(
    client: Client, server: Server, model: nn.Module, loader: DataLoader
) -> None:
    inputs, targets = loader.dataset.tensors
    server.settings.datasets_dir.mkdir(exist_ok=True)
    save_file(
        {"inputs": inputs, "targets": targets},
        str(server.settings.datasets_dir / "tiny.safetensors"),
    )
    reference = _fim(model, loader, "kfac").trace()
    named = client.trace(model, RemoteDataset(name="tiny", batch_size=BATCH), rep="kfac")
    assert_engine_equal(named, reference)
    assert_engine_equal(client.trace(model, "tiny", rep="kfac"), reference)
    uploaded = client.upload_dataset(loader)
    assert uploaded.batch_size == BATCH and uploaded.blob.startswith("sha256:")
    before = server.uploads.snapshot()
    assert_engine_equal(client.trace(model, uploaded, rep="kfac"), reference)
    assert_engine_equal(client.trace(model, (inputs, targets), rep="kfac", batch_size=4), reference)
    assert server.uploads.snapshot() == before  # the same examples are the same blob


def test_progress_reaches_a_callback(server: Server, model: nn.Module, loader: DataLoader) -> None:
    seen: list[dict[str, Any]] = []
    with Client(server.url, server.keys["alice"], progress=seen.append) as ours:
        ours.trace(model, loader, rep="diag")
    assert seen and seen[-1]["status"] == "succeeded"
    assert seen[-1]["progress"]["stage"] == "done"


def test_server_errors_carry_the_problem(
    client: Client, server: Server, model: nn.Module, loader: DataLoader
) -> None:
    with pytest.raises(InvalidInputError) as refused:
        client.eigenpairs(model, loader, 2, rep="kfac")
    assert refused.value.field == "operations[0].op"
    assert "lanczos_eigenpairs" in refused.value.detail
    dataset = client.upload_dataset(loader)
    too_many = RemoteDataset(blob=dataset.blob, batch_size=5, subset=100)
    with pytest.raises(JobFailedError) as failed:
        client.trace(model, too_many, rep="diag")
    error = failed.value
    assert error.field == "dataset.subset" and error.status == 422
    assert "subset 100 exceeds the 12 examples" in str(error)
    assert client.job(error.job_id)["status"] == "failed"
    with pytest.raises(DataError, match="needs targets"):
        client.trace(model, make_loader(with_targets=False), rep="diag", metric="empirical_fim")


def test_a_model_the_client_cannot_describe_gets_the_registration_message(
    client: Client, server: Server, loader: DataLoader
) -> None:
    class Residual(nn.Module):
        """Data-dependent control flow: torch.fx cannot trace it into a graph spec."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc(x) if x.sum() > 0 else x

    before = server.uploads.snapshot()
    with pytest.raises(
        ModelNotSupportedError,
        match=r"(?s)cannot describe Residual.*"
        r"register_builder\(\"residual\"",
    ):
        client.trace(Residual(), loader, rep="kfac")
    assert server.uploads.snapshot() == before


# -- interruptions ----------------------------------------------------------------------------


def _slow() -> tuple[nn.Module, DataLoader]:
    """A dense FIM that takes the worker tens of seconds (d = 7,946: each batch of 50 adds a
    rank-500 update to a 7,946² matrix, ~0.3 s on one core, 80 batches)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 256), nn.Tanh(), nn.Linear(256, 10)).eval()
    inputs = torch.randn(4000, 20, generator=torch.Generator().manual_seed(4))
    return model, DataLoader(TensorDataset(inputs), batch_size=50)


_JOB_POLL = re.compile(r"^/v1/jobs/j_[0-9a-f]+$")


class _CtrlC(httpx.HTTPTransport):
    """Raises ``KeyboardInterrupt`` on the first long poll of a job, as a Ctrl-C would."""

    def __init__(self) -> None:
        super().__init__()
        self.fired = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if (
            not self.fired
            and request.method == "GET"
            and _JOB_POLL.match(request.url.path)
            and "wait" in request.url.params
        ):
            self.fired = True
            raise KeyboardInterrupt
        return super().handle_request(request)


def _assert_canceled(client: Client, job_id: str) -> None:
    job = client.wait(job_id, timeout=60)
    assert job["status"] == "canceled", job


def test_ctrl_c_cancels_the_job_on_the_server(server: Server, client: Client) -> None:
    model, loader = _slow()
    transport = _CtrlC()
    ours = Client(server.url, server.keys["alice"], progress=False, transport=transport)
    with ours, pytest.raises(KeyboardInterrupt):
        ours.trace(model, loader, rep="dense")
    assert transport.fired
    _assert_canceled(client, _newest_job(client)["id"])


def test_a_timeout_cancels_the_job_on_the_server(client: Client) -> None:
    model, loader = _slow()
    started = time.monotonic()
    with pytest.raises(JobTimeoutError, match="canceled on the server") as info:
        client.trace(model, loader, rep="dense", timeout=2)
    assert time.monotonic() - started < 30
    _assert_canceled(client, info.value.job_id)


def test_the_async_client_mirrors_the_sync_one(
    server: Server, client: Client, model: nn.Module, loader: DataLoader
) -> None:
    slow_model, slow_loader = _slow()

    async def main() -> str:
        async with AsyncClient(server.url, server.keys["alice"], progress=False) as aclient:
            assert_engine_equal(
                await aclient.trace(model, loader, rep="kfac"), _fim(model, loader, "kfac").trace()
            )
            F = await aclient.FIM(model, loader, "dense")
            assert_engine_equal(
                await F.solve(_pv(model), 1e-3),
                _fim(model, loader, "dense").solve(_pv(model), 1e-3),
            )
            assert_engine_equal(await aclient.ntk(model, loader), engine.GramMatrix(model, loader))
            before = (await aclient.jobs(limit=1))["items"][0]["id"]
            task = asyncio.create_task(aclient.trace(slow_model, slow_loader, rep="dense"))
            while (newest := (await aclient.jobs(limit=1))["items"][0]["id"]) == before:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return str(newest)

    _assert_canceled(client, asyncio.run(main()))
