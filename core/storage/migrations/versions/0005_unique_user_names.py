"""User names are unique: two users of one name could not be told apart in the admin's list.

Existing duplicates keep their oldest holder's name; the others get their id appended.

Revision ID: 0005
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, name FROM users ORDER BY created_at, id")).all()
    seen: set[str] = set()
    for user_id, name in rows:
        if name in seen:
            bind.execute(
                sa.text("UPDATE users SET name = :name WHERE id = :id"),
                {"name": f"{name[:150]}-{user_id}", "id": user_id},
            )
        seen.add(name)
    with op.batch_alter_table("users") as batch:
        batch.create_unique_constraint("uq_users_name", ["name"])


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("uq_users_name", type_="unique")
