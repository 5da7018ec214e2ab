"""Graph and Hugging Face specs on the worker (issue 15): the rebuilt model has real layers,
computes what the client's model computes, and gives the same Fisher; the probe batch fails a
spec that diverged."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk import engine
from fimntk.client import ModelNotSupportedError, from_library
from fimntk.client import _shipping as sh
from fimntk.worker.data import make_loader
from fimntk.worker.errors import JobInputError, JobProblemError
from fimntk.worker.models import load_model
from fimntk.worker.probe import run_probe
from tests import reference
from tests.any_models import custom_models, tiny_transformer

MODELS = custom_models()


def _rebuild(model: nn.Module, arch: dict[str, Any], tmp_path: Path) -> nn.Module:
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return load_model(arch, weights, {}, 1 << 30, 1 << 20)


def _probe(model: nn.Module, x: Any, tmp_path: Path) -> Path:
    shipment = sh.DataShipment(sh.RemoteDataset(name="unused"), head=x)
    blob = sh.probe_blob(model, shipment)
    assert blob is not None
    path = tmp_path / "probe.safetensors"
    path.write_bytes(b"".join(blob.chunks()))
    return path


@pytest.mark.parametrize("name", list(MODELS))
def test_a_traced_model_is_rebuilt_with_real_layers_and_equal_outputs(
    name: str, tmp_path: Path
) -> None:
    model, x = MODELS[name]
    shipment = sh.ship_model(model)
    assert shipment.architecture["kind"] == "graph"
    rebuilt = _rebuild(model, shipment.architecture, tmp_path)
    for path, module in model.named_modules():
        if type(module) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d):
            assert type(rebuilt.get_submodule(path)) is type(module), path
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    tf32 = torch.backends.cudnn.allow_tf32
    assert run_probe(rebuilt, _probe(model, x, tmp_path), torch.float32) == 0.0
    assert torch.backends.cudnn.allow_tf32 == tf32  # turned off for the probe only


@pytest.mark.parametrize("name", list(MODELS))
def test_the_fisher_of_the_rebuilt_model_equals_the_local_one(name: str, tmp_path: Path) -> None:
    model, x = MODELS[name]
    rebuilt = _rebuild(model, sh.ship_model(model).architecture, tmp_path)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    for rep in ("kfac", "diag"):
        ours, local = engine.FIM(rebuilt, loader, rep), engine.FIM(model, loader, rep)
        torch.testing.assert_close(ours.to_torch(), local.to_torch(), rtol=1e-5, atol=1e-7)
    double = copy.deepcopy(rebuilt).double()
    loader64 = DataLoader(TensorDataset(x.double()), batch_size=4)
    dense = reference.fisher(double, loader64)
    torch.testing.assert_close(
        engine.FIM(double, loader64, "diag").get_diag(), torch.diagonal(dense)
    )


def test_a_tampered_graph_fails_the_probe(tmp_path: Path) -> None:
    model, x = MODELS["resnet"]
    arch = sh.ship_model(model).architecture
    adds = [n for n in arch["nodes"] if n.get("target") == "operator.add"]
    adds[0]["target"] = "operator.sub"  # a residual `+` became `-`: still a valid graph
    rebuilt = _rebuild(model, arch, tmp_path)
    with pytest.raises(JobProblemError) as caught:
        run_probe(rebuilt, _probe(model, x, tmp_path), torch.float32)
    assert caught.value.problem["type"] == "/problems/probe-mismatch"
    assert caught.value.problem["field"] == "model.probe"
    assert caught.value.problem["relative_error"] > 1e-3


def test_a_param_node_naming_no_tensor_is_refused(tmp_path: Path) -> None:
    model, _ = MODELS["functional"]
    arch = sh.ship_model(model).architecture
    next(n for n in arch["nodes"] if n["op"] == "param")["target"] = "out.missing"
    with pytest.raises(JobInputError, match="no parameter or buffer") as caught:
        _rebuild(model, arch, tmp_path)
    assert caught.value.field.startswith("model.architecture.nodes[")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "vit"])
def test_a_transformer_is_rebuilt_from_its_config(kind: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model, batch = tiny_transformer(kind)
    shipment = sh.ship_model(model)
    assert shipment.architecture["kind"] == "hf"
    assert shipment.architecture["head"].endswith("Classification")
    rebuilt = _rebuild(model, shipment.architecture, tmp_path)
    assert type(rebuilt) is type(model)
    assert rebuilt.config._attn_implementation == "eager"
    torch.testing.assert_close(rebuilt(**batch).logits, model(**batch).logits)
    assert run_probe(rebuilt, _probe(model, batch, tmp_path), torch.float32) < 1e-6


def test_dictionary_datasets_give_dictionary_batches(tmp_path: Path) -> None:
    ids = torch.arange(10).reshape(5, 2)
    path = tmp_path / "d.safetensors"
    save_file({"inputs.input_ids": ids, "inputs.attention_mask": torch.ones(5, 2)}, path)
    batches = list(make_loader(path, {"batch_size": 2, "subset": 4}, torch.float64, "d", False))
    assert [set(b[0]) for b in batches] == [{"input_ids", "attention_mask"}] * 2
    assert batches[0][0]["attention_mask"].dtype == torch.float64
    assert sum(len(b[0]["input_ids"]) for b in batches) == 4


def test_a_model_in_training_mode_is_traced_as_the_server_runs_it(tmp_path: Path) -> None:
    class Dropping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.nn.functional.dropout(x, 0.5, training=self.training))

    model = Dropping().train()
    arch = sh.ship_model(model).architecture
    assert model.training
    rebuilt = _rebuild(model, arch, tmp_path)
    x = torch.randn(5, 4)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # torchvision built for CUDA fails with more than ImportError
        return False
    return True


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_a_library_model_is_built_by_name_or_refused_where_missing(
    library: str, tmp_path: Path
) -> None:
    arch = {"kind": "library", "library": library, "name": "resnet18", "kwargs": {"num_classes": 3}}
    if not _imports("torchvision.models" if library == "torchvision" else "timm"):
        with pytest.raises(JobInputError, match=f"install {library}") as caught:
            load_model(arch, tmp_path / "unused", {}, 1 << 30, 1 << 20)
        assert caught.value.field == "model.architecture.library"
        with pytest.raises(ModelNotSupportedError, match="does not import here"):
            from_library(library, "resnet18", num_classes=3)
        return
    model = from_library(library, "resnet18", num_classes=3).eval()
    shipment = sh.ship_model(model)
    assert shipment.architecture == arch
    rebuilt = _rebuild(model, shipment.architecture, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_a_library_name_or_argument_outside_the_allowlist_is_refused() -> None:
    with pytest.raises(ModelNotSupportedError, match=r"library.name: torchvision models"):
        from_library("torchvision", "maxvit_t")
    with pytest.raises(ModelNotSupportedError, match=r"unknown argument 'weights'"):
        from_library("torchvision", "resnet18", weights="DEFAULT")
