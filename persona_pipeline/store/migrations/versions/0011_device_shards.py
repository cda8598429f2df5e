"""Device shards: each reject records the device shard whose ingest run wrote it and the shard
count of that run (`device_shard`, `device_shards`), so a run of one (day, shard) replaces only its
own rejects. Rows from before this revision have neither: a run of their day replaces them.

Revision ID: 0011_device_shards
Revises: 0010_update_history
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_device_shards"
down_revision = "0010_update_history"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("index_update_rejects", sa.Column("device_shard", sa.Integer(), nullable=True))
    op.add_column("index_update_rejects", sa.Column("device_shards", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("index_update_rejects", "device_shards")
    op.drop_column("index_update_rejects", "device_shard")
