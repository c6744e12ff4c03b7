"""the live checklist card, reminders, extra records and translations from the coordinator

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 10:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Additive only: nullable or defaulted columns and a new table.
    op.add_column("cases", sa.Column("active_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "cases", sa.Column("reminders_sent", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column(
        "cases",
        sa.Column("reminders_paused", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column("cases", sa.Column("extras_enc", sa.Text(), nullable=True))
    op.add_column("case_items", sa.Column("translation", sa.String(length=16), nullable=True))
    op.add_column("case_files", sa.Column("role", sa.String(length=16), nullable=True))
    op.create_table(
        "cards",
        sa.Column("chat_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chat_id"),
    )


def downgrade() -> None:
    op.drop_table("cards")
    with op.batch_alter_table("case_files", schema=None) as batch_op:
        batch_op.drop_column("role")
    with op.batch_alter_table("case_items", schema=None) as batch_op:
        batch_op.drop_column("translation")
    with op.batch_alter_table("cases", schema=None) as batch_op:  # SQLite rebuilds the table
        batch_op.drop_column("extras_enc")
        batch_op.drop_column("reminders_paused")
        batch_op.drop_column("reminders_sent")
        batch_op.drop_column("active_at")
