"""the patient's name and birth date, encrypted, for the identity check

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Additive only: nullable columns, so instances on 0006 keep working while this runs.
    op.add_column("cases", sa.Column("patient_name_enc", sa.Text(), nullable=True))
    op.add_column("cases", sa.Column("birth_date_enc", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:  # SQLite rebuilds the table
        batch_op.drop_column("birth_date_enc")
        batch_op.drop_column("patient_name_enc")
