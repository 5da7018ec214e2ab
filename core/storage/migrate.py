"""Schema migrations of the record database, with Alembic, for SQLite and PostgreSQL alike.

:func:`upgrade` runs at every start of the API and of each worker (so SQLite needs no setup at
all): it takes a lock (a PostgreSQL advisory lock, or a lock file beside the SQLite file) so
that processes starting together migrate once, stamps a database created before migrations
existed at revision ``0001``, and upgrades to the newest revision. ``python -m
fimntk.core.storage.migrate`` does the same from the command line for ``FIMNTK_DATABASE_URL``.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

_SCRIPTS = Path(__file__).parent / "migrations"
#: Key of the PostgreSQL advisory lock held while migrating ("fimntk" in ASCII).
_PG_LOCK_KEY = 0x66696D6E746B
_LEGACY_REVISION = "0001"


def alembic_config() -> Config:
    """The Alembic configuration of the record database."""
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    return config


def head_revision() -> str:
    """The newest revision."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None`` when never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest revision, once even when many processes start.

    Args:
        engine: Engine of the record database.
    """
    with _migration_lock(engine) as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        never_migrated = MigrationContext.configure(connection).get_current_revision() is None
        if never_migrated and inspect(connection).has_table("jobs"):  # made by create_all
            command.stamp(config, _LEGACY_REVISION)
        command.upgrade(config, "head")
        connection.commit()


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection holding the migration lock of ``engine``'s database."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        lock_path = Path(database).with_suffix(".migrate.lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with engine.connect() as connection:
                    yield connection
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    with engine.connect() as connection:
        postgres = engine.dialect.name == "postgresql"
        if postgres:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
            connection.commit()
        try:
            yield connection
        finally:
            if postgres:
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
                connection.commit()


def main() -> None:
    """Migrate the database of ``FIMNTK_DATABASE_URL`` (or the default SQLite file)."""
    from sqlalchemy import create_engine

    from fimntk.core.config import Settings

    engine = create_engine(Settings().resolved_database_url)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)}")
    engine.dispose()


if __name__ == "__main__":
    main()
