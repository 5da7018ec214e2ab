"""What :class:`~fimntk.client.Client` and :class:`~fimntk.client.AsyncClient` share, without I/O.

Every exchange with the server is written once, as a *flow*: a generator that yields
:class:`Call` descriptions and receives the responses (as httpx's auth flows do). The sync and
async clients only drive flows: send each call with retries, translate failures into
:mod:`fimntk.client.errors`, and throw a ``KeyboardInterrupt`` (or a task's cancellation) into the
flow, which then cancels its job on the server before letting the interruption go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from fimntk.client._config import ClientConfig, cache_dir
from fimntk.client._progress import ProgressDisplay, ProgressOption
from fimntk.client.errors import (
    JobCanceledError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    error_from_response,
)
from fimntk.contract.vocabulary import TERMINAL_STATUSES, JobStatus
from fimntk.version import __version__

if TYPE_CHECKING:
    from fimntk.client._compute import Op, Prepared, Target

T = TypeVar("T")
#: Statuses worth another try: the service (or a proxy before it) is briefly unavailable.
RETRY_STATUSES = frozenset({502, 503, 504})
#: Longest long poll the server grants.
MAX_WAIT_S = 60
#: Long-poll length with a progress bar (the bar moves) and without (fewest requests).
_POLL_WITH_BAR_S = 1
_POLL_QUIET_S = 30
_MAX_BACKOFF_S = 10.0
USER_AGENT = f"fimntk-client/{__version__}"


@dataclass(frozen=True)
class Call:
    """One request of a flow.

    Attributes:
        method: HTTP method.
        path: Path under the server URL (or an absolute link the server gave).
        params: Query parameters.
        json: JSON body.
        blob: Raw body, streamed (a :class:`fimntk.client._shipping.Blob`).
        headers: Extra headers.
        accept: Error statuses handed to the flow instead of raised.
        read_timeout: Read timeout for a long poll.
        auth: Whether to send the API key.
        stream_to: Write the body to this file instead of reading it into memory.
    """

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    blob: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    accept: frozenset[int] = frozenset()
    read_timeout: float | None = None
    auth: bool = True
    stream_to: Path | None = None


Flow = Generator[Call, httpx.Response, T]


def _json(response: httpx.Response) -> Any:
    return response.json()


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class BaseClient:
    """Configuration, retry policy and flows; no I/O.

    Args:
        url: Server URL; else ``FIMNTK_URL``, the config file, or ``http://127.0.0.1:8000``.
        api_key: API key; else ``FIMNTK_API_KEY`` or the config file.
        timeout: Default limit in seconds on waiting for a job (``None``: no limit). A
            computation that runs past it is canceled on the server.
        http_timeout: Timeout of one HTTP request (long polls get this on top of their wait).
        retries: Further tries after a connection error or a 502/503/504.
        backoff: First pause between tries in seconds, doubled each time (with jitter, at
            most 10 s).
        progress: ``None``: a progress bar when stderr is a terminal, else silence;
            ``True``/``False``; or a callable receiving each polled job.
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
    ) -> None:
        self.config = ClientConfig.resolve(url, api_key)
        self.timeout = timeout
        self.http_timeout = http_timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.progress = progress
        self._context_labels: dict[str, str] = {}
        self._context_step: int | None = None

    @contextlib.contextmanager
    def labels(self, step: int | None = None, **labels: str) -> Iterator[None]:
        """Stamp every job submitted inside the block with ``labels`` (and ``step``), e.g. a
        sweep: ``with client.labels(experiment="lr", run="seed0", step=1000):``. Blocks nest;
        labels given to a call add to (and override) these. Not shared between threads
        safely: use one client per thread for different labels."""
        saved = dict(self._context_labels), self._context_step
        self._context_labels.update(labels)
        if step is not None:
            self._context_step = step
        try:
            yield
        finally:
            self._context_labels, self._context_step = saved

    def _stamp(self, labels: dict[str, str] | None, step: int | None) -> dict[str, Any]:
        """The ``labels`` and ``step`` fields of a spec: the block's, then the call's."""
        stamp: dict[str, Any] = {}
        merged = {**self._context_labels, **(labels or {})}
        if merged:
            stamp["labels"] = merged
        step = self._context_step if step is None else step
        if step is not None:
            stamp["step"] = step
        return stamp

    @staticmethod
    def _search_flow(
        filter: str, order_by: list[str] | None, limit: int
    ) -> Flow[list[dict[str, Any]]]:
        """Every page of a search, up to ``limit`` jobs."""
        rows: list[dict[str, Any]] = []
        token = None
        while len(rows) < limit:
            body: dict[str, Any] = {
                "filter": filter,
                "order_by": order_by or [],
                "page_size": min(500, limit - len(rows)),
            }
            if token is not None:
                body["page_token"] = token
            page = _json((yield Call("POST", "/v1/results:search", json=body)))
            rows += page["items"]
            token = page["next_page_token"]
            if token is None:
                break
        return rows

    @staticmethod
    def _series_call(
        key: str, x: str, group_by: list[str] | None, filter: str, max_points: int
    ) -> Call:
        params = {
            "key": key,
            "x": x,
            "group_by": ",".join(group_by or []),
            "filter": filter,
            "max_points": max_points,
        }
        return Call("GET", "/v1/series", params=params)

    @property
    def url(self) -> str:
        """The server URL."""
        return self.config.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- the driver's policy --------------------------------------------------------------------

    def _headers(self, call: Call) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, **call.headers}
        if call.auth:
            headers["Authorization"] = f"Bearer {self.config.require_key()}"
        if call.blob is not None:
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(call.blob.size)
        return headers

    def _timeout(self, call: Call) -> httpx.Timeout:
        read = self.http_timeout + (call.read_timeout or 0)
        return httpx.Timeout(self.http_timeout, read=read)

    def _pause(self, attempt: int) -> float:
        """Seconds to wait before try ``attempt + 2``."""
        return min(self.backoff * 2**attempt, _MAX_BACKOFF_S) * random.uniform(0.5, 1.0)

    @property
    def _attempts(self) -> int:
        return self.retries + 1

    @staticmethod
    def _check(call: Call, response: httpx.Response) -> httpx.Response:
        """The response, or the error it means (the one place where statuses become errors)."""
        if response.status_code >= 400 and response.status_code not in call.accept:
            raise error_from_response(response)
        return response

    # -- small flows ----------------------------------------------------------------------------

    @staticmethod
    def _json_flow(call: Call) -> Flow[Any]:
        response = yield call
        return _json(response)

    def _upload_flow(self, blob: Any) -> Flow[str]:
        """``HEAD`` first; ``PUT`` the body only when the server lacks it."""
        head = yield Call("HEAD", f"/v1/blobs/{blob.digest}", accept=frozenset({404}))
        if head.status_code == 404:
            yield Call("PUT", f"/v1/blobs/{blob.digest}", blob=blob)
        return str(blob.digest)

    def _upload_path_flow(self, data: bytes | str | Path) -> Flow[str]:
        from fimntk.client._blob import blob_of

        blob = blob_of(data)
        return (yield from self._upload_flow(blob))

    def _upload_dataset_flow(self, data: Any, batch_size: int | None) -> Flow[Any]:
        from fimntk.client._shipping import ship_data

        shipped = ship_data(data, batch_size)
        try:
            if shipped.blob is not None:
                yield from self._upload_flow(shipped.blob)
        finally:
            for blob in shipped.cleanup:
                blob.discard()
        return shipped.dataset

    def _submit_flow(
        self, spec: dict[str, Any], idempotency_key: str | None = None
    ) -> Flow[dict[str, Any]]:
        """``POST /v1/jobs`` with an idempotency key, so that a retried submission is one job;
        the labels and step of the enclosing ``with client.labels(...)`` blocks are added (the
        spec's own win)."""
        spec = spec | self._stamp(spec.get("labels"), spec.get("step"))
        key = idempotency_key or uuid.uuid4().hex
        response = yield Call("POST", "/v1/jobs", json=spec, headers={"Idempotency-Key": key})
        return _json(response)

    def _wait_flow(self, job_id: str, timeout: float | None, cancel: bool) -> Flow[dict[str, Any]]:
        """Long-poll a job to a terminal status, showing its progress.

        With ``cancel``, a ``KeyboardInterrupt`` (or the cancellation of an async task) during
        the wait, or the timeout, cancels the job on the server before going on.
        """
        display = ProgressDisplay(self.progress, job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = _POLL_WITH_BAR_S if display.interactive else _POLL_QUIET_S
        try:
            while True:
                left = MAX_WAIT_S if deadline is None else deadline - time.monotonic()
                wait = max(0, min(poll, MAX_WAIT_S, int(left)))
                response = yield Call(
                    "GET", f"/v1/jobs/{job_id}", params={"wait": wait}, read_timeout=wait
                )
                job = _json(response)
                display.update(job)
                if job["status"] in TERMINAL_STATUSES:
                    return job
                if deadline is not None and time.monotonic() >= deadline:
                    break
        except (KeyboardInterrupt, asyncio.CancelledError):
            if cancel:
                yield from self._cancel_quietly(job_id, display, "interrupted")
            raise
        finally:
            display.close()
        if cancel:
            yield from self._cancel_quietly(job_id, display, "timed out")
        raise JobTimeoutError(
            f"job {job_id} still {job['status']} after {timeout} s"
            + (" (canceled on the server)" if cancel else ""),
            job_id,
        )

    def _cancel_quietly(self, job_id: str, display: ProgressDisplay, why: str) -> Flow[None]:
        try:
            yield Call("POST", f"/v1/jobs/{job_id}/cancel", accept=frozenset({404, 409}))
        except Exception:  # the interruption matters more than a failed cancel
            display.message(f"{why}: could not cancel job {job_id} on the server")
            return
        display.message(f"{why}: canceled job {job_id} on the server")

    def _succeeded_flow(self, job_id: str, timeout: float | None) -> Flow[dict[str, Any]]:
        job = yield from self._wait_flow(job_id, timeout, cancel=True)
        if job["status"] == JobStatus.FAILED:
            problem = job.get("error") or {
                "status": 500,
                "title": "Job failed",
                "detail": "no error recorded",
            }
            raise JobFailedError(problem, job_id)
        if job["status"] == JobStatus.CANCELED:
            raise JobCanceledError(job_id)
        return job

    def _download_flow(self, href: str, path: Path) -> Flow[Path]:
        yield Call("GET", href, stream_to=path)
        return path

    # -- computations ---------------------------------------------------------------------------

    def _collect_flow(self, job_id: str, ops: list[Op]) -> Flow[list[Any]]:
        """Read a succeeded job's result, download its tensors, convert each output."""
        from fimntk.client._shipping import load_tensor

        result = _json((yield Call("GET", f"/v1/jobs/{job_id}/result")))
        values = []
        for op, entry in zip(ops, result["operations"], strict=True):
            outputs = {}
            for name, value in entry["outputs"].items():
                if isinstance(value, dict) and "href" in value:
                    outputs[name] = load_tensor((yield Call("GET", value["href"])).content)
                else:
                    outputs[name] = value
            values.append(op.convert(outputs))
        return values

    def _run_ops_flow(
        self, spec: dict[str, Any], ops: list[Op], blobs: list[Any], timeout: float | None
    ) -> Flow[tuple[dict[str, Any], list[Any]]]:
        for blob in blobs:
            yield from self._upload_flow(blob)
        job = yield from self._submit_flow(spec)
        job = yield from self._succeeded_flow(job["id"], self._limit(timeout))
        values = yield from self._collect_flow(job["id"], ops)
        return job, values

    def _limit(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _compute_flow(
        self,
        model: Any,
        data: Any,
        make_ops: Callable[[Target], list[Op]],
        options: dict[str, Any],
        keep: bool = False,
    ) -> Flow[tuple[dict[str, Any], list[Any], Target]]:
        """Ship model and data, run the operations, return the job, values and target."""
        from fimntk.client._compute import prepare

        timeout = options.pop("timeout", None)
        shards = options.pop("shards", 1)
        labels, step = options.pop("labels", None), options.pop("step", None)
        stamp = {k: v for k, v in (("labels", labels), ("step", step)) if v is not None}
        prepared: Prepared = prepare(model, data, **options)
        try:
            ops = make_ops(prepared.target)
            spec = prepared.spec(ops, keep) | stamp
            if shards != 1:
                spec["shards"] = shards
            job, values = yield from self._run_ops_flow(spec, ops, prepared.blobs(ops), timeout)
        finally:
            prepared.discard()
        return job, values, prepared.target

    def _one_shot_flow(
        self, model: Any, data: Any, make_op: Callable[[Target], Op], options: dict[str, Any]
    ) -> Flow[Any]:
        _, values, _ = yield from self._compute_flow(model, data, lambda t: [make_op(t)], options)
        return values[0]

    def _reuse_flow(
        self, handle: Any, make_op: Callable[[Target], Op], timeout: float | None = None
    ) -> Flow[Any]:
        """One operation on a kept representation (no recomputation)."""
        op = make_op(handle.target)
        spec = {"reuse": handle.job_id, "operations": [op.to_json()]}
        spec |= {"labels": handle.job.get("labels") or {}, "step": handle.job.get("step")}
        blobs = [op.vector] if op.vector is not None else []
        _, values = yield from self._run_ops_flow(spec, [op], blobs, timeout)
        return values[0]

    def _handle_flow(self, cls: type[T], model: Any, data: Any, options: dict[str, Any]) -> Flow[T]:
        job, _, target = yield from self._compute_flow(
            model, data, lambda t: [], options, keep=True
        )
        return cls(self, job, target)  # type: ignore[call-arg]

    def _download_representation_flow(self, job_id: str, path: Path | None) -> Flow[Any]:
        from fimntk.client._shipping import load_representation

        result = _json((yield Call("GET", f"/v1/jobs/{job_id}/result")))
        href = result.get("representation_artifact")
        if not href:
            raise NotFoundError(
                {
                    "status": 404,
                    "title": "Not kept on disk",
                    "detail": f"job {job_id} kept its representation in the worker's memory only "
                    "(this representation cannot be saved as safetensors)",
                }
            )
        target = path or cache_dir() / f"{job_id}-representation.safetensors"
        yield from self._download_flow(href, target)
        return load_representation(target)

    # -- the job API's calls --------------------------------------------------------------------

    @staticmethod
    def _jobs_call(
        status: str | None,
        metric: str | None,
        representation: str | None,
        model: str | None,
        dataset: str | None,
        created_after: Any,
        created_before: Any,
        limit: int,
        cursor: str | None,
    ) -> Call:
        params = _drop_none(
            {
                "status": status,
                "metric": metric,
                "representation": representation,
                "model": model,
                "dataset": dataset,
                "limit": limit,
                "cursor": cursor,
                "created_after": _iso(created_after),
                "created_before": _iso(created_before),
            }
        )
        return Call("GET", "/v1/jobs", params=params)


def _iso(value: Any) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else value


def compute_options(
    *,
    rep: str | None,
    metric: str,
    variant: str,
    trials: int,
    seed: int | None,
    centering: bool,
    dtype: Any,
    batch_size: int | None,
    timeout: float | None,
    shards: int | str = 1,
    labels: dict[str, str] | None = None,
    step: int | None = None,
    loss: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments of the computations, as :func:`fimntk.client._compute.prepare` takes
    them."""
    return {
        "loss": loss,
        "metric": metric,
        "representation": rep,
        "variant": variant,
        "trials": trials,
        "seed": seed,
        "centering": centering,
        "dtype": dtype,
        "batch_size": batch_size,
        "timeout": timeout,
        "shards": shards,
        "labels": labels,
        "step": step,
    }


def search_rows(rows: list[dict[str, Any]]) -> Any:
    """Search rows flattened (``labels.<key>``, ``scalars.<key>`` columns): a pandas
    DataFrame when pandas is installed, else the list of dicts."""
    flat = []
    for row in rows:
        out = {k: v for k, v in row.items() if k not in ("labels", "scalars")}
        out |= {f"labels.{k}": v for k, v in row["labels"].items()}
        out |= {f"scalars.{k}": v for k, v in row["scalars"].items()}
        flat.append(out)
    try:
        pandas = importlib.import_module("pandas")  # fixed name, no user input; optional
    except ImportError:
        return flat
    return pandas.DataFrame(flat)
