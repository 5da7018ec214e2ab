"""Job, user and blob-ownership records behind the :class:`RecordStore` interface.

:class:`SqlRecordStore` works on any SQLAlchemy URL: SQLite (the default, zero setup) is put in
WAL mode so that the API and workers on the same machine can write concurrently; PostgreSQL
(``postgresql://...``, through psycopg 3) serves deployments with workers on several boxes.
The schema is created and upgraded by Alembic migrations (:mod:`fimntk.core.storage.migrate`)
when a store opens. Records are returned as plain dataclasses, never as live ORM objects, so callers
hold no session.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from fimntk.contract.vocabulary import IN_FLIGHT_STATUSES, JobStatus
from fimntk.core.config import normalise_database_url
from fimntk.core.errors import BadRequestError, ConflictError
from fimntk.core.storage import migrate


def utcnow() -> datetime:
    """Timezone-aware current time in UTC."""
    return datetime.now(timezone.utc)


@dataclass
class User:
    """An API user.

    Attributes:
        id: Stable identifier, the owner of blobs and jobs.
        name: Display name.
        is_admin: Whether the user sees every object.
        revoked: Whether the user's API key was revoked.
        created_at: When the user was created.
    """

    id: str
    name: str
    is_admin: bool
    revoked: bool = False
    created_at: datetime | None = None


@dataclass
class JobRecord:
    """The durable state of one job.

    Attributes:
        id: Job identifier, also the RQ job id.
        owner_id: Owning user.
        status: ``queued``, ``running``, ``succeeded``, ``failed`` or ``canceled``.
        spec: The resolved job spec (JSON).
        metric: Metric, copied from the spec for filtering.
        representation: Representation (``None`` for the NTK), for filtering.
        model_digest: Weights blob digest, for filtering.
        dataset: Dataset blob digest or name, for filtering.
        rep_key: Hash of what determines the representation (see ``keep``/``reuse``).
        reuse_job_id: Kept job whose representation this job reuses.
        kept: Whether the representation of this job was kept.
        idempotency_key: Client-chosen key; with ``request_hash`` makes resubmission safe.
        request_hash: Hash of the submitted body.
        cancel_requested: Set by the cancel endpoint; checked by the worker.
        progress: Last progress reported (``done``, ``total``, ``stage``).
        timings: Seconds per stage.
        error: Problem document of a failed job.
        result: Result document of a succeeded job.
        worker: Name of the worker that ran the job.
        created_at: Submission time.
        started_at: Time a worker started the job.
        finished_at: Time the job reached a terminal status.
        labels: The submitter's labels (string keys and values).
        step: Training step the weights come from.
        variant: Fisher variant (``None`` for the NTK), for filtering.
        n: Number of examples the job runs over (``None`` for jobs before migration 0006).
    """

    id: str
    owner_id: str
    status: str
    spec: dict[str, Any]
    metric: str
    representation: str | None
    model_digest: str
    dataset: str
    rep_key: str
    reuse_job_id: str | None = None
    kept: bool = False
    idempotency_key: str | None = None
    request_hash: str | None = None
    cancel_requested: bool = False
    progress: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    worker: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    labels: dict[str, str] = field(default_factory=dict)
    step: int | None = None
    variant: str | None = None
    n: int | None = None


@dataclass
class ScalarRow:
    """One scalar a succeeded job produced.

    Attributes:
        key: What it is (``trace``, ``lambda_max``, ``hutchinson_trace.estimate``...).
        layer: The layer it belongs to, ``None`` for the whole model.
        value: Its value; ``None`` when it was not finite.
    """

    key: str
    layer: str | None
    value: float | None


@dataclass
class JobFilter:
    """Filters of ``GET /v1/jobs``; ``None`` means no filter.

    Attributes:
        owner_id: Restrict to one owner (``None`` for the admin).
        status: Job status.
        model: Weights digest.
        dataset: Dataset digest or name.
        metric: Metric.
        representation: Representation.
        created_after: Lower bound (inclusive) on submission time.
        created_before: Upper bound (exclusive) on submission time.
    """

    owner_id: str | None = None
    status: str | None = None
    model: str | None = None
    dataset: str | None = None
    metric: str | None = None
    representation: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


class RecordStore(abc.ABC):
    """Durable records of users, blob ownership and jobs."""

    @abc.abstractmethod
    def create_user(self, name: str, key_hash: str, is_admin: bool = False) -> User:
        """Create a user identified by the hash of its API key.

        Raises:
            ConflictError: A user of that name exists (names are unique).
        """

    @abc.abstractmethod
    def set_admin_key(self, key_hash: str) -> User:
        """Create the admin user, or replace its key."""

    @abc.abstractmethod
    def user_by_key_hash(self, key_hash: str) -> User | None:
        """The user whose API key hashes to ``key_hash``."""

    @abc.abstractmethod
    def list_users(self) -> list[User]:
        """Every user, oldest first."""

    @abc.abstractmethod
    def revoke_user(self, user_id: str) -> User | None:
        """Make a user's API key unusable (their jobs and blobs stay); ``None`` if unknown."""

    @abc.abstractmethod
    def add_blob(self, owner_id: str, digest: str, size: int) -> bool:
        """Record that ``owner_id`` holds ``digest``; ``True`` when newly recorded."""

    @abc.abstractmethod
    def owns_blob(self, user: User, digest: str) -> bool:
        """Whether ``user`` may use ``digest`` (the admin may use any held blob)."""

    @abc.abstractmethod
    def create_job(self, record: JobRecord) -> JobRecord:
        """Insert a job; with an idempotency key already used by the owner, return that job."""

    @abc.abstractmethod
    def get_job(self, job_id: str) -> JobRecord | None:
        """The job with this id."""

    @abc.abstractmethod
    def delete_job(self, job_id: str) -> None:
        """Remove a job that never reached the queue."""

    @abc.abstractmethod
    def find_by_idempotency_key(self, owner_id: str, key: str) -> JobRecord | None:
        """The job ``owner_id`` submitted with idempotency key ``key``."""

    @abc.abstractmethod
    def list_jobs(
        self, filters: JobFilter, cursor: str | None, limit: int
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first, and the cursor of the next page (``None`` at the end)."""

    @abc.abstractmethod
    def count_in_flight(self, owner_id: str) -> int:
        """Queued plus running jobs of ``owner_id``."""

    @abc.abstractmethod
    def find_kept(self, owner_id: str, rep_key: str) -> JobRecord | None:
        """The newest succeeded job of ``owner_id`` that kept a representation for ``rep_key``."""

    @abc.abstractmethod
    def count_by_status(self) -> dict[str, int]:
        """Number of jobs of every status present."""

    @abc.abstractmethod
    def jobs_with_status(self, status: str, limit: int = 1000) -> list[JobRecord]:
        """Jobs of one status, oldest first."""

    @abc.abstractmethod
    def finished_since(self, since: datetime, limit: int = 10_000) -> list[JobRecord]:
        """Jobs that reached a terminal status after ``since``, oldest first."""

    @abc.abstractmethod
    def store_outputs(
        self, job_id: str, scalars: Sequence[ScalarRow], previews: dict[str, Any]
    ) -> None:
        """Store the scalars and JSON previews of a succeeded job (replacing earlier ones)."""

    @abc.abstractmethod
    def preview(self, job_id: str, kind: str) -> Any | None:
        """The JSON preview ``kind`` of a job; ``None`` when it has none."""

    @abc.abstractmethod
    def update_job(
        self, job_id: str, only_if_status: Iterable[str] | None = None, **changes: Any
    ) -> bool:
        """Update fields of a job, atomically conditioned on its current status.

        Returns:
            Whether the job was updated (``False`` when its status was not in
            ``only_if_status``).
        """


class _Base(DeclarativeBase):
    pass


class _UserRow(_Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class _BlobOwnerRow(_Base):
    __tablename__ = "blob_owners"
    owner_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    digest: Mapped[str] = mapped_column(String(80), primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class _JobRow(_Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_job_idem"),
        # every submission counts the owner's jobs in flight and looks for a kept result: both
        # stay index lookups however many jobs the owner has run (migration 0003)
        Index("ix_jobs_owner_status", "owner_id", "status"),
        Index("ix_jobs_kept_lookup", "owner_id", "rep_key", "kept", "status", "created_at"),
        # a user's searches, newest first (migration 0006)
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(40), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    metric: Mapped[str] = mapped_column(String(32))
    representation: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model_digest: Mapped[str] = mapped_column(String(80))
    dataset: Mapped[str] = mapped_column(String(128))
    rep_key: Mapped[str] = mapped_column(String(64), index=True)
    reuse_job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    kept: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, index=True
    )
    labels: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    variant: Mapped[str | None] = mapped_column(String(32), nullable=True)
    n: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class LabelRow(_Base):
    """One label of a job (migration 0006), for filters on ``labels.<key>``."""

    __tablename__ = "job_labels"
    __table_args__ = (Index("ix_job_labels_key_value", "key", "value", "job_id"),)
    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class ScalarRecordRow(_Base):
    """One scalar of a succeeded job (migration 0006), for filters and series."""

    __tablename__ = "job_scalars"
    __table_args__ = (
        Index("ix_job_scalars_job", "job_id", "key"),
        Index("ix_job_scalars_key_job", "key", "job_id", "value"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(64))
    layer: Mapped[str | None] = mapped_column(String(200), nullable=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)


class PreviewRow(_Base):
    """A bounded JSON preview of a job's result (migration 0006)."""

    __tablename__ = "job_previews"
    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    data: Mapped[Any] = mapped_column(JSON)


#: The jobs table, for queries built elsewhere (:mod:`fimntk.core.storage.search`).
JOBS = _JobRow.__table__


_JOB_FIELDS = [f.name for f in dataclasses.fields(JobRecord)]
_JOBS = JOBS
_GET_JOB = select(*(_JOBS.c[name] for name in _JOB_FIELDS)).where(_JOBS.c.id == bindparam("job_id"))
#: Prefix of the stored key hash of a revoked user: no presented key hashes to it.
_REVOKED = "revoked:"
#: How long a verified API key is trusted without asking the database.
USER_CACHE_TTL_S = 5.0


def _to_user(row: _UserRow) -> User:
    return User(
        row.id, row.name, row.is_admin, row.key_hash.startswith(_REVOKED), _aware(row.created_at)
    )


def _aware(value: datetime | None) -> datetime | None:
    """SQLite drops time zones: read naive datetimes back as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _to_record(row: _JobRow) -> JobRecord:
    values = {name: getattr(row, name) for name in _JOB_FIELDS}
    for name in ("created_at", "started_at", "finished_at"):
        values[name] = _aware(values[name])
    values["labels"] = values["labels"] or {}
    return JobRecord(**values)


def _encode_cursor(record: JobRecord) -> str:
    raw = json.dumps([record.created_at.isoformat(), record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return _aware(datetime.fromisoformat(created)), str(job_id)  # type: ignore[return-value]
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequestError("malformed cursor", "cursor") from None


class SqlRecordStore(RecordStore):
    """Records in a SQL database reached through SQLAlchemy.

    Args:
        url: SQLAlchemy database URL.
    """

    def __init__(self, url: str) -> None:
        url = normalise_database_url(url)
        sqlite = url.startswith("sqlite")
        # SQLite: enough pooled connections for the API's threadpool (40 threads), so that
        # requests do not queue on the pool; connections are cheap and kept open.
        in_memory = url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url
        pool = {"pool_size": 20, "max_overflow": 40} if sqlite and not in_memory else {}
        self.engine: Engine = create_engine(
            url,
            connect_args={"timeout": 30} if sqlite else {"connect_timeout": 5},
            pool_pre_ping=not sqlite,  # survive a database restart without an API restart
            **pool,
        )
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrate.upgrade(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # Verified API keys (hash -> user, expiry): authentication is on every request. Only
        # hits are cached; revoking or replacing a key drops its entry at once in this process
        # (other API processes see it within USER_CACHE_TTL_S).
        self._users: dict[str, tuple[User, float]] = {}
        self._users_lock = threading.Lock()
        self._owned: set[tuple[str, bool, str]] = set()

    def cached_user(self, key_hash: str) -> User | None:
        """The user of ``key_hash`` if verified in the last :data:`USER_CACHE_TTL_S` seconds
        (no database access); ``None`` when unknown here."""
        entry = self._users.get(key_hash)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def _forget_users(self, user_id: str | None = None) -> None:
        with self._users_lock:
            if user_id is None:
                self._users.clear()
            else:
                for key, (user, _) in list(self._users.items()):
                    if user.id == user_id:
                        del self._users[key]

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    def create_user(self, name: str, key_hash: str, is_admin: bool = False) -> User:
        row = _UserRow(
            id=f"u_{uuid.uuid4().hex[:16]}", name=name, key_hash=key_hash, is_admin=is_admin
        )
        try:
            with self._session.begin() as s:
                s.add(row)
        except IntegrityError:
            raise ConflictError("a user of that name exists", "name") from None
        return User(row.id, row.name, row.is_admin)

    def set_admin_key(self, key_hash: str) -> User:
        with self._session.begin() as s:
            row = s.get(_UserRow, "admin")
            if row is None:
                row = _UserRow(id="admin", name="admin", key_hash=key_hash, is_admin=True)
                s.add(row)
            else:
                row.key_hash = key_hash
        self._forget_users("admin")
        return User("admin", "admin", True)

    def user_by_key_hash(self, key_hash: str) -> User | None:
        cached = self.cached_user(key_hash)
        if cached is not None:
            return cached
        with self._session() as s:
            row = s.scalars(select(_UserRow).where(_UserRow.key_hash == key_hash)).first()
            user = None if row is None else User(row.id, row.name, row.is_admin)
        if user is not None:
            with self._users_lock:
                if len(self._users) > 10_000:
                    self._users.clear()
                self._users[key_hash] = (user, time.monotonic() + USER_CACHE_TTL_S)
        return user

    def list_users(self) -> list[User]:
        with self._session() as s:
            rows = s.scalars(select(_UserRow).order_by(_UserRow.created_at))
            return [_to_user(r) for r in rows]

    def revoke_user(self, user_id: str) -> User | None:
        with self._session.begin() as s:
            row = s.get(_UserRow, user_id)
            if row is None:
                return None
            if not row.key_hash.startswith(_REVOKED):
                row.key_hash = _REVOKED + uuid.uuid4().hex  # never a SHA-256 hex digest
            user = _to_user(row)
        self._forget_users(user_id)
        return user

    def add_blob(self, owner_id: str, digest: str, size: int) -> bool:
        try:
            with self._session.begin() as s:
                if s.get(_BlobOwnerRow, (owner_id, digest)) is not None:
                    return False
                s.add(_BlobOwnerRow(owner_id=owner_id, digest=digest, size=size))
        except IntegrityError:
            return False
        return True

    def owns_blob(self, user: User, digest: str) -> bool:
        # Ownership is never withdrawn: a "yes" is remembered (every submission asks twice).
        key = (user.id, user.is_admin, digest)
        if key in self._owned:
            return True
        with self._session() as s:
            query = select(_BlobOwnerRow.digest).where(_BlobOwnerRow.digest == digest)
            if not user.is_admin:
                query = query.where(_BlobOwnerRow.owner_id == user.id)
            owned = s.scalars(query.limit(1)).first() is not None
        if owned:
            if len(self._owned) > 100_000:
                self._owned.clear()
            self._owned.add(key)
        return owned

    def create_job(self, record: JobRecord) -> JobRecord:
        values = dataclasses.asdict(record)
        try:
            with self._session.begin() as s:
                s.add(_JobRow(**values))
                s.add_all(
                    LabelRow(job_id=record.id, key=k, value=v) for k, v in record.labels.items()
                )
        except IntegrityError:
            if record.idempotency_key is None:
                raise
            with self._session() as s:
                row = s.scalars(
                    select(_JobRow).where(
                        _JobRow.owner_id == record.owner_id,
                        _JobRow.idempotency_key == record.idempotency_key,
                    )
                ).one()
                return _to_record(row)
        return record

    def get_job(self, job_id: str) -> JobRecord | None:
        # The hottest query (every status read): Core rather than the ORM, half the overhead.
        with self.engine.connect() as conn:
            row = conn.execute(_GET_JOB, {"job_id": job_id}).mappings().first()
        if row is None:
            return None
        values = {name: row[name] for name in _JOB_FIELDS}
        for name in ("created_at", "started_at", "finished_at"):
            values[name] = _aware(values[name])
        values["labels"] = values["labels"] or {}
        return JobRecord(**values)

    def delete_job(self, job_id: str) -> None:
        with self._session.begin() as s:
            row = s.get(_JobRow, job_id)
            if row is not None:
                s.delete(row)
            s.execute(delete(LabelRow).where(LabelRow.job_id == job_id))

    def store_outputs(
        self, job_id: str, scalars: Sequence[ScalarRow], previews: dict[str, Any]
    ) -> None:
        with self._session.begin() as s:
            s.execute(delete(ScalarRecordRow).where(ScalarRecordRow.job_id == job_id))
            s.execute(delete(PreviewRow).where(PreviewRow.job_id == job_id))
            s.add_all(
                ScalarRecordRow(job_id=job_id, key=r.key, layer=r.layer, value=r.value)
                for r in scalars
            )
            s.add_all(PreviewRow(job_id=job_id, kind=k, data=v) for k, v in previews.items())

    def preview(self, job_id: str, kind: str) -> Any | None:
        with self._session() as s:
            row = s.get(PreviewRow, (job_id, kind))
            return None if row is None else row.data

    def find_by_idempotency_key(self, owner_id: str, key: str) -> JobRecord | None:
        with self._session() as s:
            row = s.scalars(
                select(_JobRow).where(_JobRow.owner_id == owner_id, _JobRow.idempotency_key == key)
            ).first()
            return None if row is None else _to_record(row)

    def list_jobs(
        self, filters: JobFilter, cursor: str | None, limit: int
    ) -> tuple[list[JobRecord], str | None]:
        query = select(_JobRow)
        simple: Sequence[tuple[Any, Any]] = [
            (_JobRow.owner_id, filters.owner_id),
            (_JobRow.status, filters.status),
            (_JobRow.model_digest, filters.model),
            (_JobRow.dataset, filters.dataset),
            (_JobRow.metric, filters.metric),
            (_JobRow.representation, filters.representation),
        ]
        for column, value in simple:
            if value is not None:
                query = query.where(column == value)
        if filters.created_after is not None:
            query = query.where(_JobRow.created_at >= filters.created_after)
        if filters.created_before is not None:
            query = query.where(_JobRow.created_at < filters.created_before)
        if cursor is not None:
            created, job_id = _decode_cursor(cursor)
            query = query.where(
                or_(
                    _JobRow.created_at < created,
                    (_JobRow.created_at == created) & (_JobRow.id < job_id),
                )
            )
        query = query.order_by(_JobRow.created_at.desc(), _JobRow.id.desc()).limit(limit + 1)
        with self._session() as s:
            records = [_to_record(r) for r in s.scalars(query)]
        more = len(records) > limit
        records = records[:limit]
        return records, (_encode_cursor(records[-1]) if more else None)

    def count_in_flight(self, owner_id: str) -> int:
        with self._session() as s:
            query = (
                select(func.count())
                .select_from(_JobRow)
                .where(_JobRow.owner_id == owner_id, _JobRow.status.in_(IN_FLIGHT_STATUSES))
            )
            return int(s.scalar(query) or 0)

    def find_kept(self, owner_id: str, rep_key: str) -> JobRecord | None:
        with self._session() as s:
            row = s.scalars(
                select(_JobRow)
                .where(
                    _JobRow.owner_id == owner_id,
                    _JobRow.rep_key == rep_key,
                    _JobRow.kept.is_(True),
                    _JobRow.status == JobStatus.SUCCEEDED,
                )
                .order_by(_JobRow.created_at.desc())
            ).first()
            return None if row is None else _to_record(row)

    def count_by_status(self) -> dict[str, int]:
        with self._session() as s:
            rows = s.execute(select(_JobRow.status, func.count()).group_by(_JobRow.status))
            return {status: int(n) for status, n in rows}

    def jobs_with_status(self, status: str, limit: int = 1000) -> list[JobRecord]:
        with self._session() as s:
            rows = s.scalars(
                select(_JobRow)
                .where(_JobRow.status == status)
                .order_by(_JobRow.created_at)
                .limit(limit)
            )
            return [_to_record(r) for r in rows]

    def finished_since(self, since: datetime, limit: int = 10_000) -> list[JobRecord]:
        with self._session() as s:
            rows = s.scalars(
                select(_JobRow)
                .where(_JobRow.finished_at > since)
                .order_by(_JobRow.finished_at)
                .limit(limit)
            )
            return [_to_record(r) for r in rows]

    def update_job(
        self, job_id: str, only_if_status: Iterable[str] | None = None, **changes: Any
    ) -> bool:
        unknown = set(changes) - set(_JOB_FIELDS)
        if unknown:
            raise TypeError(f"unknown job fields: {sorted(unknown)}")
        statement = update(_JobRow).where(_JobRow.id == job_id)
        if only_if_status is not None:
            statement = statement.where(_JobRow.status.in_(list(only_if_status)))
        with self._session.begin() as s:
            result = s.execute(statement.values(**changes))
            return bool(result.rowcount)  # type: ignore[attr-defined]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers and one writer proceed together; wait instead of failing on locks."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode, NORMAL syncs at checkpoints rather than at every commit: still consistent
    # after a crash of any process, without an fsync per job update.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
