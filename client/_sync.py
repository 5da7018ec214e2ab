"""The synchronous client. :class:`~fimntk.client.AsyncClient` mirrors it name for name."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from fimntk.client._base import (
    RETRY_STATUSES,
    BaseClient,
    Call,
    Flow,
    T,
    compute_options,
    search_rows,
)
from fimntk.client._handles import RemoteFIM, RemoteHessian, RemoteNTK, RemotePushForward
from fimntk.client._progress import ProgressOption
from fimntk.client.errors import unreachable


class Client(BaseClient):
    """The fimntk service from Python: the engine's API, computed on the shared GPU box.

    Args:
        url: Server URL; else ``FIMNTK_URL``, the config file, or ``http://127.0.0.1:8000``.
        api_key: API key; else ``FIMNTK_API_KEY`` or the config file.
        timeout: Default limit in seconds on waiting for a job; a computation still running
            past it is canceled on the server and raises :class:`~fimntk.client.JobTimeoutError`.
        http_timeout: Timeout of one HTTP request.
        retries: Further tries after a connection error or a 502/503/504, with backoff.
        backoff: First pause between tries, in seconds (doubled each time).
        progress: Progress bar: ``None`` (on a terminal only), ``True``, ``False``, or a
            callable receiving each polled job.
        transport: An ``httpx`` transport (tests, proxies).

    Example::

        from fimntk.client import Client
        client = Client("http://gpu-box:8000", api_key="fk_...")
        client.vTMv(model, loader, rep="ekfac")       # v = the model's parameters
        F = client.FIM(model, loader, representation="kfac")
        F.trace(), F.solve(v, regul=1e-3)
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | None = None,
        http_timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        progress: ProgressOption = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            url,
            api_key,
            timeout=timeout,
            http_timeout=http_timeout,
            retries=retries,
            backoff=backoff,
            progress=progress,
        )
        self._http = httpx.Client(base_url=self.url, transport=transport, timeout=http_timeout)

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- driving flows --------------------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        try:
            call = next(flow)
            while True:
                try:
                    response = self._send(call)
                except BaseException as exc:  # KeyboardInterrupt included: the flow cancels
                    call = flow.throw(exc)
                else:
                    call = flow.send(response)
        except StopIteration as stop:
            return stop.value
        finally:
            flow.close()

    def _send(self, call: Call) -> httpx.Response:
        last: httpx.TransportError | None = None
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(self._pause(attempt - 1))
            body = None
            if call.blob is not None:
                body = call.blob.data if call.blob.data is not None else call.blob.chunks()
            request = self._http.build_request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                content=body,
                headers=self._headers(call),
                timeout=self._timeout(call),
            )
            try:
                response = self._http.send(request, stream=True)
                try:
                    if call.stream_to is not None and response.status_code < 400:
                        _write(response.iter_bytes(), call.stream_to)
                    else:
                        response.read()
                finally:
                    response.close()
            except httpx.TransportError as exc:
                last = exc
                continue
            if response.status_code in RETRY_STATUSES and attempt + 1 < self._attempts:
                continue
            return self._check(call, response)
        assert last is not None
        raise unreachable(self.url, self._attempts, last) from last

    def _reuse(self, handle: Any, make_op: Any) -> Any:
        return self._run(self._reuse_flow(handle, make_op))

    def _download_representation(self, job_id: str, path: Path | None) -> Any:
        return self._run(self._download_representation_flow(job_id, path))

    # -- one-shot computations ------------------------------------------------------------------

    def trace(
        self,
        model: Any,
        loader: Any,
        *,
        rep: str | None = None,
        metric: str = "fim",
        variant: str = "classif_logits",
        trials: int = 1,
        seed: int | None = None,
        centering: bool = False,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        shards: int | str = 1,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> Any:
        """:math:`\\mathrm{tr}(M)` of the FIM (``rep=``) or the NTK (``metric="ntk"``).

        Args:
            model: An ``nn.Sequential`` of built-in layers, or a model built by a registered
                builder (see :func:`~fimntk.client.register_builder`).
            loader: A DataLoader of ``(x,)`` or ``(x, y)`` batches, tensors ``x`` or
                ``(x, y)``, a :class:`~fimntk.client.RemoteDataset`, or a server dataset's name.
            rep: Representation, as the engine's ``representation``: ``"dense"``, ``"diag"``,
                ``"kfac"``, ``"ekfac"``, ``"implicit"``...
            metric: ``"fim"``, ``"fim_mc"``, ``"empirical_fim"`` or ``"ntk"``.
            variant: one of ``contract.vocabulary.VARIANTS``: ``"classif_logits"``,
                ``"classif_binary_logits"``, ``"classif_logsoftmax"``,
                ``"segmentation_logits"`` or ``"regression"``.
            trials: Monte Carlo samples per example (``fim_mc``).
            seed: Seed of the Monte Carlo draws (``fim_mc``).
            centering: Centre the gradients (``empirical_fim``).
            dtype: ``"float32"`` or ``"float64"``; default the model's.
            batch_size: Examples per batch on the server; default the loader's.
            timeout: Limit on the wait, in seconds (default the client's).
            shards: Split the examples into this many fixed ranges computed by
                several workers and added (``"auto"``: the server decides; 1: one worker).
            labels: String labels of the job, added to those of ``with client.labels(...)``
                (searchable: ``labels.<key>`` in :meth:`search`).
            step: Training step the weights come from (the x of :meth:`series`).

        Returns:
            A 0-d tensor, as the engine returns.
        """
        from fimntk.client._compute import scalar_op

        options = compute_options(
            rep=rep,
            metric=metric,
            variant=variant,
            trials=trials,
            seed=seed,
            centering=centering,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            shards=shards,
            labels=labels,
            step=step,
        )
        return self._run(
            self._one_shot_flow(model, loader, lambda t: scalar_op("trace", t), options)
        )

    def norm(
        self,
        model: Any,
        loader: Any,
        *,
        rep: str | None = None,
        metric: str = "fim",
        variant: str = "classif_logits",
        trials: int = 1,
        seed: int | None = None,
        centering: bool = False,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        shards: int | str = 1,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> Any:
        """The Frobenius norm, a 0-d tensor. Arguments as in :meth:`trace`."""
        from fimntk.client._compute import scalar_op

        options = compute_options(
            rep=rep,
            metric=metric,
            variant=variant,
            trials=trials,
            seed=seed,
            centering=centering,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            shards=shards,
            labels=labels,
            step=step,
        )
        return self._run(
            self._one_shot_flow(model, loader, lambda t: scalar_op("norm", t), options)
        )

    def get_diag(
        self,
        model: Any,
        loader: Any,
        *,
        rep: str | None = None,
        metric: str = "fim",
        variant: str = "classif_logits",
        trials: int = 1,
        seed: int | None = None,
        centering: bool = False,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        shards: int | str = 1,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> Any:
        """The diagonal ``(d,)`` of the FIM. Arguments as in :meth:`trace`."""
        from fimntk.client._compute import tensor_op

        options = compute_options(
            rep=rep,
            metric=metric,
            variant=variant,
            trials=trials,
            seed=seed,
            centering=centering,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            shards=shards,
            labels=labels,
            step=step,
        )
        return self._run(
            self._one_shot_flow(model, loader, lambda t: tensor_op("get_diag", t), options)
        )

    def vTMv(
        self,
        model: Any,
        loader: Any,
        v: Any = None,
        *,
        rep: str | None = None,
        metric: str = "fim",
        variant: str = "classif_logits",
        trials: int = 1,
        seed: int | None = None,
        centering: bool = False,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        shards: int | str = 1,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> Any:
        """:math:`v^\\top M v`, a 0-d tensor.

        ``v`` is a ``PVector``, a flat ``(d,)`` tensor or ``{parameter name: tensor}``, and
        defaults to the model's own parameters (Figure 1 of the paper); for the NTK an
        ``FVector`` or ``(c, n)`` tensor. Other arguments as in :meth:`trace`.
        """
        from fimntk.client._compute import scalar_op

        options = compute_options(
            rep=rep,
            metric=metric,
            variant=variant,
            trials=trials,
            seed=seed,
            centering=centering,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            shards=shards,
            labels=labels,
            step=step,
        )
        return self._run(
            self._one_shot_flow(model, loader, lambda t: scalar_op("vTMv", t, v), options)
        )

    def mv(
        self,
        model: Any,
        loader: Any,
        v: Any = None,
        *,
        rep: str | None = None,
        metric: str = "fim",
        variant: str = "classif_logits",
        trials: int = 1,
        seed: int | None = None,
        centering: bool = False,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        shards: int | str = 1,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> Any:
        """:math:`M v`: a ``PVector`` for the FIM (``{name: tensor}`` without the engine), an
        ``FVector`` for the NTK. ``v`` as in :meth:`vTMv`."""
        from fimntk.client._compute import vector_op

        options = compute_options(
            rep=rep,
            metric=metric,
            variant=variant,
            trials=trials,
            seed=seed,
            centering=centering,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            shards=shards,
            labels=labels,
            step=step,
        )
        return self._run(
            self._one_shot_flow(model, loader, lambda t: vector_op("mv", t, v), options)
        )

    def solve(
        self,
        model: Any,
        loader: Any,
        v: Any = None,
        regul: float = 1e-8,
        *,
        rep: str | None = None,
        metric: str = "fim",
        variant: str = "classif_logits",
        trials: int = 1,
        seed: int | None = None,
        centering: bool = False,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        shards: int | str = 1,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> Any:
        """:math:`(F + \\lambda I)^{-1} v` with :math:`\\lambda` = ``regul`` > 0, a
        ``PVector``. ``v`` as in :meth:`vTMv`."""
        from fimntk.client._compute import vector_op

        options = compute_options(
            rep=rep,
            metric=metric,
            variant=variant,
            trials=trials,
            seed=seed,
            centering=centering,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            shards=shards,
            labels=labels,
            step=step,
        )
        return self._run(
            self._one_shot_flow(model, loader, lambda t: vector_op("solve", t, v, regul), options)
        )

    def eigenpairs(
        self,
        model: Any,
        loader: Any,
        k: int,
        *,
        rep: str | None = None,
        metric: str = "fim",
        variant: str = "classif_logits",
        trials: int = 1,
        seed: int | None = None,
        centering: bool = False,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        shards: int | str = 1,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> Any:
        """Top-k eigenvalues (descending) and eigenvectors: of a dense or low-rank FIM
        (``(d, k)`` eigenvectors) or of the NTK (``metric="ntk"``, ``(k, c, n)``)."""
        from fimntk.client._compute import eigenpairs_op

        options = compute_options(
            rep=rep,
            metric=metric,
            variant=variant,
            trials=trials,
            seed=seed,
            centering=centering,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            shards=shards,
            labels=labels,
            step=step,
        )
        return self._run(self._one_shot_flow(model, loader, lambda t: eigenpairs_op(t, k), options))

    def ntk(
        self,
        model: Any,
        loader: Any,
        *,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        shards: int | str = 1,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> Any:
        """The NTK Gram matrix ``(c, n, c, n)``, as ``fimntk.engine.GramMatrix`` returns it: an
        ``FMatDense`` (the tensor without the engine)."""
        from fimntk.client._compute import gram_op

        options = compute_options(
            rep=None,
            metric="ntk",
            variant="classif_logits",
            trials=1,
            seed=None,
            centering=False,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            shards=shards,
            labels=labels,
            step=step,
        )
        return self._run(self._one_shot_flow(model, loader, gram_op, options))

    # -- handles --------------------------------------------------------------------------------

    def FIM(
        self,
        model: Any,
        loader: Any,
        representation: str,
        *,
        metric: str = "fim",
        variant: str = "classif_logits",
        trials: int = 1,
        seed: int | None = None,
        centering: bool = False,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        shards: int | str = 1,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> RemoteFIM:
        """Compute a Fisher representation once on the server and keep it there.

        Returns:
            A :class:`~fimntk.client.RemoteFIM` whose ``trace``, ``vTMv``, ``mv``, ``solve``,
            ``norm``, ``get_diag``, ``to_torch``, ``eigenpairs`` and ``download`` reuse it.
        """
        options = compute_options(
            rep=representation,
            metric=metric,
            variant=variant,
            trials=trials,
            seed=seed,
            centering=centering,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            shards=shards,
            labels=labels,
            step=step,
        )
        return self._run(self._handle_flow(RemoteFIM, model, loader, options))

    def NTK(
        self,
        model: Any,
        loader: Any,
        *,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        shards: int | str = 1,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> RemoteNTK:
        """Compute the NTK Gram matrix once on the server and keep it there.

        Returns:
            A :class:`~fimntk.client.RemoteNTK` (``trace``, ``norm``, ``mv``, ``vTMv``,
            ``eigenpairs``, ``to_torch``, ``download``).
        """
        options = compute_options(
            rep=None,
            metric="ntk",
            variant="classif_logits",
            trials=1,
            seed=None,
            centering=False,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            shards=shards,
            labels=labels,
            step=step,
        )
        return self._run(self._handle_flow(RemoteNTK, model, loader, options))

    def Hessian(
        self,
        model: Any,
        loader: Any,
        representation: str = "dense",
        *,
        loss: str,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> RemoteHessian:
        """Compute the loss Hessian once on the server and keep it there, as the engine's
        ``Hessian(model, loader, representation, loss=...)`` with the loss named.

        Args:
            representation: ``"dense"``, ``"blockdiag"``, ``"diag"`` or ``"implicit"``.
            loss: ``"cross_entropy"`` (summed over examples; integer class targets) or
                ``"mse"`` (``½ Σ ‖f(x) − y‖²``); the loader must yield ``(x, y)``.
            Others as in :meth:`FIM` (a Hessian job runs on one worker: no ``shards``).

        Returns:
            A :class:`~fimntk.client.RemoteHessian` (``vTMv``, ``mv``, ``eigenvalues``, and for
            a stored representation ``trace``, ``norm``, ``get_diag``, ``to_torch``).
        """
        options = compute_options(
            rep=representation,
            metric="hessian",
            variant="classif_logits",
            trials=1,
            seed=None,
            centering=False,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            labels=labels,
            step=step,
            loss=loss,
        )
        return self._run(self._handle_flow(RemoteHessian, model, loader, options))

    def PushForward(
        self,
        model: Any,
        loader: Any,
        representation: str = "implicit",
        *,
        dtype: Any = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        labels: dict[str, str] | None = None,
        step: int | None = None,
    ) -> RemotePushForward:
        """The Jacobian ``J`` of the model's outputs on the loader's examples, kept on the
        server as a PushForward/PullBack map, as the engine's ``PFMapImplicit`` or
        ``PFMapDense`` built from ``Jacobian(model)``.

        Args:
            representation: ``"implicit"`` (nothing stored; one forward-mode or backward pass
                over the data per product) or ``"dense"`` (``J`` ``(c, n, d)`` stored once).
            Others as in :meth:`FIM` (a Jacobian job runs on one worker: no ``shards``).

        Returns:
            A :class:`~fimntk.client.RemotePushForward` (``jvp``, ``vjp``, and ``to_torch`` for
            a dense map).
        """
        options = compute_options(
            rep=representation,
            metric="jacobian",
            variant="classif_logits",
            trials=1,
            seed=None,
            centering=False,
            dtype=dtype,
            batch_size=batch_size,
            timeout=timeout,
            labels=labels,
            step=step,
        )
        return self._run(self._handle_flow(RemotePushForward, model, loader, options))

    # -- data -----------------------------------------------------------------------------------

    def upload(self, data: bytes | str | Path) -> str:
        """Upload bytes or a file as a blob (nothing is sent when the server has it).

        Returns:
            Its digest, ``sha256:<hex>``.
        """
        return self._run(self._upload_path_flow(data))

    def upload_dataset(self, loader: Any, batch_size: int | None = None) -> Any:
        """Pack a loader or tensors once and upload it; pass the returned
        :class:`~fimntk.client.RemoteDataset` to computations instead of the loader."""
        return self._run(self._upload_dataset_flow(loader, batch_size))

    # -- jobs -----------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job spec (the JSON of ``POST /v1/jobs``); returns the job."""
        return self._run(self._submit_flow(spec, idempotency_key))

    def job(self, job_id: str) -> dict[str, Any]:
        """A job: status, progress, timings, error."""
        return self._run(self._json_flow(Call("GET", f"/v1/jobs/{job_id}")))

    def wait(
        self, job_id: str, timeout: float | None = None, cancel: bool = False
    ) -> dict[str, Any]:
        """Long-poll a job until it succeeds, fails or is canceled; returns the job.

        With ``cancel``, a Ctrl-C during the wait, or the timeout, also cancels the job on the
        server; without, the job goes on.

        Raises:
            JobTimeoutError: Still running after ``timeout`` seconds.
        """
        return self._run(self._wait_flow(job_id, self._limit(timeout), cancel))

    def result(self, job_id: str) -> dict[str, Any]:
        """The result document of a succeeded job (scalars inline, tensors as links)."""
        return self._run(self._json_flow(Call("GET", f"/v1/jobs/{job_id}/result")))

    def download(self, href: str, path: str | Path) -> Path:
        """Download an artifact (a result tensor's ``href``) to ``path``."""
        return self._run(self._download_flow(href, Path(path)))

    def jobs(
        self,
        *,
        status: str | None = None,
        metric: str | None = None,
        representation: str | None = None,
        model: str | None = None,
        dataset: str | None = None,
        created_after: Any = None,
        created_before: Any = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """A page of jobs, newest first: ``{"items": [...], "next_cursor": ...}``."""
        call = self._jobs_call(
            status,
            metric,
            representation,
            model,
            dataset,
            created_after,
            created_before,
            limit,
            cursor,
        )
        return self._run(self._json_flow(call))

    def search(
        self, filter: str = "", *, order_by: list[str] | None = None, limit: int = 1000
    ) -> Any:
        """Stored jobs matching ``filter`` (see README "Dashboards"), with their labels and
        scalars, newest first (or by ``order_by``): a pandas DataFrame when pandas is
        installed, else a list of dicts; at most ``limit`` rows.

        Example: ``client.search("labels.run = 'seed0' AND rep IN ('kfac','ekfac')")``.
        """
        return search_rows(self._run(self._search_flow(filter, order_by, limit)))

    def series(
        self,
        key: str,
        *,
        x: str = "step",
        group_by: list[str] | None = None,
        filter: str = "",
        max_points: int = 500,
    ) -> dict[str, Any]:
        """A scalar (``trace``, ``lambda_max``...) against ``step`` or ``created_at``, one
        series per group (e.g. ``group_by=["labels.run", "rep"]``): ``{"series": [{"name",
        "group", "points": [[x, y, job_id], ...]}]}``, at most ``max_points`` per series."""
        call = self._series_call(key, x, group_by, filter, max_points)
        return self._run(self._json_flow(call))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job; returns the job."""
        return self._run(self._json_flow(Call("POST", f"/v1/jobs/{job_id}/cancel")))

    # -- admin ----------------------------------------------------------------------------------

    def create_user(self, name: str) -> dict[str, Any]:
        """Create a user (admin key); the answer holds its API key, shown only once."""
        return self._run(self._json_flow(Call("POST", "/v1/users", json={"name": name})))

    def users(self) -> list[dict[str, Any]]:
        """Every user (admin key)."""
        return self._run(self._json_flow(Call("GET", "/v1/users")))["items"]

    def revoke_user(self, user_id: str) -> dict[str, Any]:
        """Revoke a user's API key (admin key); their jobs and results stay."""
        return self._run(self._json_flow(Call("POST", f"/v1/users/{user_id}/revoke")))

    def admin_status(self) -> dict[str, Any]:
        """The service overview (admin key): queue, workers, recent failures."""
        return self._run(self._json_flow(Call("GET", "/v1/admin/status")))

    def health(self) -> dict[str, Any]:
        """``/healthz`` (no key needed)."""
        return self._run(
            self._json_flow(Call("GET", "/healthz", auth=False, accept=frozenset({503})))
        )


def _write(chunks: Any, path: Path) -> None:
    """Write a download next to ``path`` first, then rename: no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with partial.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
    os.replace(partial, path)


async def _write_async(chunks: Any, path: Path) -> None:
    """:func:`_write` for an async stream of chunks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with partial.open("wb") as f:
        async for chunk in chunks:
            f.write(chunk)
    os.replace(partial, path)
