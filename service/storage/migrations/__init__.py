"""Alembic migrations of the record database (see :mod:`service.storage.migrate`)."""
