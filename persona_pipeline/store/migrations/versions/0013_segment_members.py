"""Segment fits and members: the fit (the `segments` asset) and the assignment of every device
(`device_clusters`, one run per device shard) are now two steps. `segment_fits` is the last fit
of each feature space (also one that found no segment), `segment_members` the devices it
segmented with the segment it gave each, and `device_clusters.fitted_at` the fit a device's row
belongs to. A store from before gets a fit row from its centres and its assignments marked as
of that fit (the single step always wrote them together), so nothing is assigned again until
the next fit.

Revision ID: 0013_segment_members
Revises: 0012_device_hash
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_segment_members"
down_revision = "0012_device_hash"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "segment_fits",
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("fitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("space"),
    )
    op.create_table(
        "segment_members",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("distance", sa.Float(), nullable=False),
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    with op.batch_alter_table("device_clusters") as batch:
        batch.add_column(sa.Column("fitted_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "INSERT INTO segment_fits (space, fitted_at, settings, devices) "
        "SELECT space, MIN(fitted_at), MIN(settings), 0 FROM segment_centres GROUP BY space"
    )
    op.execute(
        "UPDATE device_clusters SET fitted_at = "
        "(SELECT f.fitted_at FROM segment_fits f WHERE f.space = device_clusters.space)"
    )


def downgrade() -> None:
    with op.batch_alter_table("device_clusters") as batch:
        batch.drop_column("fitted_at")
    op.drop_table("segment_members")
    op.drop_table("segment_fits")
