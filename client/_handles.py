"""Handles on representations kept on the server: :class:`RemoteFIM`, :class:`RemoteHessian`
and :class:`RemoteNTK` mirror the engine's ``PMat*`` and ``FMatDense``;
:class:`RemotePushForward` mirrors ``PFMapDense``/``PFMapImplicit``. Each method is a job
that reuses the kept representation (no recomputation). With an
:class:`~fimntk.client.AsyncClient`, await the methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class _Kept:
    """An object computed once by job ``job_id`` and kept by the server."""

    def __init__(self, client: Any, job: dict[str, Any], target: Any) -> None:
        self._client = client
        self.job = job
        self.target = target

    @property
    def job_id(self) -> str:
        """The job that computed (and keeps) the representation."""
        return str(self.job["id"])

    def _run(self, make_op: Any) -> Any:
        return self._client._reuse(self, make_op)

    def download(self, path: str | Path | None = None) -> Any:
        """Download the kept representation's safetensors to ``path`` (default:
        ``~/.cache/fimntk/<job>-representation.safetensors``) and load it with
        ``fimntk.engine.load``; returns the path when the engine is not installed."""
        return self._client._download_representation(self.job_id, Path(path) if path else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(job={self.job_id!r}, metric={self.job['metric']!r})"


class _Remote(_Kept):
    """A matrix kept by the server: its trace, norm, dense form and top eigenpairs."""

    def trace(self) -> Any:
        """:math:`\\mathrm{tr}(M)`, a 0-d tensor."""
        from fimntk.client._compute import scalar_op

        return self._run(lambda t: scalar_op("trace", t))

    def norm(self) -> Any:
        """The Frobenius norm, a 0-d tensor."""
        from fimntk.client._compute import scalar_op

        return self._run(lambda t: scalar_op("norm", t))

    def to_torch(self) -> Any:
        """The dense matrix: ``(d, d)`` for a FIM, ``(c, n, c, n)`` for the NTK."""
        from fimntk.client._compute import tensor_op

        return self._run(lambda t: tensor_op("to_torch", t))

    def eigenpairs(self, k: int) -> Any:
        """Top-k eigenvalues ``(k,)`` (descending) and eigenvectors, as the engine gives them:
        ``(d, k)`` for a dense or low-rank FIM, ``(k, c, n)`` for the NTK."""
        from fimntk.client._compute import eigenpairs_op

        return self._run(lambda t: eigenpairs_op(t, k))


class _RemoteParameterMatrix(_Remote):
    """A parameter-space matrix ``M`` kept on the server: what a Fisher and a Hessian share."""

    @property
    def representation(self) -> str:
        """The representation's name (``"kfac"``, ``"dense"``...)."""
        return str(self.job["representation"])

    def vTMv(self, v: Any = None) -> Any:
        """:math:`v^\\top M v`; ``v`` defaults to the model's parameters."""
        from fimntk.client._compute import scalar_op

        return self._run(lambda t: scalar_op("vTMv", t, v))

    def mv(self, v: Any = None) -> Any:
        """:math:`M v`, a ``PVector`` (``{name: tensor}`` without the engine)."""
        from fimntk.client._compute import vector_op

        return self._run(lambda t: vector_op("mv", t, v))

    def get_diag(self) -> Any:
        """The diagonal, ``(d,)`` (not for an implicit representation)."""
        from fimntk.client._compute import tensor_op

        return self._run(lambda t: tensor_op("get_diag", t))


class RemoteFIM(_RemoteParameterMatrix):
    """A Fisher representation kept on the server (as ``Client.FIM`` returns it).

    Example::

        F = client.FIM(model, loader, representation="kfac")
        F.trace(), F.vTMv(v), F.solve(v, regul=1e-3)
    """

    def solve(self, v: Any = None, regul: float = 1e-8) -> Any:
        """:math:`(F + \\lambda I)^{-1} v` with :math:`\\lambda` = ``regul`` > 0."""
        from fimntk.client._compute import vector_op

        return self._run(lambda t: vector_op("solve", t, v, regul))


class RemoteNTK(_Remote):
    """An NTK Gram matrix ``(c, n, c, n)`` kept on the server (as ``Client.NTK`` returns it).

    Example::

        K = client.NTK(model, loader)
        K.trace(), K.eigenpairs(5)
    """

    def vTMv(self, v: Any) -> Any:
        """:math:`v^\\top K v` for an ``FVector`` or ``(c, n)`` tensor ``v``."""
        from fimntk.client._compute import scalar_op

        return self._run(lambda t: scalar_op("vTMv", t, v))

    def mv(self, v: Any) -> Any:
        """:math:`K v`, an ``FVector`` (a ``(c, n)`` tensor without the engine)."""
        from fimntk.client._compute import vector_op

        return self._run(lambda t: vector_op("mv", t, v))


class RemoteHessian(_RemoteParameterMatrix):
    """A loss Hessian kept on the server (as ``Client.Hessian`` returns it), the engine's
    ``Hessian(model, loader, representation, loss=...)`` with the loss named: ``"cross_entropy"``
    (summed) or ``"mse"`` (``½ Σ ‖f − y‖²``).

    Example::

        H = client.Hessian(model, loader, "implicit", loss="cross_entropy")
        H.vTMv(v), H.eigenvalues(5)
    """

    def eigenvalues(self, k: int, n_iter: int | None = None, seed: int = 0) -> Any:
        """The k largest eigenvalues ``(k,)``, descending, by Lanczos on Hessian-vector
        products. The largest *algebraic* ones: a Hessian is indefinite, and these are the most
        positive curvatures (a negative one shows only when fewer than k are positive)."""
        from fimntk.client._compute import eigenvalues_op

        return self._run(lambda t: eigenvalues_op(t, k, n_iter, seed))


class RemotePushForward(_Kept):
    """The Jacobian ``J`` ``(c, n, d)`` of the model's outputs on the examples, kept on the
    server as a linear map (as ``Client.PushForward`` returns it): the engine's ``PFMapDense``
    (``representation="dense"``, ``J`` stored) or ``PFMapImplicit`` (``"implicit"``, one
    forward-mode or backward pass over the data per product).

    Example::

        J = client.PushForward(model, loader)
        J.jvp(v)          # J v: how the outputs move along v, (c, n)
        J.vjp(u)          # Jᵀ u, a PVector
    """

    @property
    def representation(self) -> str:
        """``"dense"`` or ``"implicit"``."""
        return str(self.job["representation"])

    def jvp(self, v: Any = None) -> Any:
        """Push forward: ``J v``, an ``FVector`` ``(c, n)``; ``v`` defaults to the model's
        parameters."""
        from fimntk.client._compute import jvp_op

        return self._run(lambda t: jvp_op(t, v))

    def vjp(self, u: Any) -> Any:
        """Pull back: ``Jᵀ u = Σ_{k,i} u_{k,i} ∂f_k(x_i)/∂θ`` for an ``FVector`` or ``(c, n)``
        tensor ``u`` (examples in the loader's order), a ``PVector``."""
        from fimntk.client._compute import vjp_op

        return self._run(lambda t: vjp_op(t, u))

    def to_torch(self) -> Any:
        """``J`` itself, ``(c, n, d)`` (``representation="dense"`` only)."""
        from fimntk.client._compute import tensor_op

        return self._run(lambda t: tensor_op("to_torch", t))
