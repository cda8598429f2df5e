"""Decisions that explain themselves: an anomaly flag's kind (the role of the keys that drove it)
and p-value, the probability with which each offer was chosen, and a ticket's lifecycle.

Revision ID: 0006_decisions
Revises: 0005_feedback_bookkeeping
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_decisions"
down_revision = "0005_feedback_bookkeeping"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("anomaly_scores", sa.Column("kind", sa.String(length=16), nullable=True))
    op.add_column("anomaly_scores", sa.Column("p_value", sa.Float(), nullable=True))
    op.add_column("service_recommendations", sa.Column("propensity", sa.Float(), nullable=True))
    op.add_column("support_tickets", sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("support_tickets", sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("support_tickets", sa.Column("last_seen_day", sa.String(length=10), nullable=True))
    op.create_index("ix_support_tickets_status", "support_tickets", ["status"])


def downgrade() -> None:
    op.drop_index("ix_support_tickets_status", table_name="support_tickets")
    for column in ("last_seen_day", "resolved_at", "updated_at"):
        op.drop_column("support_tickets", column)
    op.drop_column("service_recommendations", "propensity")
    op.drop_column("anomaly_scores", "p_value")
    op.drop_column("anomaly_scores", "kind")
