"""when a case given up was told it would be erased (the retention rule's notice)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 08:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Additive only: a nullable column.
    op.add_column(
        "cases", sa.Column("retention_notice_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:  # SQLite rebuilds the table
        batch_op.drop_column("retention_notice_at")
