"""Labels and step of jobs, scalars as rows and bounded JSON previews, for dashboards.

``jobs`` gains ``labels`` (the JSON object as submitted), ``step``, ``variant`` and ``n``
(examples);
``job_labels`` holds one row per label (indexed by key and value), ``job_scalars`` one row per
scalar a succeeded job produced (indexed by key), ``job_previews`` small JSON results
(eigenvalues, densities, a Gram preview). Existing jobs get no labels and no scalars.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("step", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("variant", sa.String(32), nullable=True))
        batch.add_column(sa.Column("n", sa.BigInteger(), nullable=True))
    op.create_index("ix_jobs_owner_created", "jobs", ["owner_id", "created_at"])
    op.create_table(
        "job_labels",
        sa.Column("job_id", sa.String(40), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )
    op.create_index("ix_job_labels_key_value", "job_labels", ["key", "value", "job_id"])
    op.create_table(
        "job_scalars",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("layer", sa.String(200), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
    )
    op.create_index("ix_job_scalars_job", "job_scalars", ["job_id", "key"])
    op.create_index("ix_job_scalars_key_job", "job_scalars", ["key", "job_id", "value"])
    op.create_table(
        "job_previews",
        sa.Column("job_id", sa.String(40), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("data", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_previews")
    op.drop_index("ix_job_scalars_key_job", table_name="job_scalars")
    op.drop_index("ix_job_scalars_job", table_name="job_scalars")
    op.drop_table("job_scalars")
    op.drop_index("ix_job_labels_key_value", table_name="job_labels")
    op.drop_table("job_labels")
    op.drop_index("ix_jobs_owner_created", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("n")
        batch.drop_column("variant")
        batch.drop_column("step")
        batch.drop_column("labels")
