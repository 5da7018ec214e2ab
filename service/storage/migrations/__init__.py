"""Alembic migrations of the record database (see :mod:`fimntk.service.storage.migrate`)."""
