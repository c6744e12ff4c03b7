"""coordinator review: item review, hand-off mark, pending coordinator prompts

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 10:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Additive only: nullable columns and a new table, so instances on 0005 keep working.
    op.add_column("case_items", sa.Column("review", sa.String(length=64), nullable=True))
    op.add_column("cases", sa.Column("handed_off_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "coordinator_prompts",
        sa.Column("user_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("case_id", sa.String(length=32), nullable=False),
        sa.Column("item_key", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id"),
    )


def downgrade() -> None:
    op.drop_table("coordinator_prompts")
    with op.batch_alter_table("cases", schema=None) as batch_op:  # SQLite rebuilds the table
        batch_op.drop_column("handed_off_at")
    with op.batch_alter_table("case_items", schema=None) as batch_op:
        batch_op.drop_column("review")
