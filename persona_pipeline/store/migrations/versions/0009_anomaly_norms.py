"""Anomaly norms: what anomaly_scores fitted at its last scoring of the whole fleet, so the days
between segment fits score only the devices whose vector or segment changed. A store from before
has no row: its next anomaly_scores run scores the fleet and records them.

Revision ID: 0009_anomaly_norms
Revises: 0008_one_payload_writer
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_anomaly_norms"
down_revision = "0008_one_payload_writer"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "anomaly_norms",
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("segments_fitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("fitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("versions", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column("norms", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("space"),
    )


def downgrade() -> None:
    op.drop_table("anomaly_norms")
