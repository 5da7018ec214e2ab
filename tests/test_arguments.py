"""Typed, bounded constructor arguments (contract.arguments): issue 19's defects 1, 4 and 7."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from fimntk.contract.arguments import (
    BUILDER_ARGUMENTS,
    LAYER_ARGUMENTS,
    ArgumentError,
    check_architecture_size,
    check_builder_arguments,
    check_layer_arguments,
)
from fimntk.contract.vocabulary import ALLOWED_LAYERS, BUILTIN_BUILDERS

FACTORY = {"device", "dtype", "_weight", "_freeze", "_bias"}


def test_every_allowed_layer_has_a_signature_matching_torch():
    assert set(LAYER_ARGUMENTS) == set(ALLOWED_LAYERS)
    for kind, signature in LAYER_ARGUMENTS.items():
        if kind == "Sequential":
            continue
        torch_params = list(inspect.signature(getattr(nn, kind).__init__).parameters)[1:]
        names = list(signature.params)
        assert not FACTORY & set(names), kind
        # Positional order is torch's own, so args bind to the right names.
        assert names == [p for p in torch_params if p in names], kind


def test_builder_signatures_cover_the_builtins():
    assert set(BUILDER_ARGUMENTS) == set(BUILTIN_BUILDERS)


@pytest.mark.parametrize("key", ["device", "dtype", "_weight", "_freeze"])
def test_factory_arguments_are_refused(key):
    with pytest.raises(ArgumentError) as info:
        check_layer_arguments("Linear", [8192, 8192], {key: "cpu"}, "layers[0]")
    assert info.value.field == "layers[0].kwargs"
    assert "unknown argument" in str(info.value)


@pytest.mark.parametrize(
    ("kind", "args", "kwargs", "field"),
    [
        ("Linear", [10**30, 3], {}, "l.args[0]"),
        ("Linear", [0, 3], {}, "l.args[0]"),
        ("Linear", [4, 3, "yes"], {}, "l.args[2]"),
        ("GroupNorm", [0, 4], {}, "l.args[0]"),
        ("GroupNorm", [3, 4], {}, "l"),
        ("Embedding", [10, 3], {"padding_idx": 100}, "l"),
        ("Conv2d", [4, 6, 3], {"groups": 4}, "l"),
        ("Conv2d", [4, 6, [3, 3, 3]], {}, "l.args[2]"),
        ("Linear", [4], {}, "l"),
        ("Linear", [4, 3], {"junk": "x" * 10_000_000}, "l.kwargs"),
        ("Dropout", [float("nan")], {}, "l.args[0]"),
    ],
)
def test_user_mistakes_name_the_field(kind, args, kwargs, field):
    with pytest.raises(ArgumentError) as info:
        check_layer_arguments(kind, args, kwargs, "l")
    assert info.value.field == field
    assert len(str(info.value)) < 300  # no echo of unbounded input


def test_bound_arguments_build_the_layer_on_meta():
    bound = check_layer_arguments("Conv2d", [2, 4, [3, 3]], {"padding": "same"}, "l")
    with torch.device("meta"):
        layer = nn.Conv2d(**bound)
    assert layer.weight.shape == (4, 2, 3, 3)
    bound = check_layer_arguments("Embedding", [11, 5], {"padding_idx": -1}, "l")
    assert nn.Embedding(**bound).padding_idx == 10


def test_builder_arguments_are_bounded():
    with pytest.raises(ArgumentError) as info:
        check_builder_arguments(
            "mlp", {"in_features": 4, "hidden": [8] * 40_000, "out_features": 3}, "a"
        )
    assert info.value.field == "a.kwargs.hidden"
    with pytest.raises(ArgumentError):
        check_builder_arguments("resnet", {"device": "cpu"}, "a")
    with pytest.raises(ArgumentError) as info:
        check_builder_arguments("lab", {"device": "cuda:0"}, "a")
    assert info.value.field == "a.kwargs.device"
    assert check_builder_arguments("lab", {"width": 4, "names": ["a"]}, "a") == {
        "width": 4,
        "names": ["a"],
    }


def test_depth_and_module_caps():
    layers: list[dict] = [{"type": "Linear", "args": [4, 4]}]
    for _ in range(300):
        layers = [{"type": "Sequential", "layers": layers}]
    with pytest.raises(ArgumentError) as info:
        check_architecture_size(layers, "layers", max_depth=32)
    assert "nested" in str(info.value)
    flat = [{"type": "ReLU"}] * 5000
    with pytest.raises(ArgumentError, match="modules"):
        check_architecture_size(flat, "layers", max_modules=4096)
    check_architecture_size(flat[:10], "layers")
