"""Model building from JSON, exact matching with weights, loaders and the LRU cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fimntk.service.validation import BUILTIN_BUILDERS
from fimntk.worker.cache import LRUCache
from fimntk.worker.data import make_loader
from fimntk.worker.errors import JobInputError
from fimntk.worker.models import (
    BUILTIN_BUILDERS as WORKER_BUILDERS,
)
from fimntk.worker.models import (
    build_on_meta,
    check_against_weights,
    load_builders,
    load_model,
)

NESTED = {
    "kind": "sequential",
    "layers": [
        {"type": "Sequential", "layers": [{"type": "Linear", "args": [3, 4]}, {"type": "ReLU"}]},
        {"type": "Linear", "args": [4, 2], "kwargs": {"bias": False}},
    ],
}


def test_builtin_names_agree() -> None:
    assert set(WORKER_BUILDERS) == BUILTIN_BUILDERS


@pytest.mark.parametrize("name", sorted(BUILTIN_BUILDERS))
def test_builders_build_on_meta(name: str) -> None:
    kwargs = {"mlp": {"in_features": 3, "hidden": [5], "out_features": 2}}.get(name, {})
    model = build_on_meta({"kind": "builder", "name": name, "kwargs": kwargs}, load_builders([]))
    assert all(p.is_meta for p in model.parameters())


def test_nested_sequential_loads(tmp_path: Path) -> None:
    reference = nn.Sequential(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU()), nn.Linear(4, 2, bias=False)
    )
    path = tmp_path / "w.safetensors"
    save_file(reference.state_dict(), str(path))
    model = load_model(NESTED, path, load_builders([]), 10**6, 10**6)
    x = torch.randn(5, 3)
    torch.testing.assert_close(model(x), reference(x))
    assert not model.training


def test_mismatches_are_all_named(tmp_path: Path) -> None:
    state = {
        "0.0.weight": torch.zeros(5, 3),
        "0.0.bias": torch.zeros(4, dtype=torch.float64),
        "9.weight": torch.zeros(1),
    }
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(JobInputError) as info:
        check_against_weights(build_on_meta(NESTED, {}), path, 10**6)
    detail = info.value.detail
    assert info.value.field == "model.weights"
    for fragment in (
        "missing 1.weight",
        "unexpected 9.weight",
        "0.0.weight: shape [5, 3] in weights, [4, 3]",
        "0.0.bias: dtype F64 in weights, F32",
    ):
        assert fragment in detail


def test_unknown_layer_and_builder_and_size() -> None:
    with pytest.raises(JobInputError) as info:
        build_on_meta({"kind": "sequential", "layers": [{"type": "Module"}]}, {})
    assert info.value.field == "model.architecture.layers[0].type"
    with pytest.raises(JobInputError):
        build_on_meta({"kind": "builder", "name": "nope"}, load_builders([]))
    with pytest.raises(JobInputError) as info:
        build_on_meta({"kind": "builder", "name": "mlp", "kwargs": {"bogus": 1}}, load_builders([]))
    assert info.value.field == "model.architecture.kwargs"
    with pytest.raises(JobInputError, match="above the limit"):
        load_model(NESTED, Path("/nonexistent"), {}, 10, 10)


def test_loader_subset_and_targets(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.arange(20.0).reshape(10, 2)}, str(path))
    params = {"batch_size": 3, "subset": 4, "seed": 1}
    first = torch.cat(
        [b[0] for b in make_loader(path, params, torch.float64, "dataset.blob", False)]
    )
    again = torch.cat(
        [b[0] for b in make_loader(path, params, torch.float64, "dataset.blob", False)]
    )
    assert first.shape == (4, 2) and first.dtype == torch.float64
    torch.testing.assert_close(first, again)
    with pytest.raises(JobInputError, match="targets"):
        make_loader(path, params, torch.float32, "dataset.blob", True)
    with pytest.raises(JobInputError) as info:
        make_loader(path, {**params, "subset": 11}, torch.float32, "dataset.blob", False)
    assert info.value.field == "dataset.subset"


def test_lru_cache() -> None:
    cache: LRUCache[int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and len(cache) == 2
    disabled: LRUCache[int] = LRUCache(0)
    disabled.put("a", 1)
    assert disabled.get("a") is None
