"""Computations as job specs, without I/O: what a model, a loader and the engine's keyword
arguments become, which operations to ask for, and how each operation's outputs turn back
into what the engine would have returned. Imports torch (through :mod:`fimntk.client._shipping`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from fimntk.client import _shipping as sh
from fimntk.client._blob import Blob
from fimntk.client._shipping import DataShipment, ModelShipment
from fimntk.client.errors import DataError
from fimntk.contract.vocabulary import HESSIAN_LOSSES, METRICS

_VECTOR_OPS = frozenset({"mv", "vTMv", "solve"})


@dataclass(frozen=True)
class Target:
    """What a computation runs on: the local model, its description, metric and dtype."""

    model: nn.Module
    shipment: ModelShipment
    metric: str
    dtype: str


@dataclass(frozen=True)
class Op:
    """One operation: its JSON (without the vector's digest), the vector to upload, and the
    conversion of its outputs (tensors already downloaded) into the engine's return value."""

    spec: dict[str, Any]
    vector: Blob | None
    convert: Callable[[dict[str, Any]], Any]

    def to_json(self) -> dict[str, Any]:
        """The operation of a job spec."""
        return {**self.spec, "v": self.vector.digest} if self.vector else dict(self.spec)


@dataclass
class Prepared:
    """A computation ready to upload and submit."""

    target: Target
    data: DataShipment
    fields: dict[str, Any]
    probe: Blob | None = None

    def blobs(self, ops: list[Op]) -> list[Blob]:
        """Blobs to upload before submitting, each once."""
        blobs = [
            self.target.shipment.weights,
            self.probe,
            self.data.blob,
            *(op.vector for op in ops),
        ]
        unique = {b.digest: b for b in blobs if b is not None}
        return list(unique.values())

    def spec(self, ops: list[Op], keep: bool) -> dict[str, Any]:
        """The job spec."""
        model = {
            "weights": self.target.shipment.weights.digest,
            "architecture": self.target.shipment.architecture,
        }
        if self.probe is not None:
            model["probe"] = self.probe.digest
        return {
            "model": model,
            "dataset": self.data.dataset.to_spec(),
            **self.fields,
            "operations": [op.to_json() for op in ops],
            "keep": keep,
        }

    def discard(self) -> None:
        """Delete temporary files."""
        for blob in self.data.cleanup:
            blob.discard()


def prepare(
    model: nn.Module,
    data: Any,
    *,
    metric: str,
    representation: str | None,
    variant: str,
    trials: int,
    seed: int | None,
    centering: bool,
    dtype: Any,
    batch_size: int | None,
    loss: str | None = None,
) -> Prepared:
    """Describe the model, pack the data and check the engine's keyword arguments.

    Raises:
        ModelNotSupportedError: A model the client cannot describe.
        DataError: Data that cannot be packed, or inconsistent arguments.
    """
    if metric not in METRICS:
        raise DataError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if metric == "ntk" and representation is not None:
        raise DataError("the NTK has no representation: leave rep= out for metric='ntk'")
    if metric != "ntk" and representation is None:
        raise DataError(
            f"metric {metric!r} needs a representation, as the engine does: "
            "e.g. rep='kfac' (or 'dense', 'diag', 'ekfac', 'implicit', ...)"
        )
    if (loss is None) == (metric == "hessian"):
        raise DataError(
            f"metric='hessian' needs loss= (one of {list(HESSIAN_LOSSES)})"
            if loss is None
            else "loss= applies to metric='hessian' only"
        )
    if loss is not None and loss not in HESSIAN_LOSSES:
        raise DataError(f"loss must be one of {list(HESSIAN_LOSSES)}, got {loss!r}")
    if trials != 1 and metric != "fim_mc":
        raise DataError("trials= applies to metric='fim_mc' only")
    if centering and metric != "empirical_fim":
        raise DataError("centering= applies to metric='empirical_fim' only")
    shipment = sh.ship_model(model)
    target = Target(model, shipment, metric, sh.compute_dtype(model, dtype))
    fields: dict[str, Any] = {"metric": metric, "dtype": target.dtype}
    if metric == "hessian":
        fields |= {"representation": representation, "loss": loss}
    elif metric == "jacobian":
        fields["representation"] = representation
    elif metric != "ntk":
        fields |= {"representation": representation, "variant": variant}
    if metric == "fim_mc":
        fields |= {"trials": trials, "seed": seed}
    if metric == "empirical_fim":
        fields["centering"] = centering
    shipped = sh.ship_data(data, batch_size)
    needs_targets = metric in ("empirical_fim", "hessian")
    if needs_targets and shipped.blob is not None and not shipped.has_targets:
        shipped.blob.discard()
        what = "the empirical Fisher" if metric == "empirical_fim" else "the loss Hessian"
        raise DataError(f"{what} needs targets: the loader must yield (x, y)")
    return Prepared(target, shipped, fields, sh.probe_blob(model, shipped))


# -- operations -------------------------------------------------------------------------------


def scalar_op(name: str, target: Target, v: Any = None) -> Op:
    """``trace``, ``norm`` or ``vTMv``: a 0-d tensor in the job's dtype."""
    vector = _vector(target, v) if name == "vTMv" else None
    return Op({"op": name}, vector, lambda out: sh.scalar(out["value"], target.dtype))


def tensor_op(name: str, target: Target) -> Op:
    """``get_diag`` or ``to_torch``: the tensor."""
    return Op({"op": name}, None, lambda out: out["value"])


def vector_op(name: str, target: Target, v: Any, regul: float | None = None) -> Op:
    """``mv`` or ``solve``: a ``PVector`` (FIM) or ``FVector`` (NTK)."""
    spec: dict[str, Any] = {"op": name}
    if regul is not None:
        spec["regul"] = float(regul)
    if target.metric == "ntk":
        return Op(spec, _vector(target, v), lambda out: sh.fvector(out["value"]))
    return Op(
        spec,
        _vector(target, v),
        lambda out: sh.pvector(out["value"], target.model, target.shipment),
    )


def jvp_op(target: Target, v: Any) -> Op:
    """``jvp`` of a Jacobian map: ``J v`` for a parameter vector ``v``, an ``FVector``
    ``(c, n)`` (the tensor without the engine)."""
    blob = sh.vector_blob(sh.flat_vector(v, target.model, target.shipment))
    return Op({"op": "jvp"}, blob, lambda out: sh.fvector(out["value"]))


def vjp_op(target: Target, u: Any) -> Op:
    """``vjp`` of a Jacobian map: ``Jᵀ u`` for a function-space vector ``u`` ``(c, n)``, a
    ``PVector`` (``{name: tensor}`` without the engine)."""
    blob = sh.vector_blob(sh.function_vector(u))
    return Op(
        {"op": "vjp"}, blob, lambda out: sh.pvector(out["value"], target.model, target.shipment)
    )


def eigenpairs_op(target: Target, k: int) -> Op:
    """``eigenpairs``: ``(eigenvalues (k,), eigenvectors)`` as the engine returns them."""
    return Op(
        {"op": "eigenpairs", "k": int(k)},
        None,
        lambda out: (out["eigenvalues"], out["eigenvectors"]),
    )


def eigenvalues_op(target: Target, k: int, n_iter: int | None = None, seed: int = 0) -> Op:
    """``lanczos_eigenpairs``: the k largest (algebraic) eigenvalues ``(k,)``, descending."""
    spec: dict[str, Any] = {"op": "lanczos_eigenpairs", "k": int(k), "seed": int(seed)}
    if n_iter is not None:
        spec["n_iter"] = int(n_iter)
    return Op(spec, None, lambda out: out["eigenvalues"])


def gram_op(target: Target) -> Op:
    """The NTK Gram matrix: an ``FMatDense`` ``(c, n, c, n)``."""
    return Op({"op": "to_torch"}, None, lambda out: sh.fmat(out["value"]))


def _vector(target: Target, v: Any) -> Blob:
    if target.metric == "ntk":
        return sh.vector_blob(sh.function_vector(v))
    return sh.vector_blob(sh.flat_vector(v, target.model, target.shipment))
