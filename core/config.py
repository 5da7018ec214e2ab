"""Configuration of the service and its workers, read from ``FIMNTK_*`` environment variables.

One :class:`Settings` object serves the API, the workers and the embedded mode. Every limit a lab
may want to tune (upload size, jobs in flight, job time) lives here, with a safe default.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fimntk.contract.arguments import MAX_DEPTH, MAX_MODULES
from fimntk.core.safetensors_header import MAX_HEADER_ENTRIES

GIB = 1024**3


class Settings(BaseSettings):
    """Settings shared by the API, the workers and ``fimntk serve``.

    Attributes:
        data_dir: Root of blobs, artifacts, named datasets and the default SQLite database.
        database_url: SQLAlchemy URL of the job records; ``sqlite:///<data_dir>/fimntk.db`` when
            unset.
        redis_url: URL of the Redis that holds the queue. Unset means embedded mode for
            ``fimntk serve``; workers and the API in the distributed setup require it.
        queue_name: RQ queue the API enqueues onto and the workers listen on.
        admin_key: API key of the admin user; ``fimntk serve`` generates one when unset.
        max_upload_bytes: Largest blob accepted by ``PUT /v1/blobs/...`` (413 past it).
        max_jobs_in_flight: Queued plus running jobs allowed per user (429 past it).
        default_job_timeout_s: Job time limit when the spec sets none (RQ's default is 180 s).
        max_job_timeout_s: Largest time limit a spec may ask for.
        max_model_bytes: Largest parameter size a model may have, checked on the meta device.
        max_header_bytes: Largest safetensors JSON header accepted.
        max_header_entries: Most tensors a safetensors header may list (422 past it), counted
            before its JSON is parsed.
        header_cache_bytes: Memory the API's cache of parsed blob headers may hold (estimated
            from above by ``core.safetensors_header.header_bytes``: 400 bytes per tensor entry
            plus its name); the oldest headers go first, a header larger than this is not kept.
        builder_modules: Importable modules adding model builders, each defining ``BUILDERS``,
            a dict from name to a function returning an ``nn.Module``. Only modules listed here
            are ever imported; nothing a user sends names a module.
        max_architecture_depth: Most nested ``Sequential`` levels of a layer spec (at most the
            contract's ``MAX_DEPTH``, 32).
        max_architecture_modules: Most modules of a layer spec (at most ``MAX_MODULES``, 4096).
        max_body_bytes: Largest JSON request body (blob uploads excepted, see
            ``max_upload_bytes``); refused with 413 before it is parsed or the key checked.
        model_cache_size: Models (and kept representations) a worker keeps in memory.
        result_ttl_s: How long RQ keeps its own job hashes; records live in the database.
        device: Worker device: ``auto`` picks ``cuda`` when available.
        artifact_url: Where artifacts live: unset for ``<data_dir>/artifacts``, or
            ``s3://bucket/prefix`` for an S3-compatible store shared by workers on several
            boxes (credentials from the usual ``AWS_*`` variables).
        s3_endpoint_url: Endpoint of the S3-compatible store (MinIO, ...); unset for AWS.
        heartbeat_ttl_s: A worker refreshes its liveness key every third of this; a running
            job whose worker has shown no sign of life for this long is reaped.
        reaper_interval_s: Period of the API's reaper. A job whose worker died ends ``failed``
            ("worker lost") within ``2 * (heartbeat_ttl_s + reaper_interval_s)``.
        requeue_after_s: A queued job unknown to the queue (Redis restarted without
            persistence) is enqueued again once this old.
        max_queued_without_worker_s: A queued job fails (``no-worker``) once no live worker has
            listened on the queue for this long while it waited, instead of waiting forever.
        cancel_grace_s: Seconds a running job has, after its cancel reached the worker, to stop
            at its next check (batch, product, Gram block); past it the worker records the job
            ``canceled`` and exits (code 75) for its supervisor to start a fresh one (see
            :mod:`fimntk.worker.cancel_watchdog`).
        min_free_bytes: ``/readyz`` fails when the data directory has less free space.
        max_shards: Largest ``shards`` a job may ask for (422 past it); ``auto`` never picks
            more.
        shard_min_work: Examples × parameters below which ``shards: "auto"`` runs one shard
            (about three minutes of one CPU core for a KFAC: below that, the round trips and the
            reduce cost more than a second worker saves; raise it for GPU workers); above it,
            one shard per ``shard_min_work``.
        log_format: ``json`` (one object per line, with request and job ids) or ``text``.
        log_level: Level of the service's logs.
    """

    model_config = SettingsConfigDict(env_prefix="FIMNTK_", extra="ignore")

    data_dir: Path = Path("./fimntk-data")
    database_url: str | None = None
    redis_url: str | None = None
    queue_name: str = "fimntk"
    admin_key: str | None = None
    max_upload_bytes: int = Field(default=4 * GIB, gt=0)
    max_jobs_in_flight: int = Field(default=8, gt=0)
    default_job_timeout_s: int = Field(default=3600, gt=0)
    max_job_timeout_s: int = Field(default=24 * 3600, gt=0)
    max_model_bytes: int = Field(default=8 * GIB, gt=0)
    max_header_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    max_header_entries: int = Field(default=MAX_HEADER_ENTRIES, gt=0)
    header_cache_bytes: int = Field(default=32 * 1024 * 1024, ge=0)
    builder_modules: list[str] = Field(default_factory=list)
    max_architecture_depth: int = Field(default=MAX_DEPTH, ge=1, le=MAX_DEPTH)
    max_architecture_modules: int = Field(default=MAX_MODULES, ge=1, le=MAX_MODULES)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    model_cache_size: int = Field(default=4, ge=0)
    result_ttl_s: int = Field(default=24 * 3600, gt=0)
    device: str = "auto"
    artifact_url: str | None = None
    s3_endpoint_url: str | None = None
    heartbeat_ttl_s: float = Field(default=20, gt=0)
    reaper_interval_s: float = Field(default=5, gt=0)
    requeue_after_s: float = Field(default=30, ge=0)
    max_queued_without_worker_s: float = Field(default=600, gt=0)
    cancel_grace_s: float = Field(default=5, ge=0.5, le=3600)
    min_free_bytes: int = Field(default=GIB, ge=0)
    max_shards: int = Field(default=64, ge=1)
    shard_min_work: float = Field(default=1e11, gt=0)
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    @field_validator("admin_key")
    @classmethod
    def _admin_key_strong(cls, value: str | None) -> str | None:
        """Refuse admin keys short enough to guess."""
        if value is not None and len(value) < 16:
            raise ValueError("FIMNTK_ADMIN_KEY must be at least 16 characters")
        return value

    @cached_property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite inside ``data_dir``."""
        if self.database_url:
            return normalise_database_url(self.database_url)
        return f"sqlite:///{(self.data_dir / 'fimntk.db').resolve()}"

    @property
    def blobs_dir(self) -> Path:
        """Directory of content-addressed blobs."""
        return self.data_dir / "blobs"

    @property
    def artifacts_dir(self) -> Path:
        """Directory of job artifacts (result tensors, kept representations)."""
        return self.data_dir / "artifacts"

    @property
    def datasets_dir(self) -> Path:
        """Directory of named datasets (``<name>.safetensors``)."""
        return self.data_dir / "datasets"


def normalise_database_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` (and Heroku-style ``postgres://``) URLs."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url
