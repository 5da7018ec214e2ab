"""Composite indexes for submissions: the owner's jobs in flight and a kept result to reuse.

Without them both queries scan every job of the owner (or of the representation key), so a
submission slows down as the owner's history grows.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_status", "jobs", ["owner_id", "status"])
    op.create_index(
        "ix_jobs_kept_lookup", "jobs", ["owner_id", "rep_key", "kept", "status", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_kept_lookup", table_name="jobs")
    op.drop_index("ix_jobs_owner_status", table_name="jobs")
