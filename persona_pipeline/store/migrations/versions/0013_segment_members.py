"""Segment members: the devices the last full fit segmented, with the segment it gave each. The
fit (the `segments` asset) and the assignment of every device (`device_clusters`, one run per
device shard) are now two steps, and this is what passes between them. A store from before has
no member: its devices keep their segments until the next fit.

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
        "segment_members",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("distance", sa.Float(), nullable=False),
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )


def downgrade() -> None:
    op.drop_table("segment_members")
