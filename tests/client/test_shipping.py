"""Shipping without a server: models described as the worker rebuilds them, the registration
message for the rest, data packed as the worker's loader reads it, vectors and results."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk.client import (
    DataError,
    ModelNotSupportedError,
    RemoteDataset,
    describe_as,
    register_builder,
)
from fimntk.client import _shipping as sh
from fimntk.service.validation import BUILTIN_BUILDERS
from fimntk.worker.data import make_loader
from fimntk.worker.models import load_builders, load_model
from tests.client.builders import two_tower

pytestmark = pytest.mark.timeout(60)


def _rebuilt(model: nn.Module, tmp_path: Path) -> nn.Module:
    """The model as the worker builds it from what the client ships."""
    shipment = sh.ship_model(model)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(shipment.weights.data or b"")
    builders = load_builders(["tests.client.builders"])
    return load_model(shipment.architecture, weights, builders, 1 << 30, 1 << 24)


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    features = nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)),
                ("norm", nn.BatchNorm2d(4)),
                ("act", nn.GELU(approximate="tanh")),
                ("pool", nn.MaxPool2d(2, ceil_mode=True)),
                ("group", nn.GroupNorm(2, 4)),
            ]
        )
    )
    model = nn.Sequential(
        features,
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.LayerNorm(16, bias=False),
        nn.Dropout(0.25),
        nn.Linear(16, 5, bias=False),
        nn.LeakyReLU(0.2),
        nn.Linear(5, 3),
    )
    model[0].norm.running_mean.uniform_()
    return model.eval()


def test_sequential_models_are_rebuilt_exactly(tmp_path: Path) -> None:
    model = _cnn()
    rebuilt = _rebuilt(model, tmp_path)
    x = torch.randn(6, 3, 9, 9)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert [n for n, _ in sh.ship_model(model).layout] == [n for n, p in model.named_parameters()]


def test_embeddings_and_float64(tmp_path: Path) -> None:
    model = (
        nn.Sequential(nn.Embedding(10, 4, padding_idx=-1), nn.Flatten(), nn.Linear(12, 2))
        .double()
        .eval()
    )
    shipment = sh.ship_model(model)
    assert shipment.architecture["dtype"] == "float64" and shipment.dtype == "float64"
    x = torch.randint(0, 10, (5, 3))
    torch.testing.assert_close(_rebuilt(model, tmp_path)(x), model(x), rtol=0, atol=0)


class Custom(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu() if x.sum() > 0 else self.fc(x)


class MyLinear(nn.Linear):
    pass


def test_a_model_the_client_cannot_describe_says_how_to_register_it() -> None:
    with pytest.raises(ModelNotSupportedError) as info:
        sh.ship_model(Custom())
    message = str(info.value)
    for needed in (
        "cannot describe Custom",
        'register_builder("custom", build_custom)',
        'BUILDERS = {"custom": build_custom}',
        "FIMNTK_BUILDER_MODULES",
        'describe_as(model, "custom"',
    ):
        assert needed in message, message
    with pytest.raises(ModelNotSupportedError, match=r"torch.fx cannot trace it"):
        sh.ship_model(nn.Sequential(nn.Sequential(nn.Linear(3, 3), Custom())))


def test_a_sequential_with_a_custom_layer_is_traced_as_a_graph(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), MyLinear(3, 2)).eval()
    architecture = sh.ship_model(model).architecture
    assert architecture["kind"] == "graph"
    assert {"name": "1", "type": "Module"} in architecture["modules"]


def test_models_the_server_would_build_differently_are_refused() -> None:
    frozen = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ModelNotSupportedError, match=r"0\.weight is frozen"):
        sh.ship_model(frozen)
    shared = nn.Linear(3, 3)
    with pytest.raises(ModelNotSupportedError, match="tied weights"):
        sh.ship_model(nn.Sequential(shared, nn.Tanh(), shared))
    changed = nn.Linear(3, 2)
    changed.in_features = 4
    with pytest.raises(ModelNotSupportedError, match="rebuilt from its constructor"):
        sh.ship_model(nn.Sequential(changed))
    with pytest.raises(ModelNotSupportedError, match="one floating dtype"):
        sh.ship_model(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2).double()))


def test_registered_builders(tmp_path: Path) -> None:
    build = register_builder("two_tower", two_tower)
    model = build(4, 3, hidden=6).eval()
    shipment = sh.ship_model(model)
    assert shipment.architecture == {
        "kind": "builder",
        "name": "two_tower",
        "kwargs": {"in_features": 4, "out_features": 3, "hidden": 6},
    }
    x = torch.randn(5, 4)
    torch.testing.assert_close(_rebuilt(model, tmp_path)(x), model(x), rtol=0, atol=0)
    model.right = nn.Linear(4, 3, bias=False)
    with pytest.raises(ModelNotSupportedError, match="no longer matches builder"):
        sh.ship_model(model)
    tagged = describe_as(nn.Module(), "resnet", blocks=2)
    assert "resnet" in BUILTIN_BUILDERS and tagged._fimntk_builder == ("resnet", {"blocks": 2})
    with pytest.raises(ModelNotSupportedError, match="not a JSON value"):
        describe_as(nn.Module(), "resnet", blocks=object())


def _read_back(shipment: sh.DataShipment, tmp_path: Path) -> list[tuple[torch.Tensor, ...]]:
    """The batches the worker's loader yields from a shipped dataset."""
    assert shipment.blob is not None and shipment.blob.path is not None
    loader = make_loader(
        shipment.blob.path,
        shipment.dataset.to_spec(),
        torch.float32,
        "dataset.blob",
        needs_targets=False,
    )
    return [tuple(b) for b in loader]


def test_loaders_are_packed_as_the_worker_reads_them(tmp_path: Path) -> None:
    x, y = torch.randn(11, 4), torch.randint(0, 3, (11,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)
    shipment = sh.ship_data(loader)
    try:
        assert shipment.n_examples == 8 and shipment.has_targets
        assert shipment.dataset.batch_size == 4
        for ours, theirs in zip(loader, _read_back(shipment, tmp_path), strict=True):
            torch.testing.assert_close(theirs, tuple(ours), rtol=0, atol=0)
        again = sh.ship_data(loader)
        assert again.dataset.blob == shipment.dataset.blob
        again.blob.discard()  # type: ignore[union-attr]
    finally:
        shipment.blob.discard()  # type: ignore[union-attr]
    assert not shipment.blob.path.exists()  # type: ignore[union-attr]


def test_tensors_and_remote_datasets() -> None:
    x = torch.randn(7, 2)
    bare = sh.ship_data(x, batch_size=3)
    pair = sh.ship_data((x, torch.zeros(7)))
    for shipment in (bare, pair):
        shipment.blob.discard()  # type: ignore[union-attr]
    assert bare.dataset.batch_size == 3 and not bare.has_targets and pair.has_targets
    named = sh.ship_data("mnist-1k", batch_size=64)
    assert named.blob is None and named.dataset.to_spec() == {
        "name": "mnist-1k",
        "batch_size": 64,
        "seed": 0,
    }
    remote = RemoteDataset(blob="sha256:" + "0" * 64, subset=5)
    assert sh.ship_data(remote).dataset is remote
    with pytest.raises(DataError, match="exactly one"):
        RemoteDataset()


@pytest.mark.parametrize(
    "data",
    [
        [{"input ids/": torch.zeros(2, 3)}],
        [({"x": torch.zeros(2, 3)}, {"y": torch.zeros(2)})],
        [(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2))],
        [],
        [(torch.zeros(2, 3),), (torch.zeros(2, 3), torch.zeros(2))],
        42,
    ],
    ids=["dict-key", "dict-targets", "triple", "empty", "mixed", "number"],
)
def test_unshippable_data(data: object) -> None:
    with pytest.raises(DataError):
        sh.ship_data(data)


def test_vectors_and_results_without_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    shipment = sh.ship_model(model)
    own = sh.flat_vector(None, model, shipment)
    torch.testing.assert_close(own, torch.cat([p.reshape(-1) for p in model.parameters()]))
    by_name = {n: p.detach() * 2 for n, p in model.named_parameters()}
    torch.testing.assert_close(sh.flat_vector(by_name, model, shipment), own * 2)
    with pytest.raises(DataError, match="13 parameters"):
        sh.flat_vector(torch.zeros(5), model, shipment)
    blob = sh.vector_blob(own)
    torch.testing.assert_close(load(blob.data or b"")["vector"], own)
    monkeypatch.setattr(sh, "engine_module", lambda: None)
    plain = sh.pvector(own, model, shipment)
    assert list(plain) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert plain["0.weight"].shape == (3, 2)
    assert sh.fmat(torch.zeros(1, 2, 1, 2)).shape == (1, 2, 1, 2)


def test_dictionary_batches_ship_as_keyed_inputs() -> None:
    batches = [{"input_ids": torch.arange(6).reshape(3, 2), "labels": torch.arange(3)}] * 2
    shipped = sh.ship_data(batches)
    assert shipped.blob is not None and shipped.n_examples == 6 and shipped.has_targets
    tensors = load(b"".join(shipped.blob.chunks()))
    assert set(tensors) == {"inputs.input_ids", "inputs.labels"}
    assert shipped.dataset.batch_size == 3
    shipped.blob.discard()
