"""erasure tombstones

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 07:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Additive only: instances on 0003 keep working while this runs.
    op.create_table(
        "erasures",
        sa.Column("chat_hash", sa.String(length=64), nullable=False),
        sa.Column("up_to_update_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chat_hash", "up_to_update_id"),
    )


def downgrade() -> None:
    op.drop_table("erasures")
