"""Learned weights go live only when shown better: each key_weights version has a status
(`accepted` for the configured weights and for candidates that went live, `rejected` for
candidates the gate refused), and each refresh records the candidate it made, the decision,
the reason and the evidence (JSON). A retired segment id records why it was retired.

Revision ID: 0007_weights_gate
Revises: 0006_decisions
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_weights_gate"
down_revision = "0006_decisions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every version written before the gate went live when it was written.
    op.add_column(
        "key_weights",
        sa.Column("status", sa.String(length=16), nullable=False, server_default="accepted"),
    )
    op.add_column("key_weight_refreshes", sa.Column("candidate_version", sa.Integer(), nullable=True))
    op.add_column("key_weight_refreshes", sa.Column("decision", sa.String(length=16), nullable=True))
    op.add_column("key_weight_refreshes", sa.Column("reason", sa.Text(), nullable=True))
    op.add_column("key_weight_refreshes", sa.Column("evidence", sa.Text(), nullable=True))
    op.add_column("segments", sa.Column("retired_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("segments", "retired_reason")
    for column in ("evidence", "reason", "decision", "candidate_version"):
        op.drop_column("key_weight_refreshes", column)
    op.drop_column("key_weights", "status")
