"""Incremental persona vectors: the devices whose profile changed since the vectors were last
computed, and each feature space's last run (its event time and device count).

Revision ID: 0003_incremental_vectors
Revises: 0002_erasure
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_incremental_vectors"
down_revision = "0002_erasure"
branch_labels = None
depends_on = None


def upgrade() -> None:
    changes = op.create_table(
        "profile_changes",
        sa.Column("change_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("change_id"),
    )
    op.create_table(
        "persona_vector_runs",
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("space"),
    )
    # Profiles merged before this revision left no trace: the next vectors recompute every device.
    op.bulk_insert(changes, [{"device_id": None}])


def downgrade() -> None:
    op.drop_table("persona_vector_runs")
    op.drop_table("profile_changes")
