"""zip members as their own blobs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Additive only: instances on 0004 keep working while this runs.
    op.create_table(
        "case_file_members",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("file_id", sa.String(length=32), nullable=False),
        sa.Column("case_id", sa.String(length=32), nullable=False),
        sa.Column("blob_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name_enc", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"]),
        sa.ForeignKeyConstraint(["file_id"], ["case_files.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("case_file_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_case_file_members_case_id"), ["case_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_case_file_members_file_id"), ["file_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("case_file_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_case_file_members_file_id"))
        batch_op.drop_index(batch_op.f("ix_case_file_members_case_id"))
    op.drop_table("case_file_members")
