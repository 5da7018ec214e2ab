"""Alembic migrations of the record database (see :mod:`fimntk.core.storage.migrate`)."""
