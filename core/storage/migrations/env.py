"""Alembic environment: runs on the connection handed over by :mod:`fimntk.core.storage.migrate`,
or on ``sqlalchemy.url`` when alembic is run from the command line."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

config = context.config
connection = config.attributes.get("connection")


def _run(conn: Connection) -> None:
    context.configure(connection=conn, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()
