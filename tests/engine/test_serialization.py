"""Saving and loading engine objects as safetensors files (engine.save / engine.load).

Round trips are exact (``torch.equal`` on the dense matrix and on every stored tensor, same class,
layer collection, options and paths). Loading never runs code and rejects, with
``SerializationError`` (a ``ValueError``), any file whose metadata and tensors disagree; the
tampered files are written here with ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import builtins
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fimntk import engine
from fimntk.engine import (
    FMatDense,
    FVector,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatKFAC,
    PMatLowRank,
    PMatMixed,
    PMatQuasiDiag,
    PVector,
    SerializationError,
)
from tests import reference as ref
from tests.engine import _structured_helpers as H

pytestmark = H.ATTN_WARNING


def _mixed_policy(case: str, dtype=torch.float64):
    return engine.FIM(
        *H.built(case, dtype),
        "mixed",
        policy={"4": "ekfac", "Linear": "quasidiag", "GroupNorm": "diag"},
    )


def _thin_with_rest():
    """EKFAC with a thin input basis (layer "4") and a non-zero ``rest`` (updated on other data)."""
    model, loader = H.built("norms")
    x = torch.randn(9, 2, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    other = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    mat = engine.FIM(model, loader, "ekfac").update_diag(other)
    assert mat.data["4"].thin and float(mat.data["4"].rest) > 0
    return mat


#: (id, builder, class): every stored representation, on zoo models that exercise its layouts.
MATRICES = [
    ("dense-mlp", lambda: H.fim("mlp", "dense"), PMatDense),
    ("diag-cnn_bn", lambda: H.fim("cnn_bn", "diag"), PMatDiag),
    ("blockdiag-custom", lambda: H.fim("custom", "blockdiag"), PMatBlockDiag),
    ("quasidiag-norms", lambda: H.fim("norms", "quasidiag"), PMatQuasiDiag),
    ("kfac-grouped_conv", lambda: H.fim("grouped_conv", "kfac"), PMatKFAC),
    ("kfac-embedding", lambda: H.fim("embedding", "kfac"), PMatKFAC),
    ("kfac_reduce-sequence", lambda: H.fim("sequence", "kfac", kfac_approx="reduce"), PMatKFAC),
    ("kfac_float32-cnn_bn", lambda: H.fim("cnn_bn", "kfac", torch.float32), PMatKFAC),
    ("ekfac-cnn_bn", lambda: H.fim("cnn_bn", "ekfac"), PMatEKFAC),
    ("ekfac_updated-conv1d", lambda: H.ekfac_updated("conv1d"), PMatEKFAC),
    ("ekfac_thin-norms", lambda: H.fim("norms", "ekfac"), PMatEKFAC),
    ("ekfac_thin_rest-norms", lambda: _thin_with_rest(), PMatEKFAC),
    ("mixed-attention", lambda: H.fim("attention", "mixed"), PMatMixed),
    ("mixed_policy-norms", lambda: _mixed_policy("norms"), PMatMixed),
    ("lowrank-sequence", lambda: H.fim("sequence", "lowrank"), PMatLowRank),
    ("lowrank_float32-mlp", lambda: H.fim("mlp", "lowrank", torch.float32), PMatLowRank),
]


def stored(mat) -> dict[str, torch.Tensor]:
    """Every tensor a matrix holds, by a stable name."""
    data = mat.data
    if isinstance(data, torch.Tensor):
        return {"data": data}
    out = {}
    for layer, blk in data.items():
        if isinstance(blk, torch.Tensor):
            out[layer] = blk
        else:
            out.update({f"{layer}.{blk.kind}.{k}": t for k, t in blk.tensors().items()})
    return out


def assert_same_matrix(loaded, original, cls) -> None:
    assert type(loaded) is cls and type(original) is cls
    assert loaded.layer_collection == original.layer_collection
    assert loaded.paths == original.paths
    assert torch.equal(loaded.to_torch(), original.to_torch())
    a, b = stored(loaded), stored(original)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for attr in ("kinds", "kfac_approx", "policy", "diag_updated"):
        assert getattr(loaded, attr, None) == getattr(original, attr, None), attr


@pytest.mark.parametrize(
    "build, cls", [(b, c) for _, b, c in MATRICES], ids=[i for i, _, _ in MATRICES]
)
def test_matrix_round_trip_is_exact(tmp_path, build, cls):
    mat = build()
    path = tmp_path / "m.safetensors"
    engine.save(mat, path)
    loaded = engine.load(path)
    assert_same_matrix(loaded, mat, cls)
    v = H.rand_pvector(mat).to(mat.to_torch().dtype)
    ref.assert_close(
        loaded.mv(v).get_flat_representation(),
        mat.mv(v).get_flat_representation(),
        1e-6 if v.dtype == torch.float32 else 1e-14,
        "mv after loading",
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_vectors_and_gram_round_trip(tmp_path, dtype):
    model, loader = H.built("norms", dtype)
    pv = PVector.from_model(model)
    fv = FVector(torch.randn(3, 13, generator=torch.Generator().manual_seed(0), dtype=dtype))
    gram = engine.NTK(model, loader)
    for obj in (pv, fv, gram):
        engine.save(obj, tmp_path / "o.safetensors")
        loaded = engine.load(tmp_path / "o.safetensors")
        assert type(loaded) is type(obj)
        assert torch.equal(loaded.to_torch(), obj.to_torch())
        assert loaded.to_torch().dtype == dtype
    assert engine.load(tmp_path / "o.safetensors").paths == gram.paths
    engine.save(pv, tmp_path / "p.safetensors")
    assert engine.load(tmp_path / "p.safetensors").layer_collection == pv.layer_collection
    assert isinstance(gram, FMatDense)


def test_user_metadata_is_kept(tmp_path):
    meta = {"run": 3, "note": "κ-test", "nested": {"a": [1, 2.5, None]}}
    engine.save(H.fim("mlp", "kfac"), tmp_path / "k.safetensors", metadata=meta)
    assert engine.load(tmp_path / "k.safetensors").metadata == meta
    engine.save(H.fim("mlp", "kfac"), tmp_path / "k2.safetensors")
    assert engine.load(tmp_path / "k2.safetensors").metadata == {}
    with pytest.raises(SerializationError, match="JSON"):
        engine.save(H.fim("mlp", "diag"), tmp_path / "bad.safetensors", metadata={"x": object()})


def test_implicit_and_unknown_objects_cannot_be_saved(tmp_path):
    with pytest.raises(SerializationError, match="implicit"):
        engine.save(H.fim("mlp", "implicit"), tmp_path / "i.safetensors")
    with pytest.raises(SerializationError):
        engine.save({"a": torch.zeros(2)}, tmp_path / "d.safetensors")
    assert not (tmp_path / "i.safetensors").exists()


def test_loading_runs_no_code(tmp_path, monkeypatch):
    """No unpickling, no torch.load, no eval/exec while loading."""
    path = tmp_path / "m.safetensors"
    engine.save(H.ekfac_updated("conv1d"), path)

    def forbidden(*args, **kwargs):
        raise AssertionError("code execution while loading")

    for mod, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (builtins, "eval"),
        (builtins, "exec"),
    ]:
        monkeypatch.setattr(mod, name, forbidden)
    loaded = engine.load(path)
    monkeypatch.undo()
    assert_same_matrix(loaded, H.ekfac_updated("conv1d"), PMatEKFAC)


# ----- rejected files ----------------------------------------------------------------------------


def read_raw(path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["fimntk"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def write_raw(path, doc, tensors) -> None:
    meta = None if doc is None else {"fimntk": doc if isinstance(doc, str) else json.dumps(doc)}
    save_file(tensors, str(path), metadata=meta)


def saved(tmp_path, obj, name: str = "orig.safetensors"):
    path = tmp_path / name
    engine.save(obj, path)
    return read_raw(path)


def assert_rejected(path, match: str | None = None) -> None:
    with pytest.raises(SerializationError, match=match) as err:
        engine.load(path)
    assert isinstance(err.value, ValueError)


def test_rejects_files_that_are_not_safetensors(tmp_path):
    for i, content in enumerate(
        [b"", b"hello world", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", pickle.dumps({"a": 1})]
    ):
        path = tmp_path / f"junk{i}.safetensors"
        path.write_bytes(content)
        assert_rejected(path)
    good = tmp_path / "good.safetensors"
    engine.save(H.fim("mlp", "diag"), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    assert_rejected(truncated)


def test_rejects_a_file_without_engine_metadata(tmp_path):
    _, tensors = saved(tmp_path, H.fim("mlp", "diag"))
    write_raw(tmp_path / "none.safetensors", None, tensors)
    assert_rejected(tmp_path / "none.safetensors", "metadata")
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    assert_rejected(tmp_path / "other.safetensors", "metadata")
    write_raw(tmp_path / "notjson.safetensors", "{not json", tensors)
    assert_rejected(tmp_path / "notjson.safetensors", "JSON")


def _tampered(name, fn):
    return pytest.param(fn, id=name)


def _set(key, value):
    def fn(doc, tensors):
        doc[key] = value

    return fn


def _shape_in_metadata(doc, tensors):
    k = sorted(doc["tensors"])[0]
    doc["tensors"][k] = [s + 1 for s in doc["tensors"][k]]


def _shape_in_tensor(doc, tensors):  # consistent metadata, but not the layer's size
    k = "blocks.0.a"
    tensors[k] = torch.zeros(1, 5, 5, dtype=tensors[k].dtype)
    doc["tensors"][k] = [1, 5, 5]


def _extra_tensor(doc, tensors):
    tensors["payload"] = torch.zeros(3, dtype=torch.float64)
    doc["tensors"]["payload"] = [3]


def _unlisted_tensor(doc, tensors):
    tensors["payload"] = torch.zeros(3, dtype=torch.float64)


def _missing_tensor(doc, tensors):
    del tensors["blocks.1.g"]
    del doc["tensors"]["blocks.1.g"]


def _dtype(doc, tensors):
    doc["dtype"] = "float32"


def _cast(doc, tensors):
    tensors["blocks.0.a"] = tensors["blocks.0.a"].float()


def _layer_shape(doc, tensors):
    doc["layer_collection"][0]["params"][0][1] = [7, 4]


def _layer_name(doc, tensors):
    doc["layer_collection"][1]["name"] = "elsewhere"


def _block_kind(doc, tensors):
    doc["blocks"][0]["kind"] = "__import__('os').system"


def _block_layout(doc, tensors):
    doc["blocks"][0]["layout"]["p"] = 4


def _malformed_layer_collection(doc, tensors):
    doc["layer_collection"] = 42


def _rows(value):
    def fn(doc, tensors):
        doc["blocks"][0]["rows"] = value

    return fn


TAMPER_KFAC = [
    _tampered("rows_negative", _rows(-13)),
    _tampered("rows_not_an_int", _rows("13")),
    _tampered("unsupported_format", _set("format", 99)),
    _tampered("metadata_shape", _shape_in_metadata),
    _tampered("block_shape_vs_layer_collection", _shape_in_tensor),
    _tampered("extra_tensor", _extra_tensor),
    _tampered("unlisted_tensor", _unlisted_tensor),
    _tampered("missing_tensor", _missing_tensor),
    _tampered("declared_dtype", _dtype),
    _tampered("tensor_dtype", _cast),
    _tampered("layer_shape", _layer_shape),
    _tampered("layer_name", _layer_name),
    _tampered("block_kind", _block_kind),
    _tampered("block_layout", _block_layout),
    _tampered("object_os_system", _set("object", "os.system")),
    _tampered("object_builtins_eval", _set("object", "builtins.eval")),
    _tampered("object_implicit", _set("object", "PMatImplicit")),
    _tampered("object_abstract", _set("object", "PMatAbstract")),
    _tampered("malformed_layer_collection", _malformed_layer_collection),
]


@pytest.mark.parametrize("tamper", TAMPER_KFAC)
def test_rejects_a_tampered_kfac_file(tmp_path, tamper):
    doc, tensors = saved(tmp_path, H.fim("mlp", "kfac"))
    tamper(doc, tensors)
    write_raw(tmp_path / "bad.safetensors", doc, tensors)
    assert_rejected(tmp_path / "bad.safetensors")


def _thin_block(doc) -> int:
    return next(i for i, b in enumerate(doc["blocks"]) if "rank" in b)


def _drop_rank(doc, tensors):
    del doc["blocks"][_thin_block(doc)]["rank"]


def _change_rank(doc, tensors):
    doc["blocks"][_thin_block(doc)]["rank"] -= 1


def _rank_not_an_int(doc, tensors):
    doc["blocks"][_thin_block(doc)]["rank"] = "21"


def _rank_on_a_full_basis(doc, tensors):
    doc["blocks"][0]["rank"] = 3


def _drop_rest(doc, tensors):
    k = f"blocks.{_thin_block(doc)}.rest"
    del tensors[k]
    del doc["tensors"][k]


@pytest.mark.parametrize(
    "tamper", [_drop_rank, _change_rank, _rank_not_an_int, _rank_on_a_full_basis, _drop_rest]
)
def test_rejects_a_tampered_thin_ekfac_file(tmp_path, tamper):
    doc, tensors = saved(tmp_path, H.fim("norms", "ekfac"))
    tamper(doc, tensors)
    write_raw(tmp_path / "bad.safetensors", doc, tensors)
    assert_rejected(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "rep, name",
    [
        ("dense", "PMatDiag"),
        ("lowrank", "PMatDense"),
        ("blockdiag", "PMatDense"),
        ("kfac", "PMatEKFAC"),
        ("kfac", "PMatQuasiDiag"),
        ("quasidiag", "PMatKFAC"),
        ("ekfac", "PMatKFAC"),
    ],
    ids=lambda x: x,
)
def test_rejects_an_object_name_that_its_tensors_do_not_fit(tmp_path, rep, name):
    """A file relabelled as another class: its tensors (or its blocks' kinds, which such a class
    never builds) do not describe the named object."""
    doc, tensors = saved(tmp_path, H.fim("mlp", rep))
    doc["object"] = name
    write_raw(tmp_path / "bad.safetensors", doc, tensors)
    assert_rejected(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "build",
    [
        lambda: H.fim("custom", "blockdiag"),
        lambda: H.fim("mlp", "diag"),
        lambda: PVector.from_model(H.built("mlp")[0]),
    ],
    ids=["blockdiag", "diag", "pvector"],
)
def test_rejects_wrong_sizes_for_simple_objects(tmp_path, build):
    doc, tensors = saved(tmp_path, build())
    k = sorted(tensors)[0]
    tensors[k] = torch.cat([tensors[k].reshape(-1), tensors[k].reshape(-1)[:1]])
    doc["tensors"][k] = list(tensors[k].shape)
    write_raw(tmp_path / "bad.safetensors", doc, tensors)
    assert_rejected(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "build",
    [
        lambda: H.fim("mlp", "dense"),
        lambda: PVector.from_model(H.built("mlp")[0]),
        lambda: engine.NTK(*H.built("mlp")),
    ],
    ids=["dense", "pvector", "fmatdense"],
)
def test_rejects_a_renamed_tensor(tmp_path, build):
    """Metadata and tensors agree with each other, but not with what the object needs."""
    doc, tensors = saved(tmp_path, build())
    (k,) = tensors
    tensors = {"renamed": tensors[k]}
    doc["tensors"] = {"renamed": doc["tensors"][k]}
    write_raw(tmp_path / "bad.safetensors", doc, tensors)
    assert_rejected(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(_set("tensors", {"blocks.0.a": 3}), id="tensors_not_shapes"),
        pytest.param(_set("blocks", ["kfac", "kfac", "kfac"]), id="blocks_not_objects"),
        pytest.param(_set("options", ["expand"]), id="options_not_object"),
        pytest.param(_set("layer_collection", None), id="no_layer_collection"),
    ],
)
def test_rejects_malformed_metadata_values(tmp_path, tamper):
    """Metadata of the wrong JSON type is a SerializationError too, never an AttributeError or
    a TypeError from deep inside the loader."""
    doc, tensors = saved(tmp_path, H.fim("mlp", "kfac"))
    tamper(doc, tensors)
    write_raw(tmp_path / "bad.safetensors", doc, tensors)
    assert_rejected(tmp_path / "bad.safetensors")


def test_rejects_a_non_integer_layout(tmp_path):
    doc, tensors = saved(tmp_path, H.fim("mlp", "kfac"))
    doc["blocks"][0]["layout"]["groups"] = "one"
    write_raw(tmp_path / "bad.safetensors", doc, tensors)
    assert_rejected(tmp_path / "bad.safetensors")
