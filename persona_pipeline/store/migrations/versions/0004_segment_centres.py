"""Segment centres of the last clustering fit, so device_clusters can assign the devices that
changed between refits instead of re-clustering the fleet every day.

Revision ID: 0004_segment_centres
Revises: 0003_incremental_vectors
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_segment_centres"
down_revision = "0003_incremental_vectors"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "segment_centres",
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("centre", sa.LargeBinary(), nullable=False),
        sa.Column("fitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("space", "cluster_id"),
    )


def downgrade() -> None:
    op.drop_table("segment_centres")
