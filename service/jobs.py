"""Job logic between the routes and the stores: submit, read, list, cancel, results.

The database is the source of truth for a job's status; RQ's view is consulted only to fill
in progress and to reconcile jobs that RQ failed behind the worker's back. Jobs of workers
that died, and queued jobs a Redis restart lost, are handled by :mod:`fimntk.service.reaper`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from typing import Any

from starlette.concurrency import run_in_threadpool

from fimntk.contract.schemas import JobCreate, JobPublic, ResultPublic
from fimntk.contract.vocabulary import TERMINAL_STATUSES, JobStatus
from fimntk.core.config import Settings
from fimntk.core.datasets import dataset_path
from fimntk.core.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    QueueUnavailableError,
    TooManyJobsError,
)
from fimntk.core.queue import JobQueue
from fimntk.core.safetensors_header import Header, header_bytes, read_header
from fimntk.core.shards import ShardTasks, check_shards
from fimntk.core.storage.artifacts import ArtifactStore
from fimntk.core.storage.blobs import BlobStore
from fimntk.core.storage.records import JobRecord, RecordStore, User, utcnow
from fimntk.service.validation import (
    check_architecture,
    check_dataset,
    check_hessian,
    check_operations,
    check_own_representation,
    check_probe,
    check_vector,
    check_weights,
    representation_key,
)
from fimntk.service.views import job_public, result_public

_log = logging.getLogger(__name__)
#: RQ statuses of a job RQ ended without the worker recording it (see ``_reconcile``).
_RQ_ENDED = ("failed", "stopped", "canceled")
#: Fields a reusing job takes from the kept job it names.
_COMPUTE_FIELDS = (
    "model",
    "dataset",
    "metric",
    "representation",
    "variant",
    "trials",
    "seed",
    "centering",
    "loss",
    "dtype",
    "update_diag",
)
#: Finished jobs whose record and public view are kept in memory (oldest dropped first).
_FINISHED_CACHE_SIZE = 10_000
#: Safetensors headers of blobs kept in memory for validating submissions.


class JobService:
    """Operations on jobs for one configured deployment.

    Args:
        settings: Service settings.
        records: Record store.
        blobs: Blob store.
        artifacts: Artifact store.
        queue: The job queue.
    """

    def __init__(
        self,
        settings: Settings,
        records: RecordStore,
        blobs: BlobStore,
        artifacts: ArtifactStore,
        queue: JobQueue,
    ) -> None:
        self.settings = settings
        self.records = records
        self.blobs = blobs
        self.artifacts = artifacts
        self.queue = queue
        # A finished job's record never changes (every update requires a status in flight),
        # so its last read of a status poll needs neither the database nor Redis again; nor
        # does a blob's content, so its header is read once for all submissions naming it.
        self._finished: dict[str, tuple[JobRecord, JobPublic]] = {}
        self._headers: dict[str, Header] = {}
        self._header_sizes: dict[str, int] = {}  # header_bytes of each kept header
        self._cache_lock = threading.Lock()

    # -- submission -------------------------------------------------------------------------

    def submit(
        self, spec: JobCreate, user: User, idempotency_key: str | None
    ) -> tuple[JobRecord, bool]:
        """Validate, record and enqueue a job.

        Args:
            spec: Submitted spec.
            user: Submitting user.
            idempotency_key: Value of the ``Idempotency-Key`` header.

        Returns:
            The job record, and whether it was created now (``False`` for a replay).

        Raises:
            InvalidInputError: A field at fault.
            ConflictError: The idempotency key was used for a different request.
            TooManyJobsError: The user's jobs in flight reached the limit.
            QueueUnavailableError: Redis cannot be reached.
        """
        request_hash = hashlib.sha256(
            json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest()
        if idempotency_key is not None:
            previous = self.records.find_by_idempotency_key(user.id, idempotency_key)
            if previous is not None:
                if previous.request_hash != request_hash:
                    raise ConflictError(
                        "this Idempotency-Key was used for a different request",
                        "Idempotency-Key",
                    )
                return previous, False
        resolved, reuse_id, n_examples = self._resolve(spec, user)
        timeout = spec.timeout_s or self.settings.default_job_timeout_s
        if timeout > self.settings.max_job_timeout_s:
            raise InvalidInputError(
                f"timeout_s may not exceed {self.settings.max_job_timeout_s}", "timeout_s"
            )
        resolved["timeout_s"] = timeout
        if self.records.count_in_flight(user.id) >= self.settings.max_jobs_in_flight:
            raise TooManyJobsError(
                f"{self.settings.max_jobs_in_flight} jobs already queued or running"
            )
        rep_key = representation_key(resolved)
        if reuse_id is None:
            kept = self.records.find_kept(user.id, rep_key)
            reuse_id = kept.id if kept is not None else None
        dataset = resolved["dataset"]
        record = JobRecord(
            id=f"j_{uuid.uuid4().hex}",
            owner_id=user.id,
            status=JobStatus.QUEUED,
            spec=resolved,
            metric=resolved["metric"],
            representation=resolved["representation"],
            model_digest=resolved["model"]["weights"],
            dataset=dataset["blob"] or dataset["name"],
            rep_key=rep_key,
            reuse_job_id=reuse_id,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            progress={"done": 0, "total": None, "stage": "queued"},
            labels=resolved["labels"],
            step=resolved["step"],
            variant=None
            if resolved["metric"] in ("ntk", "hessian", "jacobian")
            else resolved["variant"],
            n=n_examples,
        )
        stored = self.records.create_job(record)
        if stored.id != record.id:
            return stored, False
        try:
            self.queue.enqueue(record.id, timeout, self.settings.result_ttl_s)
        except QueueUnavailableError:
            self.records.delete_job(record.id)
            raise
        return record, True

    def _resolve(self, spec: JobCreate, user: User) -> tuple[dict[str, Any], str | None, int]:
        """Check a spec against the stores; return it as stored (JSON), the kept job it
        reuses, and the number of examples it runs over."""
        reuse_id = None
        if spec.reuse is not None:
            base = self._kept_job(spec.reuse, user)
            data = spec.model_dump(mode="json")
            for name in _COMPUTE_FIELDS:
                if name in spec.model_fields_set and data[name] != base.spec.get(name):
                    raise InvalidInputError(
                        f"{name!r} differs from the kept job {base.id}; leave it out", name
                    )
                data[name] = base.spec.get(name)
            spec = JobCreate.model_validate({**data, "reuse": None})
            reuse_id = base.id
        check_architecture(
            spec,
            self.settings.builder_modules,
            self.settings.max_architecture_depth,
            self.settings.max_architecture_modules,
        )
        assert spec.model is not None and spec.dataset is not None
        weights = self._blob_header(spec.model.weights, user, "model.weights")
        arch = spec.model.architecture
        buffers = [t.name for t in arch.params if t.buffer] if arch.kind == "graph" else []
        n_params = check_weights(weights, "model.weights", buffers)
        if spec.model.probe is not None:
            check_probe(self._blob_header(spec.model.probe, user, "model.probe"), "model.probe")
        if spec.dataset.blob is not None:
            n_examples = check_dataset(
                self._blob_header(spec.dataset.blob, user, "dataset.blob"), "dataset.blob"
            )
        else:
            assert spec.dataset.name is not None
            path = dataset_path(self.settings.datasets_dir, spec.dataset.name)
            n_examples = check_dataset(
                read_header(
                    path,
                    "dataset.name",
                    self.settings.max_header_bytes,
                    self.settings.max_header_entries,
                ),
                "dataset.name",
            )
        check_hessian(spec)
        check_own_representation(spec)
        check_operations(spec)
        check_shards(spec.shards, self.settings.max_shards)
        for i, operation in enumerate(spec.operations):
            vector = getattr(operation, "v", None)
            if vector is not None:
                function_space = spec.metric == "ntk" or operation.op == "vjp"
                expected = None if function_space else n_params
                check_vector(
                    self._blob_header(vector, user, f"operations[{i}].v"),
                    f"operations[{i}].v",
                    expected,
                )
        data = spec.model_dump(mode="json")
        if data["representation"] == "ekfac" and data["update_diag"] is None:
            data["update_diag"] = True
        data.pop("reuse")
        return data, reuse_id, min(n_examples, spec.dataset.subset or n_examples)

    def _kept_job(self, job_id: str, user: User) -> JobRecord:
        """A succeeded job with a kept representation, visible to ``user``."""
        record = self.records.get_job(job_id)
        if record is None or not _visible(record, user):
            raise InvalidInputError(f"no job {job_id!r}", "reuse")
        if record.status != JobStatus.SUCCEEDED or not record.kept:
            raise InvalidInputError(
                f"job {job_id} did not keep its representation (status {record.status})",
                "reuse",
            )
        return record

    def _blob_header(self, digest: str, user: User, field: str) -> Header:
        """The validated safetensors header of a blob ``user`` uploaded (remembered: a blob's
        content never changes)."""
        if not self.records.owns_blob(user, digest) or not self.blobs.exists(digest):
            raise InvalidInputError(f"no blob {digest} uploaded by you", field)
        header = self._headers.get(digest)
        if header is None:
            header = read_header(
                self.blobs.path(digest),
                field,
                self.settings.max_header_bytes,
                self.settings.max_header_entries,
            )
            with self._cache_lock:
                self._remember_header(digest, header)
        return header

    def _remember_header(self, digest: str, header: Header) -> None:
        """Keep ``header``, dropping the oldest ones so that the kept headers take at most
        ``Settings.header_cache_bytes`` (by :func:`header_bytes`); a larger one is not kept."""
        budget = self.settings.header_cache_bytes
        size = header_bytes(header)
        if size > budget:
            return
        self._headers.pop(digest, None)
        self._header_sizes.pop(digest, None)
        held = sum(self._header_sizes.values())
        while self._headers and held + size > budget:
            oldest = next(iter(self._headers))
            del self._headers[oldest]
            held -= self._header_sizes.pop(oldest)
        self._headers[digest] = header
        self._header_sizes[digest] = size

    # -- reading ----------------------------------------------------------------------------

    def get(self, job_id: str, user: User) -> JobRecord:
        """A job visible to ``user``, reconciled with RQ.

        Raises:
            NotFoundError: Unknown job, or another user's.
        """
        record = self.records.get_job(job_id)
        if record is None or not _visible(record, user):
            raise NotFoundError(f"no job {job_id!r}", "job_id")
        return self._reconcile(record)

    def _finished_view(self, job_id: str, user: User) -> tuple[JobRecord, JobPublic] | None:
        """A finished job visible to ``user`` and its public view, from memory, without any
        I/O (safe on the event loop); ``None`` when not remembered as finished."""
        entry = self._finished.get(job_id)
        if entry is None or not _visible(entry[0], user):
            return None
        return entry

    async def read(self, job_id: str, user: User) -> tuple[JobRecord, JobPublic]:
        """:meth:`view` for status polls: a finished job from memory on the event loop (no
        thread, no I/O), any other in the threadpool.

        Raises:
            NotFoundError: Unknown job, or another user's.
        """
        finished = self._finished_view(job_id, user)
        if finished is not None:
            return finished
        return await run_in_threadpool(self.view, job_id, user)

    def view(self, job_id: str, user: User) -> tuple[JobRecord, JobPublic]:
        """A job visible to ``user`` and its public view, as :meth:`get` then :meth:`public`
        but with one database read and at most one light RQ read (status and meta) for a job
        in flight; RQ's full job is loaded only when RQ failed or stopped it. Finished jobs
        are remembered (see :meth:`_finished_view`).

        Raises:
            NotFoundError: Unknown job, or another user's.
        """
        cached = self._finished_view(job_id, user)
        if cached is not None:
            return cached
        record = self.records.get_job(job_id)
        if record is None or not _visible(record, user):
            raise NotFoundError(f"no job {job_id!r}", "job_id")
        if record.status in TERMINAL_STATUSES:
            return self._remember(record, job_public(record, record.progress))
        try:
            rq_status, meta = self.queue.peek(record.id)
        except QueueUnavailableError:
            if record.status == JobStatus.RUNNING:
                _log.warning("queue unreachable; showing stored progress of %s", record.id)
            return record, job_public(record, record.progress)
        if rq_status in _RQ_ENDED:
            record = self._reconcile(record)
            if record.status in TERMINAL_STATUSES:
                return self._remember(record, self.public(record))
            return record, self.public(record)
        progress = record.progress
        if record.status == JobStatus.RUNNING:
            progress = meta.get("progress", progress)
        return record, job_public(record, progress)

    def _remember(self, record: JobRecord, view: JobPublic) -> tuple[JobRecord, JobPublic]:
        """Keep a finished job in memory; the pair given."""
        with self._cache_lock:
            _bounded_put(self._finished, record.id, (record, view), _FINISHED_CACHE_SIZE)
        return record, view

    def public(self, record: JobRecord) -> JobPublic:
        """The public view of a job, with live progress from RQ while it runs."""
        progress = record.progress
        if record.status == JobStatus.RUNNING:
            try:
                _, meta, _ = self.queue.state(record.id)
                progress = meta.get("progress", progress)
            except QueueUnavailableError:
                _log.warning("queue unreachable; showing stored progress of %s", record.id)
        return job_public(record, progress)

    def _reconcile(self, record: JobRecord) -> JobRecord:
        """Align a non-terminal record with RQ when RQ failed or stopped the job behind the
        worker's back. Jobs of dead workers, and queued jobs Redis lost, are the reaper's
        (:mod:`fimntk.service.reaper`)."""
        if record.status in TERMINAL_STATUSES:
            return record
        try:
            rq_status, _, exc_line = self.queue.state(record.id)
        except QueueUnavailableError:
            return record
        if rq_status in _RQ_ENDED:
            canceled = record.cancel_requested
            changes: dict[str, Any] = {
                "status": JobStatus.CANCELED if canceled else JobStatus.FAILED,
                "finished_at": utcnow(),
            }
            if not canceled:
                detail = exc_line or "the queue failed the job"
                changes["error"] = {
                    "type": "/problems/worker-lost",
                    "title": "Worker lost",
                    "status": 500,
                    "detail": f"the worker stopped without finishing the job: {detail}",
                }
            self.records.update_job(
                record.id, only_if_status=(JobStatus.QUEUED, JobStatus.RUNNING), **changes
            )
            return self.records.get_job(record.id) or record
        return record

    def cancel(self, job_id: str, user: User) -> JobRecord:
        """Cancel a job: a queued one is removed, a running one is stopped.

        Returns:
            The job: ``canceled`` when it was queued; still ``running`` (with the stop sent)
            when it was running, ending ``canceled`` within seconds.

        Raises:
            NotFoundError: Unknown job, or another user's.
            ConflictError: The job already succeeded or failed.
        """
        record = self.get(job_id, user)
        if record.status == JobStatus.CANCELED:
            return record
        if record.status in TERMINAL_STATUSES:
            raise ConflictError(f"job {job_id} already {record.status}", "job_id")
        self.records.update_job(job_id, cancel_requested=True)
        if record.status == JobStatus.QUEUED:
            self.queue.cancel_queued(job_id)
            done = self.records.update_job(
                job_id,
                only_if_status=(JobStatus.QUEUED,),
                status=JobStatus.CANCELED,
                finished_at=utcnow(),
                progress={"done": 0, "total": None, "stage": "canceled"},
            )
            if done:
                return self.records.get_job(job_id) or record
        self.queue.stop_running(job_id)
        ShardTasks(self.queue).cancel_all(job_id)
        return self.records.get_job(job_id) or record

    def result(self, job_id: str, user: User) -> ResultPublic:
        """The result of a succeeded job.

        Raises:
            NotFoundError: Unknown job, or another user's.
            ConflictError: The job has not succeeded.
        """
        record = self.get(job_id, user)
        if record.status != JobStatus.SUCCEEDED or record.result is None:
            raise ConflictError(f"job {job_id} is {record.status}, no result", "job_id")
        return result_public(record)


def _bounded_put(cache: dict[str, Any], key: str, value: Any, size: int) -> None:
    """Store ``value`` under ``key``, dropping the oldest entry when ``cache`` holds ``size``."""
    cache.pop(key, None)
    if len(cache) >= size:
        del cache[next(iter(cache))]
    cache[key] = value


def _visible(record: JobRecord, user: User) -> bool:
    """Whether ``user`` may see ``record``."""
    return user.is_admin or record.owner_id == user.id
