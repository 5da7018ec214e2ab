"""Saving and loading engine objects as safetensors files.

A file holds the object's tensors and one metadata entry, ``"fimntk"``, a JSON document::

    {"format": 1, "engine_version": "0.1.0", "object": "PMatKFAC", "representation": "kfac",
     "dtype": "float32", "convention": "...", "layer_collection": [...],
     "tensors": {"blocks.0.a": [1, 65, 65], ...}, "blocks": [...], "options": {...},
     "paths": {...}, "user": {...}}

Loading never executes code (safetensors holds raw tensors; the JSON names a class from a fixed
allowlist) and rejects a file whose metadata and tensors disagree (names, shapes, dtypes, sizes
implied by the layer collection).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fimntk.engine.errors import SerializationError
from fimntk.engine.fspace import FMatDense
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.pfmap import PFMapDense, PFMapImplicit
from fimntk.engine.pspace import (
    EigenvalueCorrection,
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatEKFACBlockDiag,
    PMatEye,
    PMatImplicit,
    PMatKFAC,
    PMatLayerwise,
    PMatLowRank,
    PMatMixed,
    PMatQuasiDiag,
)
from fimntk.engine.pspace.blocks import BLOCKS, EKronBlock, KronBlock
from fimntk.engine.vector import FVector, PVector
from fimntk.version import __version__

FORMAT = 1
CONVENTION = "F = (1/n) sum_i E_y[grad log p grad log p^T]; NTK Gram (c, n, c, n) not divided by n"
_LAYERED = {
    c.__name__: c for c in (PMatKFAC, PMatEKFAC, PMatEKFACBlockDiag, PMatQuasiDiag, PMatMixed)
}
_SIMPLE = {c.__name__: c for c in (PMatDense, PMatDiag, PMatLowRank, PMatEye)}
_BLOCK_KINDS = {
    "PMatKFAC": ("kfac", "dense", "diag"),
    "PMatEKFAC": ("ekfac", "dense", "diag"),
    "PMatEKFACBlockDiag": ("ekfac", "dense"),
    "PMatQuasiDiag": ("quasidiag", "diag"),
}
OBJECTS = ("PVector", "FVector", "FMatDense", "PFMapDense", "PMatBlockDiag", *_SIMPLE, *_LAYERED)


def _layout_json(layout: MatLayout | None) -> dict | None:
    if layout is None:
        return None
    return {
        "groups": layout.groups,
        "q": layout.q,
        "p": layout.p,
        "bias": layout.bias,
        "transposed": layout.transposed,
    }


def _layout_from(d: dict | None) -> MatLayout | None:
    if d is None:
        return None
    return MatLayout(
        int(d["groups"]), int(d["q"]), int(d["p"]), bool(d["bias"]), bool(d["transposed"])
    )


def _encode(obj: Any) -> tuple[dict[str, Tensor], dict]:
    """Tensors and object-specific metadata of ``obj``."""
    if isinstance(obj, PVector):
        return {"vector": obj.get_flat_representation()}, {
            "layer_collection": obj.layer_collection.to_json()
        }
    if isinstance(obj, FVector):
        return {"vector": obj.get_flat_representation()}, {}
    if isinstance(obj, FMatDense):
        return {"gram": obj.data}, {"paths": obj.paths}
    if isinstance(obj, PFMapDense):
        return {"jacobian": obj.data}, {"layer_collection": obj.layer_collection.to_json()}
    if isinstance(obj, PFMapImplicit):
        raise SerializationError(
            "an implicit map stores nothing to save: save PFMapDense(...) built from the same "
            "generator and examples instead"
        )
    if isinstance(obj, PMatImplicit):
        raise SerializationError(
            "an implicit matrix stores nothing to save: save a computed representation instead"
        )
    if not isinstance(obj, PMatAbstract):
        raise SerializationError(f"cannot save a {type(obj).__name__}; saveable: {OBJECTS}")
    meta: dict[str, Any] = {
        "layer_collection": obj.layer_collection.to_json(),
        "representation": obj.name,
        "paths": obj.paths,
    }
    if isinstance(obj, PMatBlockDiag):
        names = [e.name for e in obj.layer_collection]
        return {f"blocks.{i}": obj.data[n] for i, n in enumerate(names)}, meta
    if isinstance(obj, PMatLayerwise):
        tensors, blocks = {}, []
        for i, e in enumerate(obj.layer_collection):
            blk = obj.data[e.name]
            entry = {"layer": e.name, "kind": blk.kind, "layout": _layout_json(blk.layout)}
            if isinstance(blk, EKronBlock) and blk.thin:
                entry["rank"] = blk.u_a.shape[-1]
            if isinstance(blk, KronBlock) and blk.rows is not None:
                entry["rows"] = blk.rows
            blocks.append(entry)
            for k, t in blk.tensors().items():
                tensors[f"blocks.{i}.{k}"] = t
        meta["blocks"] = blocks
        meta["options"] = {"kfac_approx": obj.kfac_approx, "policy": getattr(obj, "policy", None)}
        if isinstance(obj, EigenvalueCorrection):
            meta["options"]["diag_updated"] = obj.diag_updated
        return tensors, meta
    return {"data": obj.data}, meta


def save(obj: Any, path: str | Path, metadata: dict | None = None) -> None:
    """Write ``obj`` (a PVector, FVector, FMatDense, PFMapDense, PMatEye or any stored PMat)
    to ``path``.

    Args:
        obj: the object.
        path: the file to write.
        metadata: extra JSON-serialisable information kept under ``"user"``.
    """
    tensors, meta = _encode(obj)
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    doc = {
        "format": FORMAT,
        "engine_version": __version__,
        "object": type(obj).__name__,
        "dtype": sorted(dtypes)[0] if len(dtypes) == 1 else sorted(dtypes),
        "convention": CONVENTION,
        "tensors": {k: list(t.shape) for k, t in tensors.items()},
        **meta,
        "user": metadata or {},
    }
    try:
        text = json.dumps(doc)
    except TypeError as err:
        raise SerializationError(f"metadata must be JSON-serialisable: {err}") from err
    save_file(tensors, str(path), metadata={"fimntk": text})


def _read(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("fimntk")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except SerializationError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise SerializationError(f"{path} is not a valid safetensors file: {err}") from err
    if raw is None:
        raise SerializationError(f"{path} has no 'fimntk' metadata: not written by engine.save")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as err:
        raise SerializationError(f"{path}: the 'fimntk' metadata is not JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(f"{path}: unsupported format {doc.get('format')!r}")
    declared = doc.get("tensors")
    if not isinstance(declared, dict) or set(declared) != set(tensors):
        raise SerializationError(
            f"{path}: the metadata lists tensors {sorted(declared or {})} but the file holds "
            f"{sorted(tensors)}"
        )
    for k, t in tensors.items():
        if list(t.shape) != list(declared[k]):
            raise SerializationError(
                f"{path}: tensor {k!r} has shape {list(t.shape)}, metadata says {declared[k]}"
            )
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    want = doc.get("dtype")
    if (isinstance(want, str) and dtypes != {want}) or (
        isinstance(want, list) and dtypes != set(want)
    ):
        raise SerializationError(f"{path}: tensors are {sorted(dtypes)}, metadata says {want}")
    return doc, tensors


def _expect(cond: bool, path: str | Path, msg: str) -> None:
    if not cond:
        raise SerializationError(f"{path}: {msg}")


def _block_shapes(
    kind: str, layout: MatLayout | None, d: int, rank: int | None = None
) -> dict[str, tuple[int, ...]]:
    """The tensors a block holds; ``rank``: the columns of a thin EKFAC input basis."""
    if kind == "dense":
        return {"m": (d, d)}
    if kind == "diag":
        return {"d": (d,)}
    if layout is None:
        raise SerializationError(f"a {kind} block needs a layout")
    g, q, c = layout.groups, layout.q, layout.cols
    if kind == "kfac":
        return {"a": (g, c, c), "g": (g, q, q)}
    if kind == "ekfac" and rank is not None:
        return {"u_a": (g, c, rank), "u_g": (g, q, q), "s": (g, q, rank), "rest": ()}
    if kind == "ekfac":
        return {"u_a": (g, c, c), "u_g": (g, q, q), "s": (g, q, c)}
    return {"d": (g, q, c), "c": (g, q, layout.p)}


def load(path: str | Path) -> Any:
    """Read an object written by :func:`save`; the user metadata is in ``obj.metadata``."""
    doc, tensors = _read(path)
    try:
        return _decode(path, doc, tensors)
    except SerializationError:
        raise
    except (KeyError, AttributeError, TypeError, ValueError, IndexError) as err:
        raise SerializationError(f"{path}: metadata and tensors disagree: {err!r}") from err


def _decode(path: str | Path, doc: dict, tensors: dict[str, Tensor]) -> Any:
    kind = doc.get("object")
    if kind not in OBJECTS:
        raise SerializationError(f"{path}: unknown object {kind!r}; expected one of {OBJECTS}")
    lc = None
    if "layer_collection" in doc:
        try:
            lc = LayerCollection.from_json(doc["layer_collection"])
        except (KeyError, TypeError, ValueError) as err:
            raise SerializationError(f"{path}: malformed layer collection: {err}") from err
    if lc is None and kind not in ("FVector", "FMatDense"):
        raise SerializationError(f"{path}: a {kind} needs its layer collection")
    d = lc.numel() if lc is not None else None
    obj: Any
    if kind in ("FVector", "FMatDense") or lc is None:
        obj = _decode_function_space(path, kind, doc, tensors)
    elif kind == "PVector":
        _expect(list(tensors["vector"].shape) == [d], path, "vector length != layer collection")
        obj = PVector(lc, tensors["vector"])
    elif kind == "PFMapDense":
        j = tensors["jacobian"]
        _expect(
            j.dim() == 3 and j.shape[2] == d and len(tensors) == 1,
            path,
            f"a PFMapDense holds one (K, n, d={d}) tensor 'jacobian'",
        )
        obj = PFMapDense(lc, data=j)
    elif kind == "PMatBlockDiag":
        data = {}
        for i, e in enumerate(lc):
            t = tensors.get(f"blocks.{i}")
            _expect(
                t is not None and tuple(t.shape) == (e.numel, e.numel),
                path,
                f"block of layer {e.name!r} missing or not ({e.numel}, {e.numel})",
            )
            data[e.name] = t
        _expect(len(tensors) == len(lc), path, "extra tensors")
        obj = PMatBlockDiag(lc, data=data)
    elif kind in _SIMPLE:
        t = tensors["data"]
        expected = {"PMatDense": (d, d), "PMatDiag": (d,), "PMatEye": ()}.get(kind)
        ok = (
            tuple(t.shape) == expected
            if expected is not None
            else (t.dim() == 2 and t.shape[1] == d)
        )
        _expect(ok, path, f"{kind} data of shape {tuple(t.shape)} does not fit d={d}")
        obj = _SIMPLE[kind](lc, data=t)
    else:
        obj = _load_layered(path, doc, tensors, lc, _LAYERED[kind])
    if isinstance(obj, PMatAbstract):
        obj.paths = doc.get("paths") or {}
    obj.metadata = doc.get("user") or {}
    return obj


def _decode_function_space(
    path: str | Path, kind: str, doc: dict, tensors: dict[str, Tensor]
) -> FVector | FMatDense:
    """An ``FVector`` ``(c, n)`` or an ``FMatDense`` ``(c, n, c, n)``: no layer collection."""
    if kind == "FVector":
        _expect(tensors["vector"].dim() == 2, path, "an FVector is (c, n)")
        return FVector(tensors["vector"])
    g = tensors["gram"]
    _expect(g.dim() == 4 and g.shape[:2] == g.shape[2:], path, "a Gram matrix is (c,n,c,n)")
    return FMatDense(g, paths=doc.get("paths") or {})


def _load_layered(
    path: str | Path,
    doc: dict,
    tensors: dict[str, Tensor],
    lc: LayerCollection,
    cls: type[PMatLayerwise],
) -> PMatLayerwise:
    blocks = doc.get("blocks")
    _expect(
        isinstance(blocks, list)
        and len(blocks) == len(lc)
        and all(isinstance(b, dict) for b in blocks),
        path,
        "one block per layer expected",
    )
    assert isinstance(blocks, list)
    allowed = _BLOCK_KINDS.get(cls.__name__)
    _expect(
        allowed is None or all(b.get("kind") in allowed for b in blocks),
        path,
        f"a {cls.__name__} holds only {allowed} blocks",
    )
    data, used = {}, set()
    for i, (e, b) in enumerate(zip(lc, blocks)):
        _expect(
            b.get("layer") == e.name and b.get("kind") in BLOCKS,
            path,
            f"block {i} does not describe layer {e.name!r}",
        )
        layout = _layout_from(b.get("layout"))
        _expect(
            layout is None or layout.numel == e.numel,
            path,
            f"layout of layer {e.name!r} does not match its {e.numel} parameters",
        )
        _expect(
            layout is not None or b["kind"] in ("dense", "diag"),
            path,
            f"a {b['kind']} block needs a layout",
        )
        rank = b.get("rank")
        _expect(
            rank is None
            or (
                b["kind"] == "ekfac"
                and isinstance(rank, int)
                and layout is not None
                and 0 < rank < layout.cols
            ),
            path,
            f"block {i}: a rank is only given for a thin EKFAC basis, 0 < rank < columns",
        )
        shapes = _block_shapes(b["kind"], layout, e.numel, rank)
        part: dict[str, Tensor] = {}
        for k, shape in shapes.items():
            t = tensors.get(f"blocks.{i}.{k}")
            _expect(
                t is not None and tuple(t.shape) == shape,
                path,
                f"tensor blocks.{i}.{k} missing or not of shape {shape}",
            )
            assert t is not None
            part[k] = t
            used.add(f"blocks.{i}.{k}")
        data[e.name] = BLOCKS[b["kind"]].from_tensors(part, layout)
        rows = b.get("rows")
        _expect(
            rows is None or (b["kind"] == "kfac" and isinstance(rows, int) and rows > 0),
            path,
            f"block {i}: rows (a bound on the rank of A) is a positive integer of a KFAC block",
        )
        block = data[e.name]
        if rows is not None and isinstance(block, KronBlock):
            block.rows = rows
    _expect(used == set(tensors), path, f"extra tensors {sorted(set(tensors) - used)}")
    opts = doc.get("options") or {}
    kwargs: dict[str, Any] = {"kfac_approx": opts.get("kfac_approx", "expand")}
    if cls is PMatMixed:
        kwargs["policy"] = opts.get("policy")
    obj = cls(lc, data=data, **kwargs)
    if isinstance(obj, EigenvalueCorrection):
        obj.diag_updated = bool(opts.get("diag_updated", False))
    return obj
