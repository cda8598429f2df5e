"""Data erasure: the audit of erasure requests, the suppression list, and the device id of
an index update reject (so an erasure finds the rejects of a device).

Revision ID: 0002_erasure
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_erasure"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasure_requests",
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("requested_by", sa.Text(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("device_ids_requested", sa.Integer(), nullable=False),
        sa.Column("customer_ids_requested", sa.Integer(), nullable=False),
        sa.Column("devices_erased", sa.Integer(), nullable=False),
        sa.Column("rows_deleted", sa.Integer(), nullable=False),
        sa.Column("points_deleted", sa.Integer(), nullable=False),
        sa.Column("rows_by_table", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_table(
        "suppressed_subjects",
        sa.Column("subject_kind", sa.String(length=16), nullable=False),
        sa.Column("subject_hash", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("suppressed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("subject_kind", "subject_hash"),
    )
    op.add_column("index_update_rejects", sa.Column("device_id", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("index_update_rejects") as batch:
        batch.drop_column("device_id")
    op.drop_table("suppressed_subjects")
    op.drop_table("erasure_requests")
