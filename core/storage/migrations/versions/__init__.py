"""Alembic revisions, oldest first by their ``revision`` ids."""
