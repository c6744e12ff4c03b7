"""pdf password flow

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 07:21:20.393331
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Additive only: instances on 0001 keep working while this runs.
    with op.batch_alter_table("case_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("password_enc", sa.Text(), nullable=True))

    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("password_file", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_column("password_file")

    with op.batch_alter_table("case_files", schema=None) as batch_op:
        batch_op.drop_column("password_enc")
