"""The record store on both backends (SQLite, and PostgreSQL when one answers), and the
Alembic migrations: idempotent, concurrent-safe, and adopting a database made before them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from fimntk.core.storage import migrate
from fimntk.core.storage.records import JobFilter, JobRecord, SqlRecordStore, _Base, utcnow
from tests.service.prod import postgres_database, postgres_unavailable

_PG_REASON = postgres_unavailable()
BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(
            _PG_REASON is not None, reason=f"PostgreSQL tests skipped: {_PG_REASON}"
        ),
    ),
]


@contextlib.contextmanager
def database(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "postgresql":
        with postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'records.db'}"


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as value:
        yield value


@pytest.fixture
def store(url: str) -> Iterator[SqlRecordStore]:
    records = SqlRecordStore(url)
    yield records
    records.close()


def _job(owner: str, n: int, **changes: Any) -> JobRecord:
    return JobRecord(
        id=f"j_{n:04d}",
        owner_id=owner,
        status="queued",
        spec={"timeout_s": 60, "seed": 2**62, "text": "ünï"},
        metric="fim",
        representation="kfac",
        model_digest="sha256:" + "0" * 64,
        dataset="toy",
        rep_key="r" * 64,
        created_at=utcnow() + timedelta(milliseconds=n),
        **changes,
    )


def test_users_blobs_and_jobs(store: SqlRecordStore) -> None:
    alice = store.create_user("alice", "a" * 64)
    assert store.user_by_key_hash("a" * 64) == alice
    assert store.add_blob(alice.id, "sha256:" + "1" * 64, 10)
    assert not store.add_blob(alice.id, "sha256:" + "1" * 64, 10)
    assert store.owns_blob(alice, "sha256:" + "1" * 64)
    for n in range(5):
        store.create_job(_job(alice.id, n, idempotency_key=f"k{n}"))
    replay = store.create_job(_job(alice.id, 99, idempotency_key="k1"))
    assert replay.id == "j_0001"
    job = store.get_job("j_0003")
    assert job is not None and job.spec["seed"] == 2**62 and job.spec["text"] == "ünï"
    assert job.created_at.tzinfo is not None
    assert store.update_job(
        "j_0003", only_if_status=("queued",), status="running", started_at=utcnow(), worker="w1"
    )
    assert not store.update_job("j_0003", only_if_status=("queued",), status="failed")
    assert store.update_job(
        "j_0004", status="failed", finished_at=utcnow(), error={"type": "/problems/x"}
    )
    assert store.count_in_flight(alice.id) == 4
    assert store.count_by_status() == {"queued": 3, "running": 1, "failed": 1}
    assert [j.id for j in store.jobs_with_status("queued")] == ["j_0000", "j_0001", "j_0002"]
    assert [j.id for j in store.finished_since(utcnow() - timedelta(minutes=1))] == ["j_0004"]
    page, cursor = store.list_jobs(JobFilter(owner_id=alice.id), None, 2)
    assert [j.id for j in page] == ["j_0004", "j_0003"] and cursor is not None
    rest, end = store.list_jobs(JobFilter(owner_id=alice.id), cursor, 10)
    assert [j.id for j in rest] == ["j_0002", "j_0001", "j_0000"] and end is None


def test_migrations_are_idempotent_and_concurrent(url: str) -> None:
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            SqlRecordStore(url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = create_engine(SqlRecordStore(url).engine.url)
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()


def test_a_database_made_before_migrations_is_adopted(url: str) -> None:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    _Base.metadata.create_all(engine)  # how the schema was made before Alembic...
    with engine.begin() as connection:  # ...without what revisions 0002, 0003 and 0006 add
        indexes = ("ix_jobs_finished_at", "ix_jobs_owner_status", "ix_jobs_kept_lookup")
        for index in (*indexes, "ix_jobs_owner_created"):
            connection.execute(text(f"DROP INDEX {index}"))
        for table in ("job_labels", "job_scalars", "job_previews"):
            connection.execute(text(f"DROP TABLE {table}"))
        for column in ("labels", "step", "variant", "n"):
            connection.execute(text(f"ALTER TABLE jobs DROP COLUMN {column}"))
    assert migrate.current_revision(engine) is None
    store = SqlRecordStore(url)
    store.create_user("bob", "b" * 64)
    assert migrate.current_revision(engine) == migrate.head_revision()
    store.close()
    engine.dispose()
